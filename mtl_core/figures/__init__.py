"""Figures drawn with matplotlib from plain arrays and tables: training curves, confusion matrices, task
matrices. Nothing here knows a stage, a model or MLflow; the stages save what these draw."""
