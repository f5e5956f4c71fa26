"""The model card of a registered version: what it predicts, its input contract, where its data came
from, how to call it, and its test results per task (and against single-task models, when compared).

The register stage writes it to `reports/model_card.md`, uploads it into the logged model's folder
(`model_card.md` beside `MLmodel`, what `mlflow artifacts download -u models:/<name>/<version>` brings
down) and makes it the registered model's description while that version is champion. Plain values in,
markdown out: the card knows nothing of MLflow's API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mtl_core.tracking.views import comparison_markdown, task_table_markdown

CARD_FILE = "model_card.md"
INPUT_CONTRACT = "uint8 RGB images, array (N, H, W, 3), values 0-255, any H and W"


@dataclass(frozen=True)
class DataRevision:
    """Where the training data came from: `data.source`, the hashes of the ingested manifest (DVC's, as in
    dvc.lock, and its sha256), the git commit of the code and, once a flow run recorded it, the revision
    (commit or DVC experiment) that holds the run's dvc.lock."""

    source: str
    dvc_md5: str | None = None
    manifest_sha256: str | None = None
    git_commit: str | None = None
    images: Mapping[str, int] = field(default_factory=dict)  # split -> images


@dataclass(frozen=True)
class CardFacts:
    """Everything a card says, as plain values."""

    model_name: str
    version: str
    run_name: str
    run_id: str
    method: str  # "weighting `equal`, architecture `hard_sharing`, backbone `resnet18`"
    tasks: Mapping[str, Sequence[str]]  # task -> classes, in the model's order
    image_size: int
    data: DataRevision
    per_task: Mapping[str, Mapping[str, float]]
    mean: Mapping[str, float]
    majority: Mapping[str, float] | None = None
    gate: str = "passed"
    comparison: Mapping | None = None  # reports/comparison.json


def _classes(classes: Sequence[str]) -> str:
    return ", ".join(f"`{c}`" for c in classes)


def _example_columns(tasks: Mapping[str, Sequence[str]]) -> str:
    task, classes = next(iter(tasks.items()))
    return f"`{task}`, `{task}_probability`, `{task}_prob_{classes[0]}`, ..."


def model_card(facts: CardFacts) -> str:
    """The card as markdown (what the MLflow UI renders as the registered model's description)."""
    f = facts
    uri = f"models:/{f.model_name}/{f.version}"
    task_rows = "\n".join(f"| {t} | {len(c)} | {_classes(c)} |" for t, c in f.tasks.items())
    d = f.data
    data_lines = [f"* source: `{d.source}`"]
    if d.images:
        data_lines.append("* images: " + ", ".join(f"{n} {s}" for s, n in d.images.items()))
    if d.dvc_md5:
        data_lines.append(f"* ingested manifest, DVC md5 (dvc.lock, stage `ingest`): `{d.dvc_md5}`")
    if d.manifest_sha256:
        data_lines.append(f"* ingested manifest, sha256: `{d.manifest_sha256}`")
    if d.git_commit:
        data_lines.append(f"* code: git commit `{d.git_commit}`")
    data_lines.append(
        "* the revision of a scheduled retrain (its dvc.lock, metrics, data and model in the DVC remote): "
        "tag `mtl.revision` of this version and of its run"
    )
    if f.comparison and f.comparison.get("enabled"):
        compared = comparison_markdown(f.comparison)
    else:
        reason = (f.comparison or {}).get("reason", "no comparison report")
        compared = f"Not measured ({reason}; `compare.single_task: true` trains the single-task models).\n"
    return f"""# {f.model_name} version {f.version}

One multi-task image classifier: a shared backbone and one head per task, trained by run
**{f.run_name}** (`{f.run_id}`), {f.method}. Champion gate: {f.gate}.

## What it predicts

For each image, one class per task:

| task | classes | class names |
|:--|--:|:--|
{task_rows}

## Input contract

* **Input**: {INPUT_CONTRACT} (resized to {f.image_size}x{f.image_size} as in training). Over HTTP, JSON
  `{{"inputs": <nested lists of 0-255 integers>}}`.
* **Refused** with a one-line error (HTTP 400): float images (a [0, 1] image: send `(image * 255).round()`
  as uint8), values outside 0-255, other channel counts (convert grayscale / RGBA to RGB), a DataFrame.
* **Output**: a table with one row per image and, per task, the predicted class, its probability and one
  probability per class ({_example_columns(f.tasks)}).

## Data

{chr(10).join(data_lines)}

## How to call it

```python
import mlflow, numpy as np
from PIL import Image
model = mlflow.pyfunc.load_model("{uri}")  # or models:/{f.model_name}@champion
images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(({f.image_size}, {f.image_size}))) for p in paths])
model.predict(images)                          # uint8 (N, H, W, 3)
```

```bash
mtl predict --model {uri} photo1.jpg photo2.png
mlflow models serve -m {uri} --env-manager local --port 5001
curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{{"inputs": [[[[0, 0, 0], ...]]]}}'
```

## Test results

Test split, per task:

{task_table_markdown(f.per_task, f.mean, f.majority)}

*(chance)*: no better than always answering the test split's most frequent class.

## Against single-task models

{compared}"""
