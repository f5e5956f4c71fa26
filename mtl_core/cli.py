"""`mtl`: the command line. Each stage command is a thin shell over `mtl_core.pipeline`; `mtl predict`
over `mtl_core.registry.prediction` (and the model and image modules beside it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

KNOWN_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, RuntimeError)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    return parser


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
    model = load_model_for_prediction(args.model, Path(args.root).resolve(), Path(args.params))
    records = prediction.predict_files(model, images)
    if args.json:
        print(prediction.to_json(records))
    else:
        prediction.print_table(records, model.source)


def _command(argv: list[str]) -> str | None:
    """The subcommand of `argv` (its first word that is not an option: `mtl` takes only -v, --version and
    --help)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(stages=_command(argv) != "predict").parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "predict":
            _predict(args)
        else:
            from mtl_core.pipeline import run_stage

            run_stage(args.command, args.params, args.root, fresh=getattr(args, "fresh", False))
    except KNOWN_ERRORS as err:
        if args.verbose:
            raise
        print(f"mtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
