"""The README lists every metric the exporter has: a metric added without a word there fails."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_metric_is_in_the_readme() -> None:
    source = (REPO / "forecast" / "metrics.py").read_text()
    names = set(re.findall(r'"(forecast_[a-z_]+)"', source))
    assert len(names) >= 20, names  # the parse found the families, not nothing
    readme = (REPO / "README.md").read_text()
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?`", readme))
    assert missing == [], f"metrics the README does not name: {missing}"
