"""Model registry: the MLflow pyfunc wrapper and the `register` stage."""
