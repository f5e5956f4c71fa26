"""The suite's own scheduling (conftest.SLOWEST_FILES): the files it puts first exist, and collection puts
them first in that order, keeping the order of the tests inside each file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SLOWEST_FILES, pytest_collection_modifyitems

TESTS = Path(__file__).resolve().parent


def test_every_file_named_slowest_exists() -> None:
    missing = [name for name in SLOWEST_FILES if not (TESTS / name).is_file()]
    assert not missing, f"conftest.SLOWEST_FILES names files that are gone: {missing}"


class _Item:
    def __init__(self, name: str, test: str) -> None:
        self.path, self.name = TESTS / name, test


def test_collection_puts_the_slowest_files_first_and_keeps_each_files_order(pytestconfig: pytest.Config) -> None:
    items = [_Item("test_a.py", "one"), _Item(SLOWEST_FILES[1], "first"), _Item("test_b.py", "x"), _Item("test_b.py", "y"),
             _Item(SLOWEST_FILES[0], "z"), _Item(SLOWEST_FILES[1], "second"), _Item("test_a.py", "two"), _Item("test_b.py", "w")]  # fmt: skip
    pytest_collection_modifyitems(pytestconfig, items)  # type: ignore[arg-type]
    assert [(i.path.name, i.name) for i in items] == [
        (SLOWEST_FILES[0], "z"), (SLOWEST_FILES[1], "first"), (SLOWEST_FILES[1], "second"),
        ("test_b.py", "x"), ("test_b.py", "y"), ("test_b.py", "w"),  # not listed: more tests first
        ("test_a.py", "one"), ("test_a.py", "two"),
    ]  # fmt: skip
