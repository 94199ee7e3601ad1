"""Joining a multi-process run: bad flags fail before any connection is attempted, and the
experiments can still join after being imported."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from absl import app, flags

from jaxaigc import cli

ROOT = Path(__file__).parents[1]


@pytest.fixture
def parse():
    def parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", *argv])

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_processes=0"], "--num_processes=0: needs at least 1"),
        (["--num_processes=2", "--process_id=2"], r"--process_id=2: must be in \[0, --num_pro"),
        (["--process_id=-1"], r"--process_id=-1: must be in \[0, --num_processes=None\)"),
    ],
)
def test_bad_process_flags_are_usage_errors(parse, argv, message):
    parse("--coordinator_address=localhost:1", *argv)
    with pytest.raises(app.UsageError, match=message):
        cli.join_distributed()
    assert not jax.distributed.is_initialized()


def test_without_flags_or_cluster_the_run_is_one_process(parse):
    parse()
    cli.join_distributed()
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_importing_the_experiments_leaves_the_backend_for_joining():
    # jax.distributed.initialize must come before the backend starts: importing every stage and
    # building every default config (what the demo does before joining) must not start it.
    code = (
        "import sys; sys.argv = ['demo']; sys.path.insert(0, 'experiments'); import demo; "
        "from jax._src import xla_bridge; print(xla_bridge.backends_are_initialized())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.stdout.strip() == "False", result.stderr[-3000:]
