"""End-to-end pipelines: model + objective + data assembled from one run config."""
