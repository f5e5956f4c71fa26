"""`mtl`: the command line. Each stage command is a thin shell over `mtl_core.pipeline`; `mtl predict`
over `mtl_core.registry.prediction` (and the model and image modules beside it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

KNOWN_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, RuntimeError)
"""What a stage raises for something the user can act on: one `mtl <stage>: error:` line (the traceback
with --verbose). OSError covers files (not found, permissions) and full disks (`describe_error`)."""


def describe_error(err: BaseException) -> str:
    """The error's one line: its own message; for a full disk, the file and the space left on its disk."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename:
        from pathlib import Path

        from mtl_core.data.disk import free_bytes, human_bytes

        path = Path(err.filename)
        return (
            f"{path}: {err.strerror or 'no space left on device'} ({human_bytes(free_bytes(path.parent))} free on "
            "that disk now); free some space and rerun: nothing written before it is lost"
        )
    return str(err)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # MLflow logs each failed store call with its traceback before raising it; the stage reports the
        # failure itself, in one line (tracking.store, training.sink): the tracebacks only with --verbose
        for logger in ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "mlflow.tracking._tracking_service.client"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)


def _version() -> str:
    """The installed mtl-pipeline's version (pyproject.toml), or that it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("mtl-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run `python3 -m uv sync`)"


def build_parser(stages: bool = True) -> argparse.ArgumentParser:
    """The `mtl` parser; `stages=False` leaves out the stage commands, whose names come with the pipeline
    and its config (`mtl predict` does without their 0.3 s of imports)."""
    parser = argparse.ArgumentParser(prog="mtl", description="Multi-task image classification pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    if stages:
        _add_stage_parsers(sub)
    _add_predict_parser(sub)
    if stages:
        _add_audit_parser(sub)
    return parser


def _add_audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit-labels",
        help="find suspected label problems in the training split by k-fold cross-validation (trains k models)",
        description="Train the multi-task model of params.yaml on k-1 folds of the training split, k times, and list "
        "the training images whose label the held-out predictions contradict with confidence (confident learning). "
        "Writes reports/label_audit/. Not a DVC stage: it trains k models.",
    )  # fmt: skip
    p.add_argument("--folds", type=int, default=5, help="folds of the training split (default: 5)")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root (default: current folder)")


def _add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    from mtl_core.pipeline import STAGES, TRAINING_STAGES

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (what `dvc repro` calls)")
        p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        p.add_argument("--root", default=".", help="project root (default: current folder)")
        if stage in TRAINING_STAGES:
            p.add_argument(
                "--fresh", action="store_true",
                help="ignore the checkpoints in checkpoints/ and start over (default: resume a killed run)",
            )  # fmt: skip


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict every task's class for image files",
        description="Predict every task's class, with its probability, for each image (any size, any mode).",
        epilog=(
            "MODEL is an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model), "
            "loaded from the project's tracking store; or a trained models/ folder (model_spec.json + "
            "model.safetensors, or checkpoint.pt), a .safetensors or checkpoint .pt file next to its "
            "model_spec.json, or a downloaded MLflow model folder, loaded without the tracking store."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to classify")
    p.add_argument(
        "--model",
        default=None,
        help="MLflow model URI or local model path (default: models:/<mlflow.model_name>@champion)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--raw-probabilities", action="store_true",
        help="the uncalibrated softmax (default: probabilities calibrated by the temperatures fitted on the validation split)",
    )  # fmt: skip
    p.add_argument(
        "--params",
        default="params.yaml",
        help="parameters file, relative to --root; read for an MLflow model only (default: params.yaml)",
    )
    p.add_argument("--root", default=".", help="project root, where the MLflow store is (default: current folder)")


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtl_core.registry import prediction
    from mtl_core.registry.image_files import check_images
    from mtl_core.registry.model_source import load_model_for_prediction

    images = check_images(args.images)  # before the (slow) model load
    model = load_model_for_prediction(args.model, Path(args.root).resolve(), Path(args.params), raw=args.raw_probabilities)
    records = prediction.predict_files(model, images)
    if args.json:
        print(prediction.to_json(records))
    else:
        prediction.print_table(records, model.source)


def _audit(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtl_core.config import load_config
    from mtl_core.stages.audit_labels import run_audit_labels

    root = Path(args.root).resolve()
    params = Path(args.params)
    summary = run_audit_labels(load_config(params if params.is_absolute() else root / params), root, args.folds)
    for task, report in summary["tasks"].items():
        accuracy = report.get("out_of_fold_accuracy")
        trust = f" (out-of-fold accuracy {accuracy:.3f})" if accuracy is not None else ""
        print(f"{task}: {report['suspects']} suspected label problems{trust}: reports/label_audit/{task}.csv")


def _check_store(params: str, root: str) -> None:
    """The MLflow store answers and can be written, before the stage does any work (StoreError if not)."""
    from pathlib import Path

    from mtl_core.config import load_config
    from mtl_core.tracking.store import check_store, tracking_uri

    root_path = Path(root).resolve()
    params_path = Path(params) if Path(params).is_absolute() else root_path / params
    check_store(tracking_uri(load_config(params_path), root_path))


def _command(argv: list[str]) -> str | None:
    """The subcommand of `argv` (its first word that is not an option: `mtl` takes only -v, --version and
    --help)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(stages=_command(argv) != "predict").parse_args(argv)
    _setup_logging(args.verbose)
    from mtl_core.stopping import StageStopped, exit_with_launcher, install_stop_handlers, restore_handlers

    previous = {}
    if args.command != "predict":
        previous = install_stop_handlers()
        exit_with_launcher()
    try:
        if args.command == "predict":
            _predict(args)
        elif args.command == "audit-labels":
            _audit(args)
        else:
            from mtl_core.pipeline import LOGGING_STAGES, run_stage

            if args.command in LOGGING_STAGES:
                _check_store(args.params, args.root)
            run_stage(args.command, args.params, args.root, fresh=getattr(args, "fresh", False))
    except StageStopped as stop:
        if args.verbose:
            raise
        print(
            f"mtl {args.command}: {stop.reason}: the stage and its worker processes ended, nothing is written "
            "after the stop; run it again to finish (a training resumes from its last checkpoint)",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except KNOWN_ERRORS as err:
        if args.verbose:
            raise
        print(f"mtl {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    finally:
        restore_handlers(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
