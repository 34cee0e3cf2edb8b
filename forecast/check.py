"""`forecast-bpf check`: child by child, what strongSwan's live SAs lack for forecast-bpf."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from forecast import desired
from forecast.config import Config
from forecast.sa import SaTable
from forecast.vici_source import list_sas


@dataclass
class ChildReport:
    label: str
    problems: list[str] = field(default_factory=list)
    path: str | None = None  # how its copies are sent (desired.PATH_*), None: not served
    notes: list[str] = field(default_factory=list)  # worth knowing, nothing to fix


def _inbound_output_marks() -> dict[int, int]:
    """SPI → output-mark of every XFRM state (what set_mark_in installs), from the kernel."""
    text = subprocess.run(
        ["ip", "xfrm", "state"], capture_output=True, text=True, check=False
    ).stdout
    out = {}
    for block in re.split(r"\n(?=src )", text):
        spi = re.search(r"proto esp spi (0x[0-9a-f]+)", block)
        mark = re.search(r"output-mark (0x[0-9a-f]+)", block)
        if spi:
            out[int(spi[1], 16)] = int(mark[1], 16) if mark else 0
    return out


def run(cfg: Config) -> list[ChildReport]:
    table = SaTable()
    table.load_snapshot(list_sas(cfg.vici_socket))
    output_marks = _inbound_output_marks()
    reports = []
    for child in table.active():
        # What the daemon ignores it for, worded once (desired.py), then what only the kernel
        # can tell.
        path = desired.path_of(child, cfg)
        report = ChildReport(
            child.label,
            desired.what_is_missing(child, cfg),
            path,
            desired.path_notes(child, cfg),
        )
        # The plugin's configuration has no set_mark_in; the daemon's ESP rule marks instead.
        if (
            path != desired.PATH_LOCAL_OUT
            and child.marked
            and output_marks.get(child.spi_in, 0) != child.mark_in
        ):
            report.problems.append(
                "decrypted packets do not carry the SA's mark: set set_mark_in = %same "
                "(kernel >= 4.19); without it only the daemon's ESP MARK rule marks them"
            )
        if not any(desired.forwards_to(ts, None) for ts in child.remote_ts):
            report.problems.append(
                "no multicast/broadcast remote TS (add 224.0.0.0/4 and "
                "the LAN broadcast to remote_ts)"
            )
        reports.append(report)
    return reports
