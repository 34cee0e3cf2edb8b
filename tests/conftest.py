"""Tiers by directory: tests/unit, tests/kernel, tests/lab get their marker automatically, so a
test can never fall out of `make test` by a forgotten decorator."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "kernel", "lab")
# Recorded from charon 5.9.8 and strongSwan's forecast plugin (copied from shared/fixtures:
# the repository must test on its own, wherever it is cloned).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
