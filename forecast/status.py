"""`forecast-bpf status`: per-SA counters, live from the pinned maps.

Why the pinned maps and not a socket to the daemon: the counters live in the kernel, so status
reads the same numbers the data path writes, with no daemon round-trip that could stall or
lie; the daemon's state file only says which SA each slot holds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from forecast.layout import (
    DIRECTION_NAMES,
    DIRECTION_TITLES,
    FAMILY_NAMES,
    Direction,
    SaDropReason,
)
from forecast.pinned import PinnedCounters, PinnedError

SCHEMA_VERSION = 1
DIRECTION_KEYS = DIRECTION_NAMES


STORM = SaDropReason.STORM.name.lower()


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
    from forecast import tc  # pyroute2 is slow to import; only needed when the daemon is gone

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
        slots = sorted(state["slots"].items(), key=lambda kv: int(kv[0]))
        all_counters = counters.slots([int(slot) for slot, _info in slots])
        all_drops = counters.sa_drop_counts([int(slot) for slot, _info in slots])
        for slot, info in slots:
            by_dir = all_counters[int(slot)]
            entry = dict(info, slot=int(slot), counters={})
            entry["drops"] = {r.name.lower(): n for r, n in all_drops[int(slot)].items()}
            for d, key in DIRECTION_KEYS.items():
                packets, nbytes = by_dir[d]
                entry["counters"][key] = {"packets": packets, "bytes": nbytes}
                totals[key]["packets"] += packets
                totals[key]["bytes"] += nbytes
            sas.append(entry)
        drops = {r.name.lower(): n for r, n in counters.drop_counts().items()}
        families = {
            FAMILY_NAMES[f]: {
                DIRECTION_KEYS[d]: {"packets": packets, "bytes": nbytes}
                for d, (packets, nbytes) in by_dir.items()
            }
            for f, by_dir in counters.family_counts().items()
        }
        local = {r.name.lower(): n for r, n in counters.local_counts().items()}
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
                "netfilter": state.get("netfilter"),
                "updated": state.get("updated"),
            },
            "sas": sas,
            "totals": totals,
            # The same copies by address family, over every SA the data path ever held.
            "families": families,
            "drops": drops,
            # Copies the data path handed over that the kernel could not send (XFRM interface
            # TX errors since the daemon started): queues after encryption, missing policies.
            "lost_after_datapath": int(state.get("lost_after_datapath", 0)),
            "ignored": state.get("ignored", {}),
            # What became of the copies for mark-only SAs, sent from the daemon's raw socket,
            # by result (live, from a pinned map); null when the local output path is off.
            "local_out": local if state.get("local_out") else None,
        }
    )


def not_running_doc(reason: str) -> dict[str, Any]:
    """What `status --json` prints when nothing runs: the schema's shape, empty, with why."""
    return {
        "schema": SCHEMA_VERSION,
        "daemon": {"running": False, "reason": reason},
        "sas": [],
    }


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


SORT_KEYS = ("slot", "id", "remote", "vip", "conn", *DIRECTION_KEYS.values())


@dataclass(frozen=True)
class View:
    """Which SAs the table shows, in which order, on how much screen. JSON ignores the screen."""

    sort: str = "slot"
    top: int | None = None
    match: str | None = None
    width: int = 0  # 0: as wide as the rows need
    height: int = 0  # 0: every row (--watch sets the terminal's height)


def matches(sa: dict[str, Any], text: str) -> bool:
    """--match: a unique id (exact), a virtual IP, a connection/child name or a remote id
    (any part of it, case-insensitive)."""
    if text.isdigit():
        return str(sa["unique_id"]) == text
    needle = text.lower()
    hay = [*sa["virtual_ips"], sa["remote_id"], f"{sa['ike']}/{sa['child']}"]
    return any(needle in str(h).lower() for h in hay)


def _sort_key(key: str, rates: dict[str, dict[str, float]] | None) -> Any:
    if key == "slot":
        return lambda sa: sa["slot"]
    if key == "id":
        return lambda sa: sa["unique_id"]
    if key == "remote":
        return lambda sa: sa["remote_id"]
    if key == "vip":
        return lambda sa: [(a.version, int(a)) for a in map(ip_address, sa["virtual_ips"][:1])]
    if key == "conn":
        return lambda sa: (sa["ike"], sa["child"], sa["unique_id"])
    # Counters: busiest first, by rate when there are rates (--watch), else by total.
    r = rates or {}
    return lambda sa: (
        -r.get(str(sa["unique_id"]), {}).get(key, 0.0),
        -sa["counters"][key]["packets"],
        sa["slot"],
    )


def select(
    sas: list[dict[str, Any]], view: View, rates: dict[str, dict[str, float]] | None = None
) -> list[dict[str, Any]]:
    if view.sort not in SORT_KEYS:
        raise ValueError(f"--sort {view.sort!r}: one of {', '.join(SORT_KEYS)}")
    out = [sa for sa in sas if view.match is None or matches(sa, view.match)]
    out.sort(key=_sort_key(view.sort, rates))
    return out if view.top is None else out[: view.top]


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    keep: int  # the lower, the longer it stays when the terminal is narrow
    right: bool = False


def _columns(w: int) -> list[Column]:
    return [
        Column("SLOT", 5, 7, True),
        Column("CONN/CHILD", 12, 5),
        Column("ID", 6, 1, True),
        Column("REMOTE", 18, 2),
        Column("VIRTUAL IP", 15, 4),
        Column("MARK", 7, 8, True),
        Column("SPI IN/OUT", 17, 9),
        Column("PATH", 9, 7),
        *(
            Column(DIRECTION_TITLES[d], w, keep, True)
            for d, keep in (
                (Direction.LAN_TO_SA, 3),
                (Direction.SA_TO_LAN, 3),
                (Direction.SA_TO_SA, 6),
            )
        ),
        Column("DROPS", 7, 6, True),
    ]


def _fit(columns: list[Column], width: int) -> list[Column]:
    """Drop the least needed columns until the row fits; REMOTE then gives up characters."""
    shown = list(columns)

    def total(cols: list[Column]) -> int:
        return sum(c.width for c in cols) + 2 * (len(cols) - 1)

    while width and total(shown) > width and len(shown) > 3:
        shown.remove(max(shown, key=lambda c: c.keep))
    if width and total(shown) > width:
        shown = [
            Column(c.title, max(8, c.width - (total(shown) - width)), c.keep, c.right)
            if c.title == "REMOTE"
            else c
            for c in shown
        ]
    return shown


def _cells(sa: dict[str, Any], r: dict[str, float] | None) -> dict[str, str]:
    return {
        "SLOT": str(sa["slot"]),
        "CONN/CHILD": sa["ike"] + "/" + sa["child"],
        "ID": str(sa["unique_id"]),
        "REMOTE": sa["remote_id"],
        "VIRTUAL IP": (sa["virtual_ips"] or ["-"])[0],
        "MARK": f"{sa['mark_in']:#x}",
        "SPI IN/OUT": sa["spi_in"] + "/" + sa["spi_out"],
        "PATH": sa.get("path", "xfrm"),
        **{DIRECTION_TITLES[d]: _cell(sa["counters"], key, r) for d, key in DIRECTION_KEYS.items()},
        "DROPS": _human(sum(sa.get("drops", {}).values())),
    }


def _row(columns: list[Column], cells: dict[str, str]) -> str:
    out = []
    for c in columns:
        text = cells.get(c.title, "")[: c.width]
        out.append(f"{text:>{c.width}}" if c.right else f"{text:<{c.width}}")
    return "  ".join(out).rstrip()


def render_table(
    snap: Snapshot, rates: dict[str, dict[str, float]] | None = None, view: View | None = None
) -> str:
    view = view or View()
    columns = _fit(_columns(22 if rates is not None else 14), view.width)
    shown = select(snap.sas, view, rates)
    footer = _footer(snap)
    # The header, the totals row, a "not shown" line and the footer always fit; the rows get
    # what is left.
    room = max(1, view.height - 3 - len(footer)) if view.height else len(shown)
    lines = [_row(columns, {c.title: c.title for c in columns})]
    for sa in shown[:room]:
        # With rates: this SA's (none yet for a new SA); without: plain totals.
        r = None if rates is None else rates.get(str(sa["unique_id"]), {})
        lines.append(_row(columns, _cells(sa, r)))
    hidden = len(snap.sas) - min(len(shown), room)
    totals_rates = rates.get("total", {}) if rates is not None else None
    t = snap.doc["totals"]
    lines.append(
        _row(
            columns,
            {
                "CONN/CHILD": "total",
                "ID": str(len(snap.sas)),
                "DROPS": _human(sum(sum(sa.get("drops", {}).values()) for sa in snap.sas)),
                "REMOTE": "" if any(c.title == "CONN/CHILD" for c in columns) else "total",
                **{
                    DIRECTION_TITLES[d]: _cell(t, key, totals_rates)
                    for d, key in DIRECTION_KEYS.items()
                },
            },
        )
    )
    if hidden:
        lines.append(f"{hidden} of {len(snap.sas)} SAs not shown (--match, --sort, --top N)")
    lines += footer
    return "\n".join(line[: view.width] if view.width else line for line in lines)


def _footer(snap: Snapshot) -> list[str]:
    drops = ", ".join(f"{k} {v}" for k, v in snap.doc["drops"].items() if v) or "none"
    lines = [f"drops: {drops}"]
    families = snap.doc.get("families")
    if families:
        lines.append(
            "copies by family: "
            + " | ".join(
                f"{name[:2].upper()}{name[2:]} "
                + " ".join(
                    f"{DIRECTION_TITLES[d]} {_human(families[name][key]['packets'])}"
                    for d, key in DIRECTION_KEYS.items()
                )
                for name in FAMILY_NAMES.values()
                if name in families
            )
        )
    # Who floods: the SAs the storm guard held back most.
    storming = sorted(
        (sa for sa in snap.sas if sa.get("drops", {}).get(STORM, 0)),
        key=lambda sa: -sa["drops"][STORM],
    )
    if storming:
        lines.append(
            "over their rate: "
            + ", ".join(
                f"#{sa['unique_id']} {sa['remote_id']} {sa['drops'][STORM]}" for sa in storming[:3]
            )
            + (f" and {len(storming) - 3} more" if len(storming) > 3 else "")
        )
    lost = snap.doc.get("lost_after_datapath", 0)
    if lost:
        lines.append(
            f"lost after the data path: {lost} copies (TX errors on the XFRM interface: a full "
            "queue after encryption or no policy; see the daemon's log)"
        )
    local = snap.doc.get("local_out")
    if local:
        failed = ", ".join(f"{k} {v}" for k, v in local.items() if k != "sent" and v)
        lines.append(
            f"local output (mark-only SAs): {local.get('sent', 0)} copies sent"
            + (f"; not sent: {failed}" if failed else "")
        )
    daemon = snap.doc["daemon"]
    if daemon["running"]:
        lines.append(
            f"daemon pid {daemon['pid']}, VICI "
            f"{'connected' if daemon['vici_connected'] else 'DISCONNECTED'}, "
            f"sync errors {daemon['sync_errors']}"
            + (f", MARK rules in {daemon['netfilter']}" if daemon.get("netfilter") else "")
        )
    else:
        lines.append(
            f"daemon DOWN (pid {daemon['pid']} is gone); the data path still forwards for "
            f"these {len(snap.sas)} SAs, frozen until a daemon is back"
        )
    ignored = list(snap.doc["ignored"].items())
    for uid, reason in ignored[:5]:
        lines.append(f"ignored SA #{uid}: {reason}")
    if len(ignored) > 5:
        lines.append(f"... and {len(ignored) - 5} more ignored SAs (`forecast-bpf check`)")
    return lines


CLEAR = "\x1b[H\x1b[2J"


def terminal_view(view: View | None = None, *, full_height: bool = True) -> View:
    """`view` sized to the terminal (COLUMNS/LINES when set, as shutil reads them)."""
    size = shutil.get_terminal_size((0, 0))
    base = view or View()
    return replace(base, width=size.columns, height=size.lines if full_height else 0)


def watch(
    state_file: Path,
    interval: float,
    out: Any,
    iterations: int | None = None,
    view: View | None = None,
) -> int:
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
            screen = terminal_view(view)
            # Two title lines above the table.
            screen = replace(screen, height=max(0, screen.height - 2)) if screen.height else screen
            out.write(
                f"{CLEAR}forecast-bpf status  {stamp}  every {interval:g} s  "
                f"(Ctrl-C to quit)\n\n{render_table(snap, rates, screen)}\n"
            )
            out.flush()
            previous, last = snap, now
            n += 1
            if iterations is None or n < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
    return 0
