"""Tiers by directory: tests/unit, tests/kernel, tests/lab get their marker automatically, so a
test can never fall out of `make test` by a forgotten decorator."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "kernel", "lab")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
