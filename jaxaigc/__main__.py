"""``python -m jaxaigc``: the ``jaxaigc`` command (:mod:`jaxaigc.cli`)."""

from jaxaigc.cli import main

main()
