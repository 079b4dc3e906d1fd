"""Tracking, optional: a run as an MLflow run, MLflow's client kept from hurting the run, and models loaded back by MLflow URI."""
