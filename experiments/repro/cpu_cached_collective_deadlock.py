"""XLA:CPU (jax 0.10) deadlocks in a collective running a sharded training step compiled with the
library's YNNPACK fusions (``jaxaigc.compile_options.CPU_TRAINING_OPTIONS``) when the step is read
back from the persistent compilation cache; compiled afresh, the same step runs. Run it after a
jax upgrade to see whether ``tests/systems/test_pod_instructgpt.py`` can train with remat again.

    python experiments/repro/cpu_cached_collective_deadlock.py [--remat none] [--xla-defaults]

Two processes share a new compilation cache; each trains the reward model of the
``instructgpt-gpt2`` recipe at its tiny (``--quick``) sizes (bf16, scanned blocks, full remat)
for 2 steps on 8 emulated CPU devices, FSDP over all 8, from random token rows. The first
compiles the step and runs it; the second reads it from the cache and aborts in a rendezvous
("Termination timeout for `all reduce ...` of 40 seconds exceeded"; 4 runs of 4 on a 2-core
host). Without the YNNPACK fusions (``--xla-defaults``, 2 runs of 2), or with ``--remat none``,
float32 or unscanned blocks (1 run each), both processes finish.
"""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def train_reward_model(remat: str, xla_defaults: bool) -> None:
    import numpy as np

    from jaxaigc import compile_options, run
    from jaxaigc.data.pipeline import ArrayRecords, BatchIterator
    from jaxaigc.systems import instructgpt_pod as pod
    from jaxaigc.train import loop

    if xla_defaults:  # without the library's YNNPACK fusions
        compile_options.training_options = lambda mesh: {}
    config = run.get_config("instructgpt-gpt2", quick=True)
    config.model.remat_policy = remat
    stage = pod.stage_config(config, "rm", 16)
    _, task = pod.make_rm_task(stage)
    rng = np.random.default_rng(0)
    k, length = 3, 48
    arrays = {
        "tokens": rng.integers(1, config.model.vocab_size, (16, k, length)).astype(np.int32),
        "response_mask": np.broadcast_to(np.arange(length) >= 32, (16, k, length)).copy(),
        "ranks": np.tile(np.arange(k, dtype=np.int32), (16, 1)),
    }
    batches = BatchIterator(
        ArrayRecords(arrays, name="random-comparisons"), global_batch_size=8, seed=0
    )
    loop.train(task, batches, stage, tempfile.mkdtemp())


def main() -> None:
    remat = sys.argv[sys.argv.index("--remat") + 1] if "--remat" in sys.argv else "full"
    xla_defaults = "--xla-defaults" in sys.argv
    if "--child" in sys.argv:
        train_reward_model(remat, xla_defaults)
        return
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="xla-cache-")}
    for run_name in ("compiled", "read from the cache"):
        child = [sys.executable, __file__, "--child", "--remat", remat]
        child += ["--xla-defaults"] * xla_defaults
        status = subprocess.run(child, env=env, capture_output=True, text=True)
        stuck = "Termination timeout" in status.stderr
        print(f"remat {remat}, step {run_name}: exit {status.returncode}"
              + (" (deadlocked in a collective)" if stuck else ""), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
