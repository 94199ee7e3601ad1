"""Every private JAX API jaxaigc wraps still exists and still does what its wrapper says.

After a JAX upgrade that moved or renamed one, these fail with a ``JaxInternalsError`` naming it.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxaigc import jax_internals

SLURM_JOB = {  # the variables JAX's SLURM detection reads, as srun sets them
    "SLURM_JOB_ID": "1",
    "SLURM_STEP_NODELIST": "node1",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}


def test_use_shardy_partitioner_is_scoped_and_reaches_the_lowering(mesh_2x2x2):
    sharding = NamedSharding(mesh_2x2x2, PartitionSpec("data"))
    x = jax.device_put(np.zeros(8, np.float32), sharding)
    default = jax.config.jax_use_shardy_partitioner
    with jax_internals.use_shardy_partitioner(not default):
        assert jax.config.jax_use_shardy_partitioner == (not default)
        text = jax.jit(lambda x: x + 1).lower(x).as_text()
    assert jax.config.jax_use_shardy_partitioner == default  # restored
    assert ("sdy.sharding" in text) == (not default)
    assert ("mhlo.sharding" in text) == default


def test_cluster_detected(monkeypatch):
    for name in SLURM_JOB:
        monkeypatch.delenv(name, raising=False)
    assert isinstance(jax_internals.cluster_detected(), bool)  # True in a TPU pod or on GKE
    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    assert jax_internals.cluster_detected()


def test_backends_are_initialized(devices):
    assert jax_internals.backends_are_initialized()  # the devices fixture created them
    # A fresh process: importing jax creates no backend, asking for devices does.
    script = (
        "from jaxaigc import jax_internals; import jax; "
        "print(jax_internals.backends_are_initialized()); jax.devices(); "
        "print(jax_internals.backends_are_initialized())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_a_missing_api_is_named():
    missing = pytest.raises(jax_internals.JaxInternalsError, match="jax.nothing.here.*internals")
    with missing, jax_internals._private("jax.nothing.here"):
        import jax.nothing.here  # noqa: F401
