"""The ``jaxaigc`` command: every subcommand answers ``--help``, bad input is refused with a named
error before anything compiles, and nothing starts the JAX backend before a run can join a
multi-process job. The subcommands on trained runs: tests/test_demo.py."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxaigc import cli

ROOT = Path(__file__).parents[1]
SUBCOMMANDS = (
    "demo",
    "train",
    "eval",
    "generate",
    "zero-shot",
    "respond",
    "convert",
    "plan",
    "bench",
)


def jaxaigc(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxaigc", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def test_help_lists_every_subcommand():
    result = jaxaigc("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([name, "--help"])
    assert exit.value.code == 0 and "usage: jaxaigc " + name in capsys.readouterr().out


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "clipp", "--workdir", "w"], "unknown recipe 'clipp'; known: lm, clip, dvae"),
        (["train", "lm", "--workdir", "w", "--config.train.stepz=3"], "bad override"),
        (["train", "lm", "--workdir", "w", "--steps=3"], "unexpected argument '--steps=3'"),
        (["demo", "--stages", "lm,gan"], "unknown stages ['gan']; known: lm, clip"),
        (["demo", "--stages", "lm", "--clip.train.steps=3"], "unexpected arguments"),
        (["eval", "no/such/run"], "run directory 'no/such/run' is not a directory"),
        (["generate", "no/such/run", "a cat"], "is not a directory"),
        (["zero-shot", ".", "missing.png", "--labels", "a,b"], "no such image file(s)"),
        (["zero-shot", ".", "x.png", "--labels", "a"], "give at least two labels"),
        (["respond", "no/such/run", "hi"], "is not a directory"),
        (["convert", "clip", "missing.pt", "out"], "no such checkpoint file: missing.pt"),
        (["bench", "nope"], "unknown benchmark 'nope'; known: clip, clip_stage"),
        (["eval", "."], "is not a run directory"),
    ],
)
def test_bad_input_is_a_named_usage_error(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_eval_of_a_directory_without_a_run_names_the_file(tmp_path, capsys):
    assert "recipe.json does not exist" in usage_error(["eval", str(tmp_path)], capsys)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=0), "--num_processes=0: needs at least 1"),
        (dict(num_processes=2, process_id=2), r"--process_id=2: must be in \[0, --num_processes"),
        (dict(process_id=-1), r"--process_id=-1: must be in \[0, --num_processes=None\)"),
    ],
)
def test_bad_process_flags_are_usage_errors(kwargs, message):
    with pytest.raises(cli.UsageError, match=message):
        cli.join_distributed("localhost:1", **kwargs)
    assert not jax.distributed.is_initialized()


def test_without_flags_or_cluster_the_run_is_one_process():
    cli.join_distributed()
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_overrides_are_typed_as_the_field():
    config = cli.apply_overrides(
        cli_config(), "config", ["--config.train.steps=7", "--config.optim.peak_lr=0.5"]
    )
    assert config.train.steps == 7 and config.optim.peak_lr == 0.5


def test_a_saved_runs_unset_fields_stay_settable(tmp_path):
    from jaxaigc import run
    from jaxaigc.configs.saved import load_run, save_run

    save_run(tmp_path, "dvae", run.get_config("dvae").to_dict())
    _, plain = load_run(tmp_path)
    assert plain.data.data_dir is None  # JSON's null: no override could set it
    override = ["--config.data.data_dir=/data/tfds"]
    with pytest.raises(cli.UsageError, match="data_dir"):
        cli.apply_overrides(plain, "config", override)
    _, saved = run.saved_config(tmp_path)
    config = cli.apply_overrides(saved, "config", override)
    assert config.data.data_dir == "/data/tfds"
    assert config.to_dict() == {**plain.to_dict(), "data": config.data.to_dict()}
    assert run.saved_config(tmp_path)[1].to_dict() == plain.to_dict()  # unset stays None


def cli_config():
    from jaxaigc.configs import lm

    return lm.get_config()


def test_nothing_starts_the_backend_before_joining():
    # jax.distributed.initialize must come before the backend starts: the command, every recipe
    # and every config (what `jaxaigc train` builds before joining) must not start it.
    code = (
        "from jaxaigc import cli, run, jax_internals\n"
        "for name in run.RECIPES: run.get_config(name)\n"
        "print(jax_internals.backends_are_initialized())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.stdout.strip() == "False", result.stderr[-3000:]
