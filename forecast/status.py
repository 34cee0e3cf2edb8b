"""`forecast-bpf status`: per-SA counters, live from the pinned maps.

Why the pinned maps and not a socket to the daemon: the counters live in the kernel, so status
reads the same numbers the data path writes, with no daemon round-trip that could stall or
lie; the daemon's state file only says which SA each slot holds.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forecast import tc
from forecast.layout import Direction
from forecast.pinned import PinnedCounters, PinnedError

SCHEMA_VERSION = 1
DIRECTION_KEYS = {
    Direction.LAN_TO_SA: "lan_to_sa",
    Direction.SA_TO_LAN: "sa_to_lan",
    Direction.SA_TO_SA: "sa_to_sa",
}


class NotRunning(RuntimeError):
    """The daemon is not running (or left a stale state file)."""


@dataclass
class Snapshot:
    doc: dict[str, Any]

    @property
    def sas(self) -> list[dict[str, Any]]:
        return list(self.doc["sas"])


def _filters_attached(state: dict[str, Any]) -> bool:
    """Are the data path's filters (as the state file names them) still on their devices?"""
    filters = state.get("filters", {})
    return bool(filters) and all(
        tc.our_filter(int(f["ifindex"])) == f["name"] for f in filters.values()
    )


def read(state_file: Path) -> Snapshot:
    """The daemon's view and the live counters. A daemon that is gone while its filters still
    forward (a crash, a restart in progress) is reported as such, with the counters."""
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise NotRunning(f"forecast-bpf is not running (no {state_file})") from None
    pid = int(state.get("pid", 0))
    running = bool(pid) and os.path.exists(f"/proc/{pid}")
    if not running and not (state.get("maps_dir") and _filters_attached(state)):
        raise NotRunning(f"forecast-bpf is not running (pid {pid} in {state_file} is gone)")
    try:
        counters = PinnedCounters.open(Path(state["maps_dir"]))
    except PinnedError as exc:
        raise NotRunning(f"forecast-bpf is not running properly: {exc}") from None
    try:
        sas = []
        totals = {k: {"packets": 0, "bytes": 0} for k in DIRECTION_KEYS.values()}
        for slot, info in sorted(state["slots"].items(), key=lambda kv: int(kv[0])):
            by_dir = counters.slot(int(slot))
            entry = dict(info, slot=int(slot), counters={})
            for d, key in DIRECTION_KEYS.items():
                packets, nbytes = by_dir[d]
                entry["counters"][key] = {"packets": packets, "bytes": nbytes}
                totals[key]["packets"] += packets
                totals[key]["bytes"] += nbytes
            sas.append(entry)
        drops = {r.name.lower(): n for r, n in counters.drop_counts().items()}
    finally:
        counters.close()
    return Snapshot(
        {
            "schema": SCHEMA_VERSION,
            "daemon": {
                "running": running,
                "pid": pid,
                "vici_connected": state.get("vici_connected", False),
                "sync_errors": state.get("sync_errors", 0),
                "updated": state.get("updated"),
            },
            "sas": sas,
            "totals": totals,
            "drops": drops,
            "ignored": state.get("ignored", {}),
        }
    )


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _cell(sa_or_totals: dict[str, Any], key: str, rates: dict[str, float] | None) -> str:
    c = sa_or_totals[key]
    total = f"{_human(c['packets'])}/{_human(c['bytes'])}B"
    if rates is None:
        return total
    return f"{_human(rates.get(key, 0.0))}/s {total}"


def rates_between(
    old: Snapshot | None, new: Snapshot, seconds: float
) -> dict[str, dict[str, float]]:
    """Packets per second per SA (by unique id) and direction; 'total' for the sums."""
    out: dict[str, dict[str, float]] = {}
    if old is None or seconds <= 0:
        return out
    before = {str(sa["slot"]) + ":" + str(sa["mark_in"]): sa for sa in old.sas}
    for sa in new.sas:
        prev = before.get(str(sa["slot"]) + ":" + str(sa["mark_in"]))
        if prev is None:
            continue
        out[str(sa["unique_id"])] = {
            k: max(0.0, (sa["counters"][k]["packets"] - prev["counters"][k]["packets"]) / seconds)
            for k in DIRECTION_KEYS.values()
        }
    out["total"] = {
        k: sum(r[k] for key, r in out.items() if key != "total") for k in DIRECTION_KEYS.values()
    }
    return out


def render_table(snap: Snapshot, rates: dict[str, dict[str, float]] | None = None) -> str:
    w = 22 if rates is not None else 14
    head = (
        f"{'SLOT':>4}  {'CONN/CHILD':<12} {'ID':>4}  {'REMOTE':<18} {'VIRTUAL IP':<15} "
        f"{'MARK':>6}  {'SPI IN/OUT':<17}  {'LAN>SA':>{w}}  {'SA>LAN':>{w}}  "
        f"{'SA>SA':>{w}}"
    )
    lines = [head]
    for sa in snap.sas:
        # With rates: this SA's (none yet for a new SA); without: plain totals.
        r = None if rates is None else rates.get(str(sa["unique_id"]), {})
        lines.append(
            f"{sa['slot']:>4}  {(sa['ike'] + '/' + sa['child'])[:12]:<12} {sa['unique_id']:>4}  "
            f"{sa['remote_id'][:18]:<18} {(sa['virtual_ips'] or ['-'])[0]:<15} "
            f"{sa['mark_in']:>#6x}  {sa['spi_in'] + '/' + sa['spi_out']:<17}  "
            + "  ".join(
                f"{_cell(sa['counters'], k, r):>{w}}"
                for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")
            )
        )
    totals_rates = rates.get("total", {}) if rates is not None else None
    lines.append(
        f"{'':>4}  {'total':<12} {len(snap.sas):>4}  {'':<18} {'':<15} {'':>6}  {'':<17}  "
        + "  ".join(
            f"{_cell(snap.doc['totals'], k, totals_rates):>{w}}"
            for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")
        )
    )
    drops = ", ".join(f"{k} {v}" for k, v in snap.doc["drops"].items() if v) or "none"
    lines.append(f"drops: {drops}")
    daemon = snap.doc["daemon"]
    if daemon["running"]:
        lines.append(
            f"daemon pid {daemon['pid']}, VICI "
            f"{'connected' if daemon['vici_connected'] else 'DISCONNECTED'}, "
            f"sync errors {daemon['sync_errors']}"
        )
    else:
        lines.append(
            f"daemon DOWN (pid {daemon['pid']} is gone); the data path still forwards for "
            f"these {len(snap.sas)} SAs, frozen until a daemon is back"
        )
    for uid, reason in snap.doc["ignored"].items():
        lines.append(f"ignored SA #{uid}: {reason}")
    return "\n".join(lines)


CLEAR = "\x1b[H\x1b[2J"


def watch(state_file: Path, interval: float, out: Any, iterations: int | None = None) -> int:
    """Refresh in place like top until interrupted; rates are per second since the last
    refresh. Returns 0 on Ctrl-C, 3 when the daemon goes away."""
    previous: Snapshot | None = None
    last = 0.0
    n = 0
    try:
        while iterations is None or n < iterations:
            now = time.monotonic()
            try:
                snap = read(state_file)
            except NotRunning as exc:
                out.write(f"\n{exc}\n")
                out.flush()
                return 3
            rates = rates_between(previous, snap, now - last)
            stamp = time.strftime("%H:%M:%S")
            out.write(
                f"{CLEAR}forecast-bpf status  {stamp}  every {interval:g} s  "
                f"(Ctrl-C to quit)\n\n{render_table(snap, rates)}\n"
            )
            out.flush()
            previous, last = snap, now
            n += 1
            if iterations is None or n < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
    return 0
