"""The end-to-end demo: runs every stage that exists, small enough for a laptop CPU.

Stages so far: the tiny byte-level GPT learning addition (``experiments/lm/tiny_lm.py``), about two
minutes on two CPU cores. Each stage writes into ``<workdir>/<stage>``; a second run resumes from
the stages' checkpoints.

    python experiments/demo.py --workdir runs/demo [--lm.train.steps=1000 ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# experiments/ is not a package: the stages are scripts beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent / "lm"))
import tiny_lm  # noqa: E402


def lm_config() -> ml_collections.ConfigDict:
    config = tiny_lm.get_config()
    config.train.steps = 6000  # ~80 s on 2 CPU cores: loss ~1.1, most sums right
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    return config


_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
_LM = config_flags.DEFINE_config_dict("lm", lm_config(), "Config of the language-model stage.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value)
    start = time.perf_counter()

    print("== stage lm: tiny byte-level GPT on a+b=c ==", flush=True)
    lm_dir = workdir / "lm"
    report = tiny_lm.run(_LM.value, lm_dir)

    print(f"\n== outputs ({time.perf_counter() - start:.0f} s) ==")
    steps = sorted(int(p.name) for p in (lm_dir / "checkpoints").iterdir() if p.name.isdigit())
    for name, path, note in [
        ("metrics", lm_dir / "metrics.jsonl", ""),
        ("tensorboard", lm_dir / "tensorboard", ""),
        ("checkpoints", lm_dir / "checkpoints", f"  (steps {', '.join(map(str, steps))})"),
        ("report", lm_dir / "report.json", ""),
    ]:
        print(f"  {name:<12} {path}{note}")
    first, final = report["first_logged_loss"], report["final_loss"]
    print(
        f"  lm: loss {first['loss']:.3f} at step {first['step']} -> {final['loss']:.3f} at step "
        f"{final['step']}; exact-match accuracy {report['accuracy']:.1%} "
        f"on {report['prompts']} held-out prompts"
    )
    print(f"  view the curves: tensorboard --logdir {workdir}")


if __name__ == "__main__":
    app.run(main)
