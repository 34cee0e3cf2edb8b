"""`forecast-bpf status`: per-SA counters, live from the pinned maps.

Why the pinned maps and not a socket to the daemon: the counters live in the kernel, so status
reads the same numbers the data path writes, with no daemon round-trip that could stall or
lie; the daemon's state file only says which SA each slot holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def read(state_file: Path) -> Snapshot:
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise NotRunning(f"forecast-bpf is not running (no {state_file})") from None
    pid = int(state.get("pid", 0))
    if not pid or not os.path.exists(f"/proc/{pid}"):
        raise NotRunning(f"forecast-bpf is not running (pid {pid} in {state_file} is gone)")
    try:
        counters = PinnedCounters(Path(state["pin_dir"]))
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


def _human(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n}{unit}"
        n //= 1000
    return f"{n}P"


def render_table(snap: Snapshot) -> str:
    head = (
        f"{'SLOT':>4}  {'CONN/CHILD':<14} {'ID':>4}  {'REMOTE':<22} {'VIRTUAL IP':<15} "
        f"{'MARK':>6}  {'SPI-IN':<8}  {'LAN>SA pk/B':>12}  {'SA>LAN pk/B':>12}  "
        f"{'SA>SA pk/B':>12}"
    )
    lines = [head]
    for sa in snap.sas:
        c = sa["counters"]
        cell = {k: f"{_human(v['packets'])}/{_human(v['bytes'])}" for k, v in c.items()}
        lines.append(
            f"{sa['slot']:>4}  {sa['ike'] + '/' + sa['child']:<14} {sa['unique_id']:>4}  "
            f"{sa['remote_id'][:22]:<22} {(sa['virtual_ips'] or ['-'])[0]:<15} "
            f"{sa['mark_in']:>#6x}  {sa['spi_in']:<8}  {cell['lan_to_sa']:>12}  "
            f"{cell['sa_to_lan']:>12}  {cell['sa_to_sa']:>12}"
        )
    t = snap.doc["totals"]
    lines.append(
        f"{'':>4}  {'total':<14} {len(snap.sas):>4}  {'':<22} {'':<15} {'':>6}  {'':<8}  "
        + "  ".join(
            f"{_human(t[k]['packets']) + '/' + _human(t[k]['bytes']):>12}"
            for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")
        )
    )
    drops = ", ".join(f"{k} {v}" for k, v in snap.doc["drops"].items() if v) or "none"
    lines.append(f"drops: {drops}")
    daemon = snap.doc["daemon"]
    lines.append(
        f"daemon pid {daemon['pid']}, VICI "
        f"{'connected' if daemon['vici_connected'] else 'DISCONNECTED'}, "
        f"sync errors {daemon['sync_errors']}"
    )
    for uid, reason in snap.doc["ignored"].items():
        lines.append(f"ignored SA #{uid}: {reason}")
    return "\n".join(lines)
