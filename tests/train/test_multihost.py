"""Real multi-process runs on localhost (``python -m jaxaigc.launch``, gloo collectives).

The same global batches and mesh train identically on 1 process x 8 devices and 2 processes x 4,
and checkpoints move between process counts, after a SIGKILL or a SIGTERM, at the next batch.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import max_relative_difference
from tests.train.test_resume import WORKER, assert_bit_identical, load

ROOT = Path(__file__).parents[2]
LAUNCHER = ["-m", "jaxaigc.launch"]

STEPS = 12  # checkpoints at 4, 8 and 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs here compile the same programs: JAX's persistent cache compiles each once (a
    one-process run then takes 6 s instead of 20 s here)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield


def run_worker(workdir, processes, *args, expect=0):
    """The LM worker as ``processes`` processes sharing 8 CPU devices; returns its stdout."""
    args = ["--steps", STEPS, "--checkpoint-every", 4, *args]
    worker = [str(WORKER), "--workdir", str(workdir), *map(str, args)]
    if processes > 1:
        launcher = [*LAUNCHER, str(processes), "--devices_per_process", str(8 // processes), "--"]
        worker = launcher + worker
    result = subprocess.run(
        [sys.executable, *worker], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def losses(workdir):
    return {int(k): v for k, v in json.loads((Path(workdir) / "losses.json").read_text()).items()}


def resumed_from(stdout):
    return int(re.search(r"resumed from step (\d+)", stdout).group(1))


def preempted_at(stdout, processes):
    """The step every process saved on SIGTERM (they must agree)."""
    steps = re.findall(r"SIGTERM: saved step (\d+) and stopped", stdout)
    assert len(steps) == processes and len(set(steps)) == 1, stdout[-3000:]
    return int(steps[0])


def assert_close(workdir, reference, steps):
    ours, theirs = losses(workdir), losses(reference)
    assert sorted(ours) == list(steps)
    np.testing.assert_allclose([ours[s] for s in steps], [theirs[s] for s in steps], rtol=1e-5)
    assert max_relative_difference(load(workdir), load(reference)) <= 1e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_process")
    run_worker(workdir, 1)
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    run_worker(workdir, 2)
    return workdir


def test_two_processes_train_as_one(one_process, two_processes):
    assert_close(two_processes, one_process, range(1, STEPS + 1))
    counts = json.loads((two_processes / "compiles.json").read_text())
    assert counts["total"] == 1 and counts["after_first_step"] == 0, counts


def test_sigkill_of_one_process_then_restart_of_both(two_processes, tmp_path):
    # Process 1 dies at step 9; the launcher then kills process 0 (128 + SIGKILL).
    run_worker(tmp_path, 2, "--kill-at", 9, "--signal-process", 1, expect=137)
    assert not (tmp_path / "final.npz").exists()
    start = resumed_from(run_worker(tmp_path, 2))
    assert start in (4, 8)  # the newest save that had finished
    assert_bit_identical(load(tmp_path), load(two_processes))
    assert sorted(losses(tmp_path)) == list(range(start + 1, STEPS + 1))


def test_checkpoints_move_between_one_and_two_processes(one_process, tmp_path):
    # The 1-process run's checkpoint of step 4, resumed by 2 processes. SIGTERM reaches process 1
    # alone, after step 5; both save the same step and exit 0.
    shutil.copytree(one_process / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
    stdout = run_worker(tmp_path, 2, "--sigterm-at", 5, "--signal-process", 1)
    assert resumed_from(stdout) == 4
    stop = preempted_at(stdout, 2)
    assert 6 <= stop <= STEPS and (tmp_path / "checkpoints" / str(stop)).is_dir()
    middle = losses(tmp_path)
    assert sorted(middle) == list(range(5, stop + 1))
    reference = losses(one_process)
    np.testing.assert_allclose(list(middle.values()), [reference[s] for s in middle], rtol=1e-5)
    # 1 process resumes the 2-process checkpoint and finishes the run.
    assert resumed_from(run_worker(tmp_path, 1)) == stop
    assert_close(tmp_path, one_process, range(stop + 1, STEPS + 1))


def test_clip_run_evaluates_parameters_sharded_over_two_processes(tmp_path):
    """Each process evaluates the CLIP trained with fsdp over both processes: the checkpoint's
    shards load whole onto each process's own device."""
    config = {
        "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 2, "data.shapes": 200,
        "eval.fashion_mnist": 50, "eval.shapes": 50, "eval.shape_scenes": 50,
        "eval.batch_size": 256, "mesh.shape.data": 1, "mesh.shape.fsdp": -1,
    }  # fmt: skip
    args = [f"--config.{key}={value}" for key, value in config.items()]
    command = [*LAUNCHER, "2", "--devices_per_process", "1", "--", "-m", "jaxaigc", "train"]
    command += ["clip", "--quick"]
    result = subprocess.run(
        [sys.executable, *command, "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final_loss"]["step"] == 2 and report["shapes_test"]["n"] == 50
