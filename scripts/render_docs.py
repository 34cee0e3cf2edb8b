#!/usr/bin/env python3
"""Render docs/status-watch.png and docs/dashboard.png from what the observability tests
captured (FORECAST_DOCS_OUT): the real tmux screen of `status --watch`, and the real Prometheus
range data of every dashboard panel. `make docs-images` runs both steps.

Usage: render_docs.py CAPTURE_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def terminal(text: str, out: Path) -> None:
    lines = text.rstrip("\n").splitlines()
    width = max(len(line) for line in lines)
    fig = plt.figure(figsize=(width * 0.082 + 0.3, len(lines) * 0.2 + 0.3), dpi=110)
    fig.patch.set_facecolor("#1e1e1e")
    fig.text(
        0.01,
        0.98,
        "\n".join(lines),
        family="monospace",
        fontsize=9,
        color="#d4d4d4",
        va="top",
        ha="left",
    )
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def dashboard(panels: list[dict[str, Any]], out: Path) -> None:
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 2.6), dpi=100)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], color="#ccccdc", fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        for series in panel["result"]:
            values = series["values"]
            t0 = float(values[0][0])
            xs = [float(t) - t0 for t, _ in values]
            ys = [float(v) for _, v in values]
            label = ",".join(f"{v}" for k, v in series["metric"].items() if k != "__name__")
            ax.plot(xs, ys, linewidth=1.4, label=label or "value")
        if panel["result"]:
            ax.legend(
                fontsize=6,
                loc="upper left",
                facecolor="#181b1f",
                labelcolor="#ccccdc",
                edgecolor="#2c3235",
            )
        ax.set_xlabel("seconds", color="#8e8e8e", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "forecast-bpf dashboard panels (real Prometheus data, kernel-tier run)",
        color="#ccccdc",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    dst.mkdir(parents=True, exist_ok=True)
    terminal((src / "status-watch.txt").read_text(), dst / "status-watch.png")
    dashboard(json.loads((src / "dashboard-ranges.json").read_text()), dst / "dashboard.png")
    print(f"wrote {dst / 'status-watch.png'} and {dst / 'dashboard.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
