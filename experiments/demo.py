"""The end-to-end demo: runs every stage that exists, small enough for a laptop CPU.

Stages: a tiny byte-level GPT learning addition (``experiments/lm/tiny_lm.py``), a small CLIP
trained contrastively and scored zero-shot (``experiments/clip/tiny_clip.py``), a dVAE that
turns scene images into 8x8 tokens (``experiments/dvae/train_dvae.py``), the DALL-E
transformer generating scenes from captions with the dVAE's tokens and CLIP's reranking
(``experiments/dalle/train_dalle.py``) and unCLIP, a diffusion prior and decoder on the CLIP
stage's embeddings, judged on the DALL-E stage's test captions beside it
(``experiments/unclip/train_unclip.py``), and InstructGPT: a byte-level GPT pretrained, fine-tuned
on demonstrations, a reward model on rankings and PPO / PPO-ptx against it, judged by the gold
scorers (``experiments/instructgpt/train_instructgpt.py``). Each stage writes into
``<workdir>/<stage>``; a second run resumes from the stages' checkpoints.

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
for stage_dir in ("lm", "clip", "dvae", "dalle", "unclip", "instructgpt"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / stage_dir))
import tiny_clip  # noqa: E402
import tiny_lm  # noqa: E402
import train_dalle  # noqa: E402
import train_dvae  # noqa: E402
import train_instructgpt  # noqa: E402
import train_unclip  # noqa: E402


def lm_config() -> ml_collections.ConfigDict:
    config = tiny_lm.get_config()
    config.train.steps = 6000  # ~1 min on 2 CPU cores: loss ~1.1, most sums right
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    return config


def clip_config() -> ml_collections.ConfigDict:
    return tiny_clip.get_config()  # 2,200 steps: 224 s on 2 quiet cores with evaluation


def dvae_config() -> ml_collections.ConfigDict:
    return train_dvae.get_config()


def dalle_config() -> ml_collections.ConfigDict:
    config = train_dalle.get_config()  # its dVAE and CLIP: the stages' runs in this workdir
    config.train.update(dict(steps=1200, checkpoint_every=400))
    config.eval.captions = 100
    return config


def unclip_config() -> ml_collections.ConfigDict:
    config = train_unclip.get_config()  # its CLIP (and DALL-E): the stages' runs in this workdir
    # 2,179 s on the 2 cores shared at load 9-12 (2026-11-30; ~0.4 s per decoder update when
    # quiet, 3 s then): prior cos 0.926 (text baseline 0.869), decoder round trip 0.78, judge 5%.
    config.prior.train.update(dict(steps=500, checkpoint_every=500))
    config.decoder.train.update(dict(steps=500, checkpoint_every=500))
    # The dalle stage's 100 test captions; the standalone experiment sweeps the samplers.
    config.eval.update(dict(scenes=100, sweep=""))
    return config


def instructgpt_config() -> ml_collections.ConfigDict:
    # The experiment's defaults (pretrain 1,000, SFT 2,500, PPO and PPO-ptx 300 iterations each)
    # with half the reward model's steps and comparisons, to stay within 6 minutes: 352 s on 2
    # quiet cores (2026-11-30).
    config = train_instructgpt.get_config()
    config.rm.steps, config.data.comparisons = 2_400, 16_000
    config.gold_reward_run = False  # the experiment's ceiling run, ~40 s more
    return config


def _lm_summary(report: dict) -> str:
    first, final = report["first_logged_loss"], report["final_loss"]
    return (
        f"loss {first['loss']:.3f} at step {first['step']} -> {final['loss']:.3f} at step "
        f"{final['step']}; exact-match accuracy {report['accuracy']:.1%} on {report['prompts']} "
        "held-out prompts"
    )


def _clip_summary(report: dict) -> str:
    return "\n".join(tiny_clip.summary_lines(report))


_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
_STAGES = flags.DEFINE_list(
    "stages",
    ["lm", "clip", "dvae", "dalle", "unclip", "instructgpt"],
    "Which stages to run, in order.",
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
    "unclip": (
        train_unclip.run,
        config_flags.DEFINE_config_dict("unclip", unclip_config()),
        train_unclip.summary,
    ),
    "instructgpt": (
        train_instructgpt.run,
        config_flags.DEFINE_config_dict("instructgpt", instructgpt_config()),
        train_instructgpt.summary,
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
        if name == "unclip":  # the CLIP stage's embeddings; beside DALL-E when its stage exists
            config.value.clip_workdir = config.value.clip_workdir or str(workdir / "clip")
            if config.value.dalle_workdir is None and (workdir / "dalle" / "checkpoints").is_dir():
                config.value.dalle_workdir = str(workdir / "dalle")
        print(f"\n== stage {name} ==", flush=True)
        start = time.perf_counter()
        report = run(config.value, workdir / name)
        summaries[name] = (summary(report), time.perf_counter() - start)

    print("\n== outputs ==")
    for name, (line, seconds) in summaries.items():
        stage_dir = workdir / name
        print(f"  {name} ({seconds:.0f} s): {line}")
        print(f"    report {stage_dir / 'report.json'}")
        # One run per stage; unclip trains two, in <stage>/prior and <stage>/decoder.
        for checkpoints in sorted(stage_dir.glob("**/checkpoints")):
            steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
            print(
                f"    checkpoints {checkpoints} (steps {', '.join(map(str, steps))}); metrics "
                f"{checkpoints.parent / 'metrics.jsonl'}"
            )
        for png in sorted(stage_dir.glob("*.png")):
            print(f"    PNG {png}")  # image grids; instructgpt's curves
    print(f"  view the curves: tensorboard --logdir {workdir}")


if __name__ == "__main__":
    app.run(main)
