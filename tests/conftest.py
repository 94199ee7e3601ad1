"""Test set-up: 8 emulated CPU devices and LLVM at -O0 (set before jax is imported), one XLA
compilation cache for the run, and shared fixtures."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

# The suite's programs are small, so compiling them costs more than running them: at -O0 five of
# the slowest test files took 667 s of worker time against 894 s at XLA's default -O2 (the
# contrastive training runs, bound by execution, 163 s against 113 s); every test passes at both.
# The commands the tests run as a user does (tests.helpers.jaxaigc) keep XLA's default.
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
# One persistent compilation cache for the whole run, made by the first process (pytest, or
# xdist's controller) and inherited by the workers and the commands the tests start: a program
# compiled again (a subcommand on the quick demo's runs, a model in several tests) is read back.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxaigc-xla-")
# Likewise one folder for the runs every worker reads (the quick demo), trained by the first
# worker that needs them while the others wait on its lock.
_OWN_SHARED = None
if "JAXAIGC_TEST_SHARED" not in os.environ:
    _OWN_SHARED = os.environ["JAXAIGC_TEST_SHARED"] = tempfile.mkdtemp(prefix="jaxaigc-runs-")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxaigc import parallel  # noqa: E402
from tests.helpers import jaxaigc, succeeded  # noqa: E402


def pytest_unconfigure(config):
    for own in (_OWN_CACHE, _OWN_SHARED):
        if own:
            shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session")
def devices():
    if len(jax.devices()) < 8:
        pytest.fail("the tests need 8 emulated devices: XLA_FLAGS was set after jax was imported")
    return jax.devices()


@pytest.fixture(scope="session")
def mesh_2x2x2(devices):
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices)


@pytest.fixture(scope="session")
def mesh_1(devices):
    return parallel.make_mesh({"data": 1}, devices=devices[:1])


@pytest.fixture(scope="session")
def quick_demo():
    """``jaxaigc demo --quick``'s workdir: every stage trained at a few steps and evaluated, once
    for all workers. Its readers must not change it; one that changes a run works on a copy."""
    shared = Path(os.environ["JAXAIGC_TEST_SHARED"])
    workdir, done = shared / "quick_demo", shared / "quick_demo.done"
    with open(shared / "quick_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt's remains
            succeeded(jaxaigc("demo", "--quick", "--workdir", workdir, timeout=2400))
            done.touch()
    return workdir
