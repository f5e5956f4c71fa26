"""The parameter reference (docs/reference/parameters.md), generated from the schema in mtl_core/config.py.

Every key of params.yaml, as a dotted name (`data.split.train`), with its type, its default, its
constraints (bounds, allowed values) and its description, read from the pydantic models that validate
params.yaml, so the page cannot drift from what is validated. tests/test_docs.py fails when the committed
page differs from what this module renders. Regenerate it from the project root:

    python3 -m uv run --frozen python -m mtl_core.config_reference

(`--check` only compares, and exits 1 when the page is out of date).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mtl_core.config import PipelineConfig

OUTPUT = Path("docs") / "reference" / "parameters.md"
"""Where the page goes, relative to the project root (the folder of params.yaml)."""

REGENERATE = "python3 -m uv run --frozen python -m mtl_core.config_reference"

_INTRO = f"""\
# Parameters

<!-- Generated from mtl_core/config.py by `{REGENERATE}`: do not edit by hand. -->

Every key of `params.yaml`, generated from the schema that validates it (`mtl_core/config.py`), so this
page says what the pipeline accepts. A key is written with its section, `data.split.train` for

```yaml
data:
  split:
    train: 0.7
```

*Default* is the value a key takes when `params.yaml` leaves it out; the project's own `params.yaml`
sets some keys to other values (`train.epochs`, `preprocess.augment`, ...). `params.yaml` is checked
when it is loaded, before any stage does work: an unknown or mistyped key fails with its name and the
allowed keys. A *number* must be finite (`.inf` and `.nan` are refused) and an *integer* must be written
as one (`epochs: true` and `epochs: 6.0` are refused). `[]` in a key stands for every item of a list.
How the keys are used: the [user guide](../guide/parameters.md).
"""


@dataclass(frozen=True)
class Entry:
    """One key of params.yaml: a section (a nested model) or a value."""

    key: str
    field: FieldInfo
    annotation: Any
    section: type[BaseModel] | None  # the nested model, for a section
    items: type[BaseModel] | None  # the model of a list's items (preprocess.augment), else None


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(_strip_annotated(a) for a in typing.get_args(tp))
    return (tp,)


def _model(tp: Any) -> type[BaseModel] | None:
    tp = _strip_annotated(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def walk(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[Entry]:
    """Every field of `model`, depth first in declaration order, with its dotted key; a list of models
    (preprocess.augment) is followed into its items as `<key>[].<field>`."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _model(field.annotation)
        items = None
        if section is None and typing.get_origin(_strip_annotated(field.annotation)) is list:
            items = _model(typing.get_args(_strip_annotated(field.annotation))[0])
        yield Entry(key, field, field.annotation, section, items)
        if section is not None:
            yield from walk(section, key + ".")
        elif items is not None:
            yield from walk(items, key + "[].")


_NAMES = {int: ("integer", "integers"), float: ("number", "numbers"), str: ("string", "strings"),
          bool: ("boolean", "booleans"), type(None): ("null", "nulls"), Any: ("any value", "any values")}  # fmt: skip


def type_name(tp: Any, plural: bool = False) -> str:
    """A YAML reader's name of a type: `integer`, `list of strings`, `number or null`; in a union, the
    allowed values of a Literal member themselves (integer or `auto`)."""
    members = _union_members(tp)
    if len(members) > 1:
        names: list[str] = []
        for m in members:
            for n in (
                [f"`{_value(v)}`" for v in typing.get_args(m)] if typing.get_origin(m) is Literal else [type_name(m, plural)]
            ):
                if n not in names:
                    names.append(n)
        return ", ".join(names[:-1]) + " or " + names[-1]
    tp = members[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _NAMES:
        return _NAMES[tp][plural]
    if origin is Literal:
        return type_name(type(args[0]), plural)
    if origin is list:
        return ("lists" if plural else "list") + " of " + type_name(args[0], plural=True)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return ("lists" if plural else "list") + " of " + type_name(args[0], plural=True)
        if len({_strip_annotated(a) for a in args}) == 1:
            return ("lists" if plural else "list") + f" of {len(args)} " + type_name(args[0], plural=True)
        return ("lists" if plural else "list") + " of " + ", ".join(type_name(a) for a in args)
    if origin is dict:
        head = "mappings" if plural else "mapping"
        if _strip_annotated(args[1]) is Any:
            return head
        return f"{head} of {type_name(args[0], True)} to {type_name(args[1], True)}"
    if _model(tp) is not None:
        return "sections" if plural else "section"
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple[str, list[Any]]:
    """The allowed values of a Literal field ('', [...]) or of a list of Literals ('each item', [...]);
    in a union with other types they are named in the type instead (type_name)."""
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) is Literal:
        return "", list(typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = _strip_annotated(typing.get_args(tp)[0])
        if typing.get_origin(inner) is Literal:
            return "each item", list(typing.get_args(inner))
    return "", []


def _value(v: Any) -> str:
    """A value as params.yaml would hold it (YAML flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/+-]*", v) else '"' + v.replace('"', '\\"') + '"'
    if isinstance(v, BaseModel):
        return _value(v.model_dump())
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_value(k)}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def default(field: FieldInfo) -> str | None:
    """The default as params.yaml would write it; None for a required key."""
    if field.default_factory is not None:
        return _value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return None
    return _value(field.default)


def constraints(field: FieldInfo, annotation: Any) -> str:
    """Bounds (ge, gt, le, lt), a minimum length and the allowed values."""
    parts = []
    bounds = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
              annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt")}  # fmt: skip
    for m in field.metadata:
        for kind, (sign, attr) in bounds.items():
            if isinstance(m, kind):
                parts.append(f"{sign} {_value(getattr(m, attr))}")
        if isinstance(m, annotated_types.MinLen):
            parts.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
    where, values = _choices(annotation)
    if values:
        listed = ", ".join(f"`{_value(v)}`" for v in values)
        parts.append(f"{where + ': ' if where else ''}one of {listed}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    """One line of a table cell: `|` escaped, and outside code spans a `<` that would open an HTML tag
    (`builtin:<name>` is text)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i])
    return "`".join(parts)


def _section(model: type[BaseModel], key: str, description: str, out: list[str]) -> None:
    """A section's heading and description, a table of its own keys (a list's item keys included),
    then its sub-sections."""
    out.append(f"{'#' * min(2 + key.count('.'), 4)} `{key}`\n")
    out.append(_cell(description) + "\n")
    rows, subsections = [], []
    for e in walk(model, key + "."):
        if e.key.count(".") != key.count(".") + 1 and "[]" not in e.key:
            continue  # a sub-section's own key, in its own table
        if e.section is not None:
            subsections.append(e)
            continue
        value = default(e.field)
        rows.append("| " + " | ".join([
            f"`{e.key}`",
            "list of mappings (keys below)" if e.items is not None else _cell(type_name(e.annotation)),
            "required" if value is None else f"`{_cell(value)}`",
            _cell(constraints(e.field, e.annotation)),
            _cell(e.field.description or ""),
        ]) + " |")  # fmt: skip
    if rows:
        out += ["| key | type | default | constraints | description |", "| --- | --- | --- | --- | --- |", *rows, ""]
    for e in subsections:
        assert e.section is not None
        _section(e.section, e.key, e.field.description or "", out)


def render() -> str:
    """The whole page, as docs/reference/parameters.md holds it."""
    out = [_INTRO]
    for name, field in PipelineConfig.model_fields.items():
        section = _model(field.annotation)
        assert section is not None, f"{name}: a top-level key of params.yaml is a section"
        _section(section, name, field.description or "", out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtl_core.config_reference",
        description="Write the parameter reference generated from mtl_core/config.py.",
    )
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"default: {OUTPUT} (run from the project root)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.out} is out of date; regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{'wrote' if current != text else 'unchanged:'} {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
