"""The end-to-end demo: runs every stage that exists, small enough for a laptop CPU.

Stages: a tiny byte-level GPT learning addition (``experiments/lm/tiny_lm.py``), a small CLIP
trained contrastively and scored zero-shot (``experiments/clip/tiny_clip.py``), a dVAE that
turns scene images into 8x8 tokens (``experiments/dvae/train_dvae.py``) and the DALL-E
transformer generating scenes from captions with the dVAE's tokens and CLIP's reranking
(``experiments/dalle/train_dalle.py``). Each stage writes into ``<workdir>/<stage>``; a second
run resumes from the stages' checkpoints.

    python experiments/demo.py --workdir runs/demo [--stages lm,clip --clip.train.steps=400 ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxaigc.cli import join_distributed

# experiments/ is not a package: the stages are scripts beside this file.
for stage_dir in ("lm", "clip", "dvae", "dalle"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / stage_dir))
import tiny_clip  # noqa: E402
import tiny_lm  # noqa: E402
import train_dalle  # noqa: E402
import train_dvae  # noqa: E402


def lm_config() -> ml_collections.ConfigDict:
    config = tiny_lm.get_config()
    config.train.steps = 6000  # ~1 min on 2 CPU cores: loss ~1.1, most sums right
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    return config


def clip_config() -> ml_collections.ConfigDict:
    config = tiny_clip.get_config()
    config.train.steps = 800  # ~5 min on 2 CPU cores: Fashion-MNIST zero-shot top-1 ~83%
    return config


def dvae_config() -> ml_collections.ConfigDict:
    return train_dvae.get_config()


def dalle_config() -> ml_collections.ConfigDict:
    config = train_dalle.get_config()  # its dVAE and CLIP: the stages' runs in this workdir
    config.train.update(dict(steps=1200, checkpoint_every=400))
    config.eval.captions = 100
    return config


def _lm_summary(report: dict) -> str:
    first, final = report["first_logged_loss"], report["final_loss"]
    return (
        f"loss {first['loss']:.3f} at step {first['step']} -> {final['loss']:.3f} at step "
        f"{final['step']}; exact-match accuracy {report['accuracy']:.1%} on {report['prompts']} "
        "held-out prompts"
    )


def _clip_summary(report: dict) -> str:
    zs, emoji = report["fashion_mnist_zero_shot"], report["emoji_test"]
    return (
        f"Fashion-MNIST zero-shot top-1 {zs['top1']:.1%} (chance 10%); held-out emoji "
        f"image->text R@1 {emoji['image_to_text_R@1']:.1%} (chance {emoji['chance_R@1']:.1%})"
    )


_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
_STAGES = flags.DEFINE_list(
    "stages", ["lm", "clip", "dvae", "dalle"], "Which stages to run, in order."
)
STAGES = {
    "lm": (tiny_lm.run, config_flags.DEFINE_config_dict("lm", lm_config()), _lm_summary),
    "clip": (tiny_clip.run, config_flags.DEFINE_config_dict("clip", clip_config()), _clip_summary),
    "dvae": (
        train_dvae.run,
        config_flags.DEFINE_config_dict("dvae", dvae_config()),
        train_dvae.summary,
    ),
    "dalle": (
        train_dalle.run,
        config_flags.DEFINE_config_dict("dalle", dalle_config()),
        train_dalle.summary,
    ),
}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = set(_STAGES.value) - set(STAGES)
    if unknown:
        raise app.UsageError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    join_distributed()  # one process per host on pods and clusters
    workdir = Path(_WORKDIR.value)
    summaries = {}
    for name in _STAGES.value:
        run, config, summary = STAGES[name]
        if name == "dalle":  # DALL-E models the dVAE stage's tokens, reranked by the CLIP stage
            config.value.dvae_workdir = config.value.dvae_workdir or str(workdir / "dvae")
            config.value.clip_workdir = config.value.clip_workdir or str(workdir / "clip")
        print(f"\n== stage {name} ==", flush=True)
        start = time.perf_counter()
        report = run(config.value, workdir / name)
        summaries[name] = (summary(report), time.perf_counter() - start)

    print("\n== outputs ==")
    for name, (line, seconds) in summaries.items():
        stage_dir = workdir / name
        steps = sorted(
            int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit()
        )
        print(f"  {name} ({seconds:.0f} s): {line}")
        print(f"    report {stage_dir / 'report.json'}; metrics {stage_dir / 'metrics.jsonl'}")
        print(f"    checkpoints {stage_dir / 'checkpoints'} (steps {', '.join(map(str, steps))})")
        for png in sorted(stage_dir.glob("*.png")):
            print(f"    image grid {png}")
    print(f"  view the curves: tensorboard --logdir {workdir}")


if __name__ == "__main__":
    app.run(main)
