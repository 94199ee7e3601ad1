"""The command line shared by experiment scripts: ``--config.*`` overrides, ``--workdir`` and
joining a multi-process run (``--coordinator_address``, ``--num_processes``, ``--process_id``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxaigc import parallel

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 in a multi-process run. Without it, TPU pods, SLURM, Open MPI and "
    "GKE are detected as JAX detects them; elsewhere the run is one process.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")


def join_distributed() -> None:
    """Joins the multi-process run the flags describe or the cluster provides (see
    :func:`jaxaigc.parallel.initialize_distributed`); call it before anything touches a device."""
    given = {
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    given = {name: value for name, value in given.items() if value is not None}
    count, index = given.get("num_processes"), given.get("process_id")
    if count is not None and count < 1:
        raise app.UsageError(f"--num_processes={count}: needs at least 1")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise app.UsageError(f"--process_id={index}: must be in [0, --num_processes={count})")
    parallel.initialize_distributed(**given)


def run_experiment(
    run: Callable[[ml_collections.ConfigDict, str | Path], dict],
    config: ml_collections.ConfigDict,
) -> None:
    """Parses ``--config.<field>=...`` (defaults: ``config``) and the required ``--workdir``, joins
    the multi-process run if there is one, then calls ``run(config, workdir)`` (on every
    process). Call it under ``if __name__ == "__main__"``: the config flags are defined here, so
    the script can still be imported beside other flags (as the demo does)."""
    config_flags.DEFINE_config_dict("config", config)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.json.")
    flags.mark_flag_as_required("workdir")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
            logging.set_verbosity(logging.WARNING)
        join_distributed()
        run(flags.FLAGS.config, flags.FLAGS.workdir)

    app.run(main)
