"""The registered model's prediction code, logged as an MLflow "model from code".

MLflow stores this file's source, not a pickled object: at load time it runs the file, which rebuilds
the network from `mtl_core` and the JSON spec and loads safetensors weights. So the model loads with
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`.

Input: a uint8 array of RGB images (N, H, W, 3), any H and W (resized like in preprocessing).
Output: a DataFrame with, per task, the predicted class `<task>`, its probability
`<task>_probability`, and one column `<task>_prob_<class>` per class.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import set_model

from mtl_core.registry.predictor import MultiTaskPredictor


class MultiTaskPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.predictor = MultiTaskPredictor(context.artifacts["spec"], context.artifacts["weights"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            raise TypeError("pass images as a uint8 numpy array of shape (N, H, W, 3), not a DataFrame")
        return self.predictor.predict_images(model_input)


set_model(MultiTaskPyfunc())
