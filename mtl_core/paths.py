"""Where every stage reads and writes, relative to the project root.

One table of paths shared by the stages, dvc.yaml and the tests, so that a rename happens in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The files of one trained model, in whichever folder it is (models/, models_single_task/<task>/,
# models_all_in_one/, models/groups/<i>/, a downloaded copy): the one place of their names.
WEIGHTS_FILE = "model.safetensors"
"""Best-on-validation weights (safetensors): what evaluate, register and predict load."""
CHECKPOINT_FILE = "checkpoint.pt"
"""The final training state (last-epoch weights, optimizer, method state) a finished training leaves."""
SPEC_FILE = "model_spec.json"
"""How to rebuild the network from code: architecture, backbone, tasks, classes, preprocessing."""
HISTORY_FILE = "train_history.csv"
CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "train_metrics.json"
GRADIENT_COSINE_FILE = "task_gradient_cosine.json"
RUN_INFO_FILE = "mlflow_run.json"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
"""The class a model predicts for every test image (a column per task, class indices, test-cache order):
what the compare stage pairs image by image to test each task's difference for significance."""
NOT_TRAINED_FILE = "NOT_TRAINED.txt"
"""In the model folder of a disabled training stage (baselines, all_in_one): why nothing was trained. An
empty output folder makes DVC warn on every `dvc repro` that the output is empty."""


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    # ingest
    @property
    def builtin_dir(self) -> Path:
        return self.root / "data" / "builtin"

    @property
    def ingested_dir(self) -> Path:
        return self.root / "data" / "ingested"

    @property
    def manifest(self) -> Path:
        """Normalised manifest: every kept row, its image path, its labels and its split."""
        return self.ingested_dir / "manifest.csv"

    @property
    def rejected(self) -> Path:
        return self.ingested_dir / "rejected.csv"

    @property
    def data_report(self) -> Path:
        return self.ingested_dir / "data_report.json"

    # preprocess
    @property
    def preprocessed_dir(self) -> Path:
        return self.root / "data" / "preprocessed"

    def images_cache(self, split: str) -> Path:
        return self.preprocessed_dir / f"{split}_images.npy"

    def labels_cache(self, split: str) -> Path:
        return self.preprocessed_dir / f"{split}_labels.npy"

    def weights_cache(self, split: str) -> Path:
        """Per-sample loss weights (float32; all ones without `data.sample_weight_column`)."""
        return self.preprocessed_dir / f"{split}_weights.npy"

    @property
    def tasks_file(self) -> Path:
        """Task names and class names, in label-index order."""
        return self.preprocessed_dir / "tasks.json"

    # grouping
    @property
    def task_groups(self) -> Path:
        """The grouping stage's decision (`model.task_groups: auto`): the groups, the signal, the scores."""
        return self.reports_dir / "task_groups.json"

    @property
    def task_affinity(self) -> Path:
        """The probe's measured task affinities, both signals (+ a .png heatmap of the deciding one)."""
        return self.reports_dir / "task_affinity.json"

    # train
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def weights(self) -> Path:
        """Best-on-validation weights (safetensors): what evaluate and register use."""
        return self.models_dir / WEIGHTS_FILE

    @property
    def checkpoint(self) -> Path:
        """Last-epoch training state (model, optimizer, epoch), rewritten every epoch."""
        return self.models_dir / CHECKPOINT_FILE

    @property
    def model_spec(self) -> Path:
        """How to rebuild the network from code: architecture, backbone, tasks, classes, preprocessing."""
        return self.models_dir / SPEC_FILE

    @property
    def run_info(self) -> Path:
        """The MLflow run that trained this model; evaluate and register log into it."""
        return self.models_dir / RUN_INFO_FILE

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def train_history(self) -> Path:
        return self.reports_dir / HISTORY_FILE

    @property
    def train_metrics(self) -> Path:
        return self.reports_dir / SUMMARY_FILE

    @property
    def training_curves(self) -> Path:
        return self.reports_dir / CURVES_FILE

    @property
    def gradient_cosine(self) -> Path:
        """Per-epoch task-gradient cosine similarity on the shared parameters (+ a .png heatmap)."""
        return self.reports_dir / GRADIENT_COSINE_FILE

    @property
    def single_task_dir(self) -> Path:
        """One folder per single-task baseline model."""
        return self.models_dir.parent / "models_single_task"

    @property
    def single_task_metrics(self) -> Path:
        return self.reports_dir / "single_task_metrics.json"

    @property
    def all_in_one_dir(self) -> Path:
        """The all-in-one reference model of a grouped solution (stage all_in_one)."""
        return self.models_dir.parent / "models_all_in_one"

    @property
    def all_in_one_metrics(self) -> Path:
        return self.reports_dir / "all_in_one_metrics.json"

    @property
    def comparison(self) -> Path:
        """Multi-task vs single-task per task, and Δm (DVC metrics)."""
        return self.reports_dir / "comparison.json"

    # evaluate
    @property
    def test_metrics(self) -> Path:
        return self.reports_dir / "test_metrics.json"

    @property
    def test_predictions(self) -> Path:
        """The multi-task model's predicted class index of every test image, per task (TEST_PREDICTIONS_FILE)."""
        return self.reports_dir / TEST_PREDICTIONS_FILE

    @property
    def predictions_dir(self) -> Path:
        return self.reports_dir / "predictions"

    @property
    def confusion_dir(self) -> Path:
        return self.reports_dir / "confusion"

    @property
    def confusion_grid(self) -> Path:
        """Every task's confusion matrix in one figure (what `dvc plots show` draws)."""
        return self.reports_dir / "confusion_grid.png"

    @property
    def errors_dir(self) -> Path:
        """The error gallery: per task a figure and its JSON, and an index by error rate."""
        return self.reports_dir / "errors"

    @property
    def label_issues_dir(self) -> Path:
        """Per task the suspected label problems (CSV) and their thumbnails."""
        return self.reports_dir / "label_issues"

    @property
    def calibration(self) -> Path:
        """Reliability tables before and after temperature scaling (+ a .png figure)."""
        return self.reports_dir / "calibration.json"

    @property
    def gradcam(self) -> Path:
        """Grad-CAM of each task head on a few test images (+ a .json of the images and answers)."""
        return self.reports_dir / "gradcam.png"

    @property
    def error_correlation(self) -> Path:
        """Correlation between tasks of per-sample test errors (+ a .png heatmap)."""
        return self.reports_dir / "task_error_correlation.json"

    # register
    @property
    def model_card(self) -> Path:
        """The registered version's model card (register stage; also in the logged model's folder)."""
        return self.reports_dir / "model_card.md"

    @property
    def registry_report(self) -> Path:
        return self.reports_dir / "registry.json"


SPLITS = ("train", "val", "test")
