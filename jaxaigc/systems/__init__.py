"""Each recipe's training: its stages built and trained in order, each resuming (evaluation
and the report: :mod:`jaxaigc.run`)."""
