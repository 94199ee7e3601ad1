"""One InstructGPT stage trained again with other settings from a finished run's earlier stages,
judged as the evaluation judges it: how the recipe's RM and PPO schedules were chosen.

    python experiments/repro/instructgpt_stage_trial.py rm RUN OUT --config.rm.steps=1800
    python experiments/repro/instructgpt_stage_trial.py ppo RUN OUT --config.ppo.steps=75 \
        --config.ppo.peak_lr=2e-4
    python experiments/repro/instructgpt_stage_trial.py ppo_ptx RUN OUT --config.ppo.steps=75

RUN is an ``instructgpt`` run (``jaxaigc train instructgpt``) whose SFT and RM stages are trained;
the overrides apply to its saved config. ``rm`` trains a reward model from RUN's SFT policy in OUT
and prints its pairwise agreement with the gold order on new comparisons of the RL tasks, their
held-out template, rankings of SFT samples and the hard tasks (as the report).
``ppo`` / ``ppo_ptx`` train from RUN's SFT policy and normalised reward model and print, per split
of the held-out prompts, the gold of samples and the win-rate over SFT's samples (ties half) with
the gold difference's 95% interval, KL to SFT, best-of-n beside it, and the pretraining NLL.
"""

import argparse
import json
import time
from pathlib import Path

from jaxaigc.cli import apply_overrides
from jaxaigc.configs.stages import stage_dir
from jaxaigc.evaluate.instructgpt import (
    pretraining_nlls,
    reward_model_accuracies,
    sampled_figures,
)
from jaxaigc.run import saved_config
from jaxaigc.systems import instructgpt as ig
from jaxaigc.train import loop


def reward_model_trial(config, run: Path, out: Path) -> dict:
    sft = ig.load_policy_params(stage_dir(config, run, "sft"), ppo=False)
    stage = ig.stage_config(config, "rm")
    task, batches = ig.build_rm(stage, sft)
    rm = loop.train(task, batches, stage, out).params
    return reward_model_accuracies(config, rm, sft)


def ppo_trial(config, stage_name: str, run: Path, out: Path) -> dict:
    sft = ig.load_policy_params(stage_dir(config, run, "sft"), ppo=False)
    rm = ig.load_reward_model(config, run)
    stage = ig.ppo_stage_config(config, stage_name)
    task, batches = ig.build_ppo(stage, sft, rm)
    policy = loop.train(task, batches, stage, out).params["policy"]
    report = {
        split: sampled_figures(config, {"sft": sft, stage_name: policy}, sft, rm, prompts)
        for split, prompts in ig.evaluation_prompts(config).items()
    }
    report["pretraining_nll"] = pretraining_nlls(config, {"sft": sft, stage_name: policy})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("rm", "ppo", "ppo_ptx"))
    parser.add_argument("run", type=Path, help="a finished instructgpt run")
    parser.add_argument("out", type=Path, help="where the trial's stage trains (resumes)")
    args, overrides = parser.parse_known_args()
    recipe, saved = saved_config(args.run)
    if recipe != "instructgpt":
        parser.error(f"{args.run} is a {recipe} run, not an instructgpt one")
    config = apply_overrides(saved, "config", overrides)
    start = time.perf_counter()
    if args.stage == "rm":
        report = reward_model_trial(config, args.run, args.out)
    else:
        report = ppo_trial(config, args.stage, args.run, args.out)
    report["seconds"] = time.perf_counter() - start
    report["overrides"] = overrides
    text = json.dumps(report, indent=1)
    (args.out / "trial.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
