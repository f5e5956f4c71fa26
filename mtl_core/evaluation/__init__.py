"""Evaluation: per-task test metrics, confusion matrices, DVC metrics/plots and MLflow logging."""
