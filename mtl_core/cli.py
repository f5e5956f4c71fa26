"""`mtl`: the command line. Each stage command is a thin shell over `mtl_core.pipeline`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtl_core.pipeline import STAGES, run_stage

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl", description="Multi-task image classification pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (what `dvc repro` calls)")
        p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        p.add_argument("--root", default=".", help="project root (default: current folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in STAGES:
        try:
            run_stage(args.command, args.params, args.root)
        except KNOWN_ERRORS as err:
            if args.verbose:
                raise
            print(f"mtl {args.command}: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
