"""Kill, preempt and resume a training process: the result must be bit-identical."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("lm_worker.py")
ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def run_worker(workdir, *args, expect=0):
    result = subprocess.run(
        [sys.executable, str(WORKER), "--workdir", str(workdir), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(workdir):
    with np.load(Path(workdir) / "final.npz") as f:
        return {k: f[k] for k in f.files}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_worker(workdir)
    return workdir


def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run_worker(tmp_path, "--kill-at", 13, expect=-9)
    assert not (tmp_path / "final.npz").exists()
    resumed = run_worker(tmp_path)
    # Step 10's asynchronous save may not have finished when the process died: then step 5 is
    # the latest complete checkpoint, and the unfinished one must be ignored.
    start = int(re.search(r"resumed from step (\d+)", resumed.stdout).group(1))
    assert start in (5, 10)
    assert_bit_identical(load(tmp_path), load(uninterrupted))
    # One compilation of the step per process, none after it: also after the resume.
    for workdir in (uninterrupted, tmp_path):
        counts = json.loads((workdir / "compiles.json").read_text())
        assert counts["total"] == 1 and counts["after_first_step"] == 0, counts
    assert json.loads((tmp_path / "compiles.json").read_text())["first_step"] == start + 1


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
    # The signal arrives during step 12's hooks; the loop stops at the end of the next step.
    result = run_worker(tmp_path, "--sigterm-at", 12)
    assert "SIGTERM: saved step 13 and stopped" in result.stdout
    assert (tmp_path / "checkpoints" / "13").is_dir()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 10
    resumed = run_worker(tmp_path)
    assert "resumed from step 13" in resumed.stdout
    assert_bit_identical(load(tmp_path), load(uninterrupted))
