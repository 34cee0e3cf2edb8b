"""Recorded VICI payloads from charon 5.9.8 (tests/fixtures/vici-5.9.8, INDEX.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES as ALL_FIXTURES

FIXTURES = ALL_FIXTURES / "vici-5.9.8"


def _as_vici(value: Any) -> Any:
    """The python binding yields bytes for every scalar; the recordings hold str."""
    if isinstance(value, dict):
        return {k: _as_vici(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_vici(v) for v in value]
    return value.encode() if isinstance(value, str) else value


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"recorded VICI payloads missing at {FIXTURES}", pytrace=False)
    return FIXTURES


def load_events(directory: Path) -> list[tuple[str, str, Any]]:
    """(file name, event name, payload as the binding delivers it), in recorded order."""
    out = []
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        out.append((path.name, data["event"], _as_vici(data["payload"])))
    return out


def load_list_sas(path: Path) -> list[Any]:
    return [_as_vici(m) for m in json.loads(path.read_text())["list-sas"]]
