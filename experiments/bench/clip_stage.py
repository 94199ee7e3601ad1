"""Where the demo's CLIP stage spends its time, for checkouts side by side: milliseconds per
input batch, training steps/s and evaluation seconds (:func:`jaxaigc.evaluate.clip.transfer` on a
trained run, loading excluded) of the ``clip`` recipe. Each checkout runs in its own process,
alternating, ``--rounds`` times; a checkout needs the recipe layout (``jaxaigc/configs/clip.py``).

    git worktree add /tmp/before <commit>
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/bench/clip_stage.py \
        --checkout /tmp/before --checkout . --trained runs/demo/clip
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Run inside a checkout (its jaxaigc first on PYTHONPATH).
MEASURE = """
import json, sys, tempfile, time
from jaxaigc.configs import clip as clip_config
from jaxaigc.evaluate import clip as clip_eval
from jaxaigc.pipelines.clip import load_clip
from jaxaigc.systems import clip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics

trained, steps = sys.argv[1], int(sys.argv[2])
config = clip_config.get_config()
config.train.update(dict(steps=steps, log_every=50, checkpoint_every=10 * steps))
_, task, batches, _ = clip.build(config)
for _ in range(3):
    next(batches)
start = time.perf_counter()
for _ in range(30):
    next(batches)
batch_ms = (time.perf_counter() - start) / 30 * 1e3
workdir = tempfile.mkdtemp()
train(task, batches, config, workdir)
rates = [r["train/steps_per_sec"] for r in read_metrics(workdir) if "train/steps_per_sec" in r]
features = load_clip(trained, batch_size=config.eval.batch_size)
start = time.perf_counter()
clip_eval.transfer(features, config)
evaluate_s = time.perf_counter() - start
print(json.dumps(dict(batch_ms=batch_ms, steps_per_sec=sum(rates[1:]) / len(rates[1:]),
                      evaluate_s=evaluate_s)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", required=True, help="repository root")
    parser.add_argument("--trained", required=True, help="a trained clip run to evaluate")
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps timed (first 50 dropped)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trained = str(Path(args.trained).absolute())
    for round_ in range(args.rounds):
        for checkout in args.checkout:
            result = subprocess.run(
                [sys.executable, "-c", MEASURE, trained, str(args.steps)],
                cwd=checkout,
                env={**os.environ, "PYTHONPATH": str(Path(checkout).absolute())},
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode:
                sys.exit(f"{checkout} failed:\n{result.stderr[-3000:]}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"round {round_} {checkout}: input {figures['batch_ms']:.1f} ms/batch, "
                f"training {figures['steps_per_sec']:.2f} steps/s, "
                f"evaluation {figures['evaluate_s']:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
