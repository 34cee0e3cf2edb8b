"""Tiers by directory: tests/unit, tests/kernel, tests/lab (and tests/reference, strongSwan's
plugin, outside `make test`) get their marker automatically, so a test can never fall out of
its tier by a forgotten decorator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TIERS = ("unit", "kernel", "lab", "reference")
# Recorded from charon 5.9.8 and strongSwan's forecast plugin (copied from shared/fixtures:
# the repository must test on its own, wherever it is cloned).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


_FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a measured figure; all of them are printed at the end of the run (CI's log keeps
    them without `-s`)."""

    def record(line: str) -> None:
        _FIGURES.append(f"{request.node.name}: {line}")

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
