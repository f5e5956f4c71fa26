"""`--set section.key=value` overrides of params.yaml, shared by the benchmarks (the value is YAML)."""

from __future__ import annotations

import yaml


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """`params` (params.yaml as a dict) with each `section.key=value` set, sections created as needed."""
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return params
