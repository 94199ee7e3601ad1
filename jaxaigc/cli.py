"""The command line shared by experiment scripts: ``--config.*`` overrides and ``--workdir``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags


def run_experiment(
    run: Callable[[ml_collections.ConfigDict, str | Path], dict],
    config: ml_collections.ConfigDict,
) -> None:
    """Parses ``--config.<field>=...`` (defaults: ``config``) and the required ``--workdir``, then
    calls ``run(config, workdir)``. Call it under ``if __name__ == "__main__"``: the flags are
    defined here, so the script can still be imported beside other flags (as the demo does)."""
    config_flags.DEFINE_config_dict("config", config)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.json.")
    flags.mark_flag_as_required("workdir")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
            logging.set_verbosity(logging.WARNING)
        run(flags.FLAGS.config, flags.FLAGS.workdir)

    app.run(main)
