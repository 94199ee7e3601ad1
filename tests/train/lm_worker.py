"""Trains the tiny LM in its own process (or as one of several, under
``python -m jaxaigc.launch``), for the kill / preemption / resume tests.

Process 0 writes ``final.npz`` (the final params and EMA), ``losses.json`` (step -> loss of the
steps this run made) and ``compiles.json`` (compilations of the train step, in total and after the
first step of this process) into the workdir.
"""

import argparse
import json
import logging
import os
import signal

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxaigc import parallel  # noqa: E402
from jaxaigc.configs import lm as lm_config  # noqa: E402
from jaxaigc.systems import lm  # noqa: E402
from jaxaigc.train.loop import train  # noqa: E402


def config(steps: int, checkpoint_every: int):
    c = lm_config.get_config()
    c.model.update(context_length=16, width=32, layers=2, heads=4, dropout_rate=0.1)
    c.data.lines = 2000
    c.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
    c.train.update(steps=steps, batch_size=8, checkpoint_every=checkpoint_every, log_every=5)
    c.train.ema_decay = 0.9
    return c


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process after step")
    parser.add_argument("--sigterm-at", type=int, default=0, help="SIGTERM this process at step")
    parser.add_argument("--signal-process", type=int, default=0, help="which process kills")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    distributed = {
        name: getattr(args, name)
        for name in ("coordinator_address", "num_processes", "process_id")
        if getattr(args, name) is not None
    }
    parallel.initialize_distributed(**distributed)
    signals = jax.process_index() == args.signal_process

    compiles = []  # compilations of the train step, read from JAX's compile log

    class CountTrainStepCompiles(logging.Handler):
        def emit(self, record):
            if "Compiling jit(train_step)" in record.getMessage():
                compiles.append(record)

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(CountTrainStepCompiles())
    counts, losses = {}, {}

    def hook(step, state, metrics):
        counts.setdefault("first_step", step)
        counts.setdefault("at_first_step", len(compiles))
        counts["total"] = len(compiles)
        counts["after_first_step"] = len(compiles) - counts["at_first_step"]
        counts["steps"] = counts.get("steps", 0) + 1
        losses[step] = float(metrics["train/loss"])
        if signals and step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if signals and step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    c = config(args.steps, args.checkpoint_every)
    _, task, batches = lm.build(c)
    state = train(task, batches, c, args.workdir, hooks=[hook])
    final = {"params": state.params, "ema": state.ema_params}
    # Parameters sharded over several processes are gathered whole onto each.
    leaves = jax.tree_util.tree_leaves_with_path(
        multihost_utils.process_allgather(final, tiled=True)
    )
    if jax.process_index() != 0:
        return
    np.savez(
        os.path.join(args.workdir, "final.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    with open(os.path.join(args.workdir, "compiles.json"), "w") as f:
        json.dump(counts, f)
    with open(os.path.join(args.workdir, "losses.json"), "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    main()
