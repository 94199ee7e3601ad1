"""Networks assembled from ``jaxaigc.nn``; each takes one frozen config dataclass."""
