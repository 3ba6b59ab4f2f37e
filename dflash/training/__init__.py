"""Training pipelines: tiny-target pretraining (and, later, drafter training)."""
