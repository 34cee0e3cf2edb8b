"""The benchmark's report: from the `BENCH {json}` records of every forwarder to figures,
ratios (each of forecast-bpf's paths / plugin, local output / XFRM interface), a Markdown table
and PNG plots.

Definitions (BENCHMARKS.md explains the method):
- zero-loss rate: the highest LAN rate (packets/s) whose step lost at most 0.1 % of copies and
  kept up: a forwarder that queues (the local output path's ring) must have emptied its queue
  within a quarter of the step's sending time after the LAN's last packet, or the rate only
  looked lossless because the queue had not overflowed yet;
- capacity: the most copies/s delivered in any step of the series;
- CPU per copy: the gateway CPU's time per delivered copy in the step at capacity (the most
  copies, so the least noise from fixed costs such as waking an idle CPU);
- ÷ ESP: CPU per copy over CPU per packet of the plain-ESP series at its own capacity.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# strongSwan's plugin; forecast-bpf on its XFRM-interface path (if_id); forecast-bpf on its local
# output path (the plugin's mark-only configuration, unchanged).
FORWARDERS = ("plugin", "forecast-bpf", "forecast-bpf-local-out")
# (forwarder, base): the ratios the report gives, forwarder's figure over base's
RATIOS = (
    ("forecast-bpf", "plugin"),
    ("forecast-bpf-local-out", "plugin"),
    ("forecast-bpf-local-out", "forecast-bpf"),
)
# how each forwarder's series is drawn
LINE_STYLES = {"plugin": "--", "forecast-bpf": "-", "forecast-bpf-local-out": ":"}
LOSS_OK = 0.001
KEPT_UP = 0.25  # a step's queue drained within this share of its sending time


def parse(text: str) -> list[dict[str, Any]]:
    """Every BENCH record in a run's output, in order."""
    return [
        json.loads(line.split("BENCH ", 1)[1])
        for line in text.splitlines()
        if line.startswith("BENCH ")
    ]


def lossless(step: dict[str, Any]) -> bool:
    """At most 0.1 % lost, and nothing left queued for long after the step (records from
    before the queue was measured have no drain_seconds: nothing was queued)."""
    drain = step.get("drain_seconds", 0.0)
    return bool(step["loss"] <= LOSS_OK and drain <= KEPT_UP * step["send_seconds"])


@dataclass(frozen=True)
class Series:
    forwarder: str
    kind: str  # "multicast" or "esp"
    clients: int
    payload: int
    steps: list[dict[str, Any]]

    @property
    def zero_loss_pps(self) -> float | None:
        ok = [s["offered_pps"] for s in self.steps if lossless(s)]
        return max(ok) if ok else None

    @property
    def capacity_step(self) -> dict[str, Any] | None:
        return max(self.steps, key=lambda s: s["delivered_per_s"], default=None)

    @property
    def copies_per_s(self) -> float | None:
        step = self.capacity_step
        return step["delivered_per_s"] if step else None

    def us_per_copy(self, kind: str = "total") -> float | None:
        step = self.capacity_step
        value = step["us_per_copy"][kind] if step else None
        return None if value is None or math.isnan(value) else float(value)


def series(records: Iterable[dict[str, Any]]) -> list[Series]:
    grouped: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == "step":
            key = (r["forwarder"], r["series"], r["clients"], r["payload"])
            grouped.setdefault(key, []).append(r)
    return [
        Series(f, k, c, p, sorted(steps, key=lambda s: s["offered_pps"]))
        for (f, k, c, p), steps in grouped.items()
    ]


def _find(all_series: list[Series], **want: Any) -> Series | None:
    for s in all_series:
        if all(getattr(s, k) == v for k, v in want.items()):
            return s
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def quantile(values: list[float], q: float) -> float | None:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    return statistics.quantiles(vals, n=100, method="inclusive")[round(q * 100) - 1]


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures as data (the Markdown and the lab tier's checks read this)."""
    all_series = series(records)
    rows: list[dict[str, Any]] = []
    for s in sorted(
        (s for s in all_series if s.kind == "multicast"),
        key=lambda s: (s.clients, s.payload, FORWARDERS.index(s.forwarder)),
    ):
        esp = _find(all_series, forwarder=s.forwarder, kind="esp", payload=s.payload)
        per_copy = s.us_per_copy()
        rows.append(
            {
                "forwarder": s.forwarder,
                "clients": s.clients,
                "payload": s.payload,
                "zero_loss_pps": s.zero_loss_pps,
                "copies_per_s": s.copies_per_s,
                "us_per_copy": per_copy,
                "us_per_copy_by_kind": {k: s.us_per_copy(k) for k in ("user", "system", "softirq")},
                "esp_us_per_packet": esp.us_per_copy() if esp else None,
                "per_copy_over_esp": _ratio(per_copy, esp.us_per_copy() if esp else None),
            }
        )
    by_key = {(r["forwarder"], r["clients"], r["payload"]): r for r in rows}
    ratios: list[dict[str, Any]] = []
    for forwarder, base_name in RATIOS:
        for r in rows:
            base = by_key.get((base_name, r["clients"], r["payload"]))
            if r["forwarder"] != forwarder or base is None:
                continue
            ratios.append(
                {
                    "forwarder": forwarder,
                    "base": base_name,
                    "clients": r["clients"],
                    "payload": r["payload"],
                    "zero_loss_pps": _ratio(r["zero_loss_pps"], base["zero_loss_pps"]),
                    "copies_per_s": _ratio(r["copies_per_s"], base["copies_per_s"]),
                    "us_per_copy": _ratio(r["us_per_copy"], base["us_per_copy"]),
                }
            )
    latency: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "latency":
            ms = [s["up_to_first_copy_ms"] for s in r["samples"]]
            sent = [s.get("up_to_first_esp_ms", math.nan) for s in r["samples"]]
            init = [s["initiate_to_first_copy_ms"] for s in r["samples"]]
            latency[r["forwarder"]] = {
                "connects": len(ms),
                "measured": sum(1 for v in ms if not math.isnan(v)),
                "sent_p50_ms": quantile(sent, 0.5),
                "sent_p99_ms": quantile(sent, 0.99),
                "p50_ms": quantile(ms, 0.5),
                "p99_ms": quantile(ms, 0.99),
                "initiate_p50_ms": quantile(init, 0.5),
            }
    starts = [r for r in records if r["kind"] == "daemon_start"]
    meta = [r for r in records if r["kind"] == "meta"]
    return {
        "meta": meta,
        "rows": rows,
        "ratios": ratios,
        "latency": latency,
        "daemon_start": starts,
        "esp": [
            {
                "forwarder": s.forwarder,
                "payload": s.payload,
                "zero_loss_pps": s.zero_loss_pps,
                "packets_per_s": s.copies_per_s,
                "us_per_packet": s.us_per_copy(),
            }
            for s in all_series
            if s.kind == "esp"
        ],
    }


def _fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def markdown(summ: dict[str, Any], plots: list[str]) -> str:
    out = ["# forecast-bpf benchmark", ""]
    for m in summ["meta"]:
        out.append(
            f"- {m['forwarder']}: kernel {m['kernel']}, {m['cpus']} CPUs, "
            f"{m['step_seconds']} s per step"
        )
    out += [
        "",
        "## Forwarding (LAN multicast → every client)",
        "",
        "| clients | payload | forwarder | zero-loss rate (pkt/s) | copies/s at capacity "
        "| gateway CPU per copy (µs) | user / system / softirq (µs) | ÷ one ESP packet |",
        "|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in summ["rows"]:
        k = r["us_per_copy_by_kind"]
        out.append(
            f"| {r['clients']} | {r['payload']} B | {r['forwarder']} | "
            f"{_fmt(r['zero_loss_pps'])} | {_fmt(r['copies_per_s'])} | "
            f"{_fmt(r['us_per_copy'], 1)} | "
            f"{_fmt(k['user'], 1)} / {_fmt(k['system'], 1)} / {_fmt(k['softirq'], 1)} | "
            f"{_fmt(r['per_copy_over_esp'], 2, 'x')} |"
        )
    for forwarder, base in RATIOS:
        mine = [r for r in summ["ratios"] if (r["forwarder"], r["base"]) == (forwarder, base)]
        if not mine:
            continue
        out += [
            "",
            f"## {forwarder} / {base}",
            "",
            "| clients | payload | zero-loss rate | copies/s at capacity | CPU per copy |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            out.append(
                f"| {r['clients']} | {r['payload']} B | {_fmt(r['zero_loss_pps'], 2, 'x')} | "
                f"{_fmt(r['copies_per_s'], 2, 'x')} | {_fmt(r['us_per_copy'], 2, 'x')} |"
            )
    out += [
        "",
        "## Plain ESP (LAN unicast to one client's virtual IP)",
        "",
        "| lab of | payload | zero-loss rate (pkt/s) | packets/s at capacity | gateway CPU "
        "per packet (µs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in summ["esp"]:
        out.append(
            f"| {e['forwarder']} | {e['payload']} B | {_fmt(e['zero_loss_pps'])} | "
            f"{_fmt(e['packets_per_s'])} | {_fmt(e['us_per_packet'], 1)} |"
        )
    out += [
        "",
        "## Control plane",
        "",
        "CHILD_SA up = the gateway's `child-updown` event. *Sent*: the first copy into the new SA "
        "reaches the client's wire (what the forwarder controls). *Decrypted*: the client's "
        "socket gets it (the client installs its end of the SA after the gateway).",
        "",
        "| forwarder | connects | up → first copy sent p50 | p99 "
        "| up → first copy decrypted p50 | p99 | initiate → decrypted p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f, lat in summ["latency"].items():
        out.append(
            f"| {f} | {lat['measured']}/{lat['connects']} "
            f"| {_fmt(lat['sent_p50_ms'], 1, ' ms')} | {_fmt(lat['sent_p99_ms'], 1, ' ms')} "
            f"| {_fmt(lat['p50_ms'], 1, ' ms')} | {_fmt(lat['p99_ms'], 1, ' ms')} "
            f"| {_fmt(lat['initiate_p50_ms'], 1, ' ms')} |"
        )
    if summ["daemon_start"]:
        out += [
            "",
            "| forecast-bpf start | forwarder | to first copy | to every SA | daemon's account |",
            "|---|---|---:|---:|---|",
        ]
        for s in summ["daemon_start"]:
            account = s["ready_line"].split("after the process started", 1)[-1].strip(" ()")
            out.append(
                f"| {s['how']} | {s['forwarder']} | {_fmt(s['start_to_first_copy_s'], 2, ' s')} | "
                f"{_fmt(s['start_to_all_slots_s'], 2, ' s')} | {account} |"
            )
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot(records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """loss-vs-rate.png and cpu-per-copy.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_series = [s for s in series(records) if s.kind == "multicast"]
    payloads = sorted({s.payload for s in all_series})
    names = []
    fig, axes = plt.subplots(1, len(payloads), figsize=(6 * len(payloads), 4.2), squeeze=False)
    for ax, payload in zip(axes[0], payloads, strict=True):
        for s in sorted(all_series, key=lambda s: (FORWARDERS.index(s.forwarder), s.clients)):
            if s.payload != payload:
                continue
            ax.plot(
                [st["offered_copies_per_s"] for st in s.steps],
                [100 * st["loss"] for st in s.steps],
                LINE_STYLES[s.forwarder],
                marker="o",
                label=f"{s.forwarder}, {s.clients} clients",
            )
        ax.set_xscale("log")
        ax.set_xlabel("offered copies/s (LAN packets/s x clients)")
        ax.set_ylabel("copies lost (%)")
        ax.set_title(f"loss vs offered rate, {payload} B payload")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss-vs-rate.png", dpi=100)
    plt.close(fig)
    names.append("loss-vs-rate.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for forwarder in FORWARDERS:
        for payload in payloads:
            pts = sorted(
                (s.clients, s.us_per_copy())
                for s in all_series
                if s.forwarder == forwarder and s.payload == payload and s.us_per_copy()
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    LINE_STYLES[forwarder],
                    marker="o",
                    label=f"{forwarder}, {payload} B",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("gateway CPU per delivered copy (µs, at capacity)")
    ax.set_title("CPU per copy vs clients")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "cpu-per-copy.png", dpi=100)
    plt.close(fig)
    names.append("cpu-per-copy.png")
    return names


def write(records: list[dict[str, Any]], out_dir: Path) -> Path:
    """report.md, bench.json and the plots into out_dir; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(records, indent=1))
    summ = summary(records)
    (out_dir / "summary.json").write_text(json.dumps(summ, indent=1))
    plots = plot(records, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(summ, plots))
    return report
