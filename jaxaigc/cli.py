"""The ``jaxaigc`` command: ``jaxaigc SUBCOMMAND --help`` says what each one takes.

    jaxaigc demo [--quick] [--stages lm,clip] [--workdir runs/demo] [--clip.train.steps=400]
    jaxaigc train RECIPE --workdir DIR [--quick] [--config.train.steps=100 ...]
    jaxaigc eval WORKDIR [--config.stages.clip=OTHER_CLIP ...]
    jaxaigc generate WORKDIR "a red circle" ... [--n 16] [--seed 0] [--out grid.png]
                     [--prior PRIOR_RUN]
    jaxaigc zero-shot CLIP IMAGE ... --labels cat,dog [--templates "a photo of a {}."]
    jaxaigc respond WORKDIR "prompt" ... [--temperature 0] [--max-tokens 64]
    jaxaigc convert {clip,dvae,gpt2,karlo} SRC DEST
    jaxaigc plan RECIPE_OR_PRESET --devices N [--mesh fsdp=N] [--batch B] [--chip tpu-v5e]
                 [--sample]
    jaxaigc bench NAME [ARGS ...]

Inputs (recipe names, paths, images, overrides) are checked before anything compiles. A run of
several processes (pods, clusters) takes ``--coordinator_address``, ``--num_processes`` and
``--process_id`` where JAX cannot find them itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

DEMO_STAGES = ("lm", "clip", "dvae", "dalle", "unclip", "instructgpt")
BENCH_DIR = Path(__file__).resolve().parents[1] / "experiments" / "bench"


class UsageError(ValueError):
    """Bad command-line input: printed as ``jaxaigc: error: ...`` with exit status 2."""


def join_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the multi-process run these describe or the cluster provides (see
    :func:`jaxaigc.parallel.initialize_distributed`); call it before anything touches a device."""
    from jaxaigc import parallel

    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num_processes={num_processes}: needs at least 1")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise UsageError(
            f"--process_id={process_id}: must be in [0, --num_processes={num_processes})"
        )
    given = dict(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    parallel.initialize_distributed(**{k: v for k, v in given.items() if v is not None})


def apply_overrides(
    config: ml_collections.ConfigDict, name: str, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """``config`` with ``--<name>.a.b=value`` overrides applied (typed as the field is).

    Raises:
      UsageError: an argument that is not such an override, or a field the config lacks.
    """
    for arg in overrides:
        if not arg.startswith(f"--{name}."):
            raise UsageError(f"unexpected argument {arg!r}; overrides look like --{name}.a.b=1")
    argv = ["jaxaigc", *overrides]
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(name, config, flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        cause = error
        while isinstance(cause, BaseException) and cause.args:  # ConfigDict nests its KeyError
            cause = cause.args[0]
        raise UsageError(f"bad override in {overrides}: {cause}".replace("\n", "; ")) from error
    return flag_values[name].value


def _add_distributed(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (JAX finds them on TPU pods and SLURM)")
    group.add_argument("--coordinator_address", help="host:port of process 0")
    group.add_argument("--num_processes", type=int, help="processes in the run")
    group.add_argument("--process_id", type=int, help="this process's index, from 0")


def _join(args: argparse.Namespace) -> None:
    join_distributed(args.coordinator_address, args.num_processes, args.process_id)


def _print_report(report: dict, workdir: Path) -> None:
    from jaxaigc.evaluate.report import format_figure

    print(f"{report.get('title', report['system'])} ({workdir})")
    for figure in report["figures"]:
        print(f"  {format_figure(figure)}")
    print(f"  report: {workdir / 'report.html'}")


def _existing_dir(path: str, what: str) -> Path:
    if not Path(path).is_dir():
        raise UsageError(f"{what} {path!r} is not a directory")
    return Path(path)


def _recipe_of(workdir: str) -> str:
    from jaxaigc.configs.saved import load_run

    _existing_dir(workdir, "run directory")
    try:
        return load_run(workdir)[0]
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import run

    if args.recipe not in run.RECIPES:
        raise UsageError(f"unknown recipe {args.recipe!r}; known: {', '.join(run.RECIPES)}")
    config = apply_overrides(run.get_config(args.recipe, quick=args.quick), "config", extra)
    _join(args)
    workdir = Path(args.workdir)
    _print_report(run.train_and_evaluate(args.recipe, config, workdir), workdir)


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import run
    from jaxaigc.evaluate.report import write_demo_report

    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in DEMO_STAGES]
    if unknown:
        raise UsageError(f"unknown stages {unknown}; known: {', '.join(DEMO_STAGES)}")
    configs = {}
    for stage in stages:
        mine = [a for a in extra if a.startswith(f"--{stage}.")]
        configs[stage] = apply_overrides(run.get_config(stage, quick=args.quick), stage, mine)
    strays = [a for a in extra if not any(a.startswith(f"--{s}.") for s in stages)]
    if strays:
        raise UsageError(f"unexpected arguments {strays}; overrides look like --clip.train.steps=5")
    _join(args)
    workdir = Path(args.workdir)
    for stage in stages:
        print(f"\n== stage {stage} ==", flush=True)
        start = time.perf_counter()
        report = run.train_and_evaluate(stage, configs[stage], workdir / stage)
        _print_report(report, workdir / stage)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    import jax

    if jax.process_index() == 0:
        page = write_demo_report(workdir, DEMO_STAGES)
        print(f"\nthe demo's report: {page}\nthe curves: tensorboard --logdir {workdir}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import run

    _recipe_of(args.workdir)
    workdir = Path(args.workdir)
    _, saved = run.saved_config(workdir)
    config = apply_overrides(saved, "config", extra) if extra else None
    _join(args)
    _print_report(run.evaluate_run(workdir, config=config), workdir)


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import pipelines
    from jaxaigc.evaluate.grids import write_grid

    if args.n < 1:
        raise UsageError(f"--n={args.n}: needs at least 1")
    recipe = _recipe_of(args.workdir)
    if recipe == "unclip-prior-1b":
        raise UsageError(
            f"{args.workdir} is a full-size unCLIP prior: generate with its decoder run, "
            f"`jaxaigc generate DECODER_RUN --prior {args.workdir} ...`"
        )
    if args.prior is not None:
        if recipe != "unclip-decoder-3.5b":
            raise UsageError(f"--prior goes with an unclip-decoder-3.5b run, not a {recipe} one")
        _existing_dir(args.prior, "prior run directory")
    if recipe not in ("dalle", "unclip", "dalle-12b", "unclip-decoder-3.5b"):
        raise UsageError(
            f"{args.workdir} is a {recipe} run; generate takes a dalle, dalle-12b, unclip or "
            "unclip-decoder-3.5b run"
        )
    _join(args)
    pipe = pipelines.load(args.workdir, prior=args.prior)
    out = Path(args.out or Path(args.workdir) / "generated.png")
    result = pipe(args.captions, n=args.n, seed=args.seed)
    write_grid(out, result.images, captions=args.captions, scale=args.scale)
    for caption, scores in zip(args.captions, result.scores, strict=True):
        print(f"{caption!r}: reranking scores, best first: {np.round(scores, 3).tolist()}")
    print(out)


def cmd_zero_shot(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import pipelines

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise UsageError(f"--labels={args.labels!r}: give at least two labels, comma-separated")
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise UsageError(f"no such image file(s): {missing}")
    if _recipe_of(args.clip) != "clip":
        raise UsageError(f"{args.clip} is not a CLIP run or converted CLIP checkpoint")
    clip = pipelines.load_clip(args.clip)
    images = pipelines.read_images(args.images, size=clip.image_size)
    templates = tuple(args.templates) if args.templates else None
    probs = clip.classify(images, labels, templates=templates)
    for path, row in zip(args.images, probs, strict=True):
        best = np.argsort(-row)[: args.top]
        print(f"{path}: " + ", ".join(f"{labels[i]} {row[i]:.1%}" for i in best))


def cmd_respond(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc import pipelines

    if args.max_tokens < 1 or args.temperature < 0:
        raise UsageError("--max-tokens must be >= 1 and --temperature >= 0")
    recipe = _recipe_of(args.workdir)
    if recipe in ("instructgpt", "instructgpt-gpt2"):
        model = pipelines.load_policy(args.workdir, args.policy)
    elif recipe == "gpt2":
        model = pipelines.load_language_model(args.workdir)
    else:
        raise UsageError(f"{args.workdir} is a {recipe} run, not an instructgpt or converted gpt2")
    responses = model.respond(
        args.prompts, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    for prompt, response in zip(args.prompts, responses, strict=True):
        print(f"{prompt}\n-> {response}")


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> None:
    from jaxaigc.convert.checkpoints import convert

    if args.kind == "karlo":
        if not Path(args.src).is_dir():
            raise UsageError(f"no such folder: {args.src} (karlo converts a diffusers folder)")
    elif not Path(args.src).is_file():
        raise UsageError(f"no such checkpoint file: {args.src}")
    if Path(args.dest).exists() and any(Path(args.dest).iterdir()):
        raise UsageError(f"{args.dest} exists and is not empty; choose a new directory")
    try:
        print(convert(args.kind, args.src, args.dest, trust_pickle=args.trust_pickle))
    except (FileNotFoundError, ValueError) as error:  # a file it needs beside it; a mismatch
        raise UsageError(str(error)) from error


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> None:
    import json

    import jax

    from jaxaigc import plan

    if args.target not in plan.TARGETS:
        raise UsageError(
            f"unknown recipe or preset {args.target!r}; known: {', '.join(plan.TARGETS)}"
        )
    if args.chip is not None and args.chip not in plan.CHIPS:
        raise UsageError(f"unknown chip {args.chip!r}; known: {', '.join(plan.CHIPS)}")
    if args.devices < 1 or (args.batch is not None and args.batch < 1) or args.accum < 1:
        raise UsageError("--devices, --batch and --accum must be positive")
    try:
        if args.mesh:
            plan.parse_mesh(args.mesh, args.devices)
    except ValueError as error:
        raise UsageError(str(error)) from error
    from jaxaigc.jax_internals import backends_are_initialized

    # The pod's devices, emulated on this host's CPU: set before anything starts the backend
    # (called in a process that already has its devices, plan uses those).
    if not backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    try:
        prepared = plan.prepare(
            args.target,
            devices=args.devices,
            mesh=args.mesh,
            batch=args.batch,
            accum=args.accum,
            chip=args.chip,
            sample=args.sample,
        )
    except ValueError as error:  # a batch that does not divide, a recipe without a sampler
        raise UsageError(str(error)) from error
    result = plan.compile_plan(prepared)
    print(json.dumps(result) if args.json else plan.format_plan(result))


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> None:
    names = sorted(p.stem for p in BENCH_DIR.glob("*.py")) if BENCH_DIR.is_dir() else []
    if not names:
        raise UsageError(f"no benchmarks in {BENCH_DIR} (they ship with the source checkout)")
    if args.name not in names:
        raise UsageError(f"unknown benchmark {args.name!r}; known: {', '.join(names)}")
    # The benchmarks are scripts (they set allocator variables before jax starts): run, not import.
    status = subprocess.call([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.args])
    raise SystemExit(status)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="jaxaigc", description="CLIP, DALL-E, DALL-E 2 and InstructGPT in JAX."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("demo", help="every stage on embedded data, then runs/demo/report.html")
    p.add_argument("--quick", action="store_true", help="every stage at a few steps (~4 min)")
    p.add_argument("--stages", default=",".join(DEMO_STAGES), help="comma-separated, in order")
    p.add_argument("--workdir", default="runs/demo")
    p.epilog = "Stage configs are overridden as --<stage>.a.b=value (e.g. --clip.train.steps=5)."
    _add_distributed(p)
    p.set_defaults(run=cmd_demo, extra=True)

    p = sub.add_parser("train", help="train a recipe (resuming), evaluate it, write its report")
    p.add_argument("recipe", help="lm, clip, dvae, dalle, unclip or instructgpt")
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    p.epilog = "The recipe's config is overridden as --config.a.b=value."
    _add_distributed(p)
    p.set_defaults(run=cmd_train, extra=True)

    p = sub.add_parser("eval", help="re-evaluate a run from its checkpoints, rewrite its report")
    p.add_argument("workdir")
    p.epilog = (
        "--config.a.b=value changes this evaluation, e.g. --config.stages.clip=DIR reranks a "
        "DALL-E run with another CLIP; the report records the config it was evaluated with."
    )
    _add_distributed(p)
    p.set_defaults(run=cmd_eval, extra=True)

    p = sub.add_parser("generate", help="images from captions with a DALL-E or unCLIP run")
    p.add_argument("workdir")
    p.add_argument("captions", nargs="+")
    p.add_argument("--n", type=int, default=16, help="candidates per caption, best first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=3, help="pixel upscaling in the grid")
    p.add_argument("--out", help="the grid's PNG path (default WORKDIR/generated.png)")
    p.add_argument(
        "--prior",
        help="with an unclip-decoder-3.5b run: the unclip-prior-1b run to sample from "
        "(default: the decoder's config.stages.prior)",
    )
    _add_distributed(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("zero-shot", help="classify images among labels with a CLIP")
    p.add_argument("clip", help="a CLIP run directory or a converted checkpoint directory")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument("--templates", action="append", help='e.g. "a photo of a {}." (repeatable)')
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(run=cmd_zero_shot)

    p = sub.add_parser(
        "respond", help="answers from an InstructGPT run's policy, or a converted GPT-2's text"
    )
    p.add_argument("workdir")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--policy", default="ppo_ptx", help="instructgpt: sft, ppo or ppo_ptx")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_respond)

    p = sub.add_parser("convert", help="a PyTorch checkpoint file -> a checkpoint jaxaigc loads")
    p.add_argument("kind", choices=("clip", "dvae", "gpt2", "karlo"))
    p.add_argument(
        "src",
        help="OpenAI CLIP .pt, DALL-E encoder.pkl, a Hugging Face GPT-2 folder's "
        "pytorch_model.bin / model.safetensors (its tokenizer files beside it), or Karlo's "
        "diffusers UnCLIPPipeline folder (or one of its component folders)",
    )
    p.add_argument("dest", help="a new directory")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="dvae: allow unpickling OpenAI's encoder.pkl/decoder.pkl (runs the files' code)",
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser(
        "plan",
        help="compile a recipe's or a preset's training step for N devices: FLOPs, memory, fit",
    )
    p.add_argument(
        "target",
        help="a recipe (lm, clip, ..., unclip.prior, or a full-size one: dalle-12b) or a preset "
        "(ViT-B/16, karlo-prior)",
    )
    p.add_argument("--devices", type=int, required=True, help="devices of the mesh (emulated)")
    p.add_argument("--mesh", help="e.g. data=2,fsdp=4 (default: the recipe's; presets fsdp=N)")
    p.add_argument("--batch", type=int, help="global batch (default: the paper's or recipe's)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation microbatches")
    p.add_argument("--chip", help="tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, h100 or h200")
    p.add_argument(
        "--sample", action="store_true", help="the sampler instead (KV-cache decoding, DDIM)"
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("bench", help="run a benchmark of experiments/bench/ with its arguments")
    p.add_argument("name", help="suite (every system, one table), clip, dalle, rlhf, ...")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its own (jaxaigc bench NAME --help)")
    p.set_defaults(run=cmd_bench)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and not getattr(args, "extra", False):
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    if "verbosity" not in os.environ.get("ABSL_FLAGS", ""):
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        args.run(args, extra)
    except UsageError as error:
        top.exit(2, f"jaxaigc: error: {error}\n")


if __name__ == "__main__":
    main()
