"""bench/throughput.py runs the train stage's own step loop: one step of each of its three measurements
on a tiny cache gives three positive rates (a change to the loop's signature fails here, not in the
next benchmark run)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from mtl_core.config import load_config

from conftest import write_params

ROOT = Path(__file__).resolve().parents[1]


def test_the_three_rates_of_one_tiny_configuration(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_params(tmp_path, {"train": {"channels_last": True}})
    cfg = load_config(tmp_path / "params.yaml")
    cache = bench.make_cache(tmp_path, 32, 32)
    rates = bench.measure("small_cnn", 0, "pcgrad", 1, 8, cache, cfg, torch.device("cpu"))
    assert set(rates) == {"input", "step", "full"}
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), rates
