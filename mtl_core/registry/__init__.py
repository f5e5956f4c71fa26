"""The model registry and serving: the champion gate, the registered MLflow pyfunc (`pyfunc_model`, over
`predictor.MultiTaskPredictor`), and `mtl predict` (which model: `model_source`; which images:
`image_files`; the answers: `prediction`)."""

CHAMPION = "champion"
"""The alias of the registered version that serves (`models:/<mlflow.model_name>@champion`)."""
