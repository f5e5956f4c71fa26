"""The registered model's prediction code, logged as an MLflow "model from code".

MLflow stores this file's source, not a pickled object: at load time it runs the file, which rebuilds
the network from `mtl_core` and the JSON spec and loads safetensors weights. So the model loads with
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`.

Input: RGB images as uint8 (N, H, W, 3), any H and W (resized like in preprocessing); over HTTP
(`mlflow models serve`), `{"inputs": <nested lists of 0-255 integers>}`. Anything else (floats, values
outside 0-255, other channel counts) is refused with a one-line error (HTTP 400), see
`predictor.as_image_batch`.
Probabilities are calibrated (softmax of the logits divided by the task's temperature, fitted on the
validation split: training/calibration.py); the parameter `raw: true` asks for the uncalibrated softmax.
Output: a DataFrame with, per task, the predicted class `<task>`, its probability
`<task>_probability`, and one column `<task>_prob_<class>` per class.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mtl_core.registry.predictor import ImageInputError, MultiTaskPredictor


class InvalidImagesError(MlflowException):
    """A request's images refused: HTTP 400 with our one-line message.

    MLflow's scoring server rewrites the message of an MlflowException raised by a model to
    `Failed to predict data '<the whole input>'. Error: ...` (thousands of numbers for one image); this
    error keeps its own message, so the client reads what is wrong and not the array it sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._own_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_own_message"):  # set once, by __init__
            self._own_message = value


class MultiTaskPyfunc(mlflow.pyfunc.PythonModel):
    """Calibrated probabilities (the spec's per-task temperatures); the parameter `raw: true` answers
    with the uncalibrated softmax instead."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.predictor = MultiTaskPredictor(context.artifacts["spec"], context.artifacts["weights"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self.predictor.predict_images(model_input, raw=bool((params or {}).get("raw")))
        except ImageInputError as err:
            raise InvalidImagesError(f"invalid images: {err}") from None


set_model(MultiTaskPyfunc())
