"""Test set-up: 8 emulated CPU devices (set before jax is imported), one XLA compilation cache
for the run, and shared fixtures."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# One persistent compilation cache for the whole run, made by the first process (pytest, or
# xdist's controller) and inherited by the workers and the commands the tests start: a program
# compiled again (a subcommand on the quick demo's runs, a model in several tests) is read back.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxaigc-xla-")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxaigc import parallel  # noqa: E402
from tests.helpers import jaxaigc, succeeded  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
def quick_demo(tmp_path_factory):
    """``jaxaigc demo --quick``'s workdir: every stage trained at a few steps and evaluated. Its
    readers are marked ``tests.helpers.QUICK_DEMO``; one that changes a run works on a copy."""
    workdir = tmp_path_factory.mktemp("quick_demo")
    succeeded(jaxaigc("demo", "--quick", "--workdir", workdir, timeout=2400))
    return workdir
