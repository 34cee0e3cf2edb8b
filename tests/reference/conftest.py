"""The reference tier runs in the lab: the same VM fixtures as tests/lab."""

from __future__ import annotations

from tests.lab.conftest import lab, lab_612  # noqa: F401  (fixtures, used by name)
