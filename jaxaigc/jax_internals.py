"""The private JAX APIs jaxaigc uses, each behind one wrapper here, where no public API serves.

Written against jax 0.10.2. Each wrapper imports its private module when called, so a JAX upgrade
that moves or renames one breaks that wrapper only, with a :class:`JaxInternalsError` naming what
went missing, not the import of the library; ``tests/test_jax_internals.py`` calls every wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


class JaxInternalsError(RuntimeError):
    """A private JAX API that jaxaigc wraps is gone from the installed JAX."""


@contextlib.contextmanager
def _private(name: str) -> Iterator[None]:
    """Turns a failed import or attribute lookup of ``name`` into a :class:`JaxInternalsError`."""
    try:
        yield
    except (ImportError, AttributeError) as error:
        raise JaxInternalsError(
            f"jax {jax.__version__} moved or renamed {name}, a private API jaxaigc uses: "
            "update jaxaigc/jax_internals.py"
        ) from error


def use_shardy_partitioner(enabled: bool) -> contextlib.AbstractContextManager:
    """``jax._src.config.use_shardy_partitioner(enabled)``, a context manager: the public
    ``jax.config.update("jax_use_shardy_partitioner", ...)`` sets it for the whole process."""
    with _private("jax._src.config.use_shardy_partitioner"):
        from jax._src.config import use_shardy_partitioner as setting
    return setting(enabled)


def cluster_detected() -> bool:
    """Whether one of the clusters ``jax.distributed.initialize()`` finds by itself is present
    (TPU pod, SLURM, Open MPI, GKE; not the opt-in mpi4py), by the rule of
    ``jax._src.clusters.ClusterEnv``: the public ``initialize`` raises where there is none."""
    with _private("jax._src.clusters.ClusterEnv._cluster_types"):
        from jax._src.clusters import ClusterEnv

        return any(
            not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types
        )


def backends_are_initialized() -> bool:
    """``jax._src.xla_bridge.backends_are_initialized()``: whether JAX has created its backends;
    every public query of them (``jax.devices()``, ``jax.default_backend()``) creates them."""
    with _private("jax._src.xla_bridge.backends_are_initialized"):
        from jax._src.xla_bridge import backends_are_initialized as initialized
    return initialized()
