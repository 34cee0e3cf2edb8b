"""The unit file passes systemd-analyze verify (with ExecStart pointing at this checkout's
console script, as an install would) and its hardening keeps the exposure score at 3.0 or
lower. That it runs under a real systemd is the lab tier's to show."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "forecast-bpf.service"


def _verify(tmp_path: Path, text: str) -> tuple[int, list[str], str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing (Debian's systemd package)", pytrace=False)
    script = Path(sys.executable).with_name("forecast-bpf")
    unit = tmp_path / "forecast-bpf.service"
    unit.write_text(text.replace("/usr/bin/forecast-bpf", str(script)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys are only warnings (exit 0): any line about our unit is a problem.
    problems = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "forecast-bpf.service" in line
    ]
    return proc.returncode, problems, proc.stdout + proc.stderr


def test_unit_verifies(tmp_path: Path) -> None:
    rc, problems, output = _verify(tmp_path, UNIT.read_text())
    assert rc == 0 and not problems, output


def test_exposure_is_at_most_3(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for forecast-bpf.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"systemd-analyze security: exposure {m[1]}")
    assert float(m[1]) <= 3.0, proc.stdout


def test_unit_is_notify_with_a_watchdog_and_bounded_capabilities() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert "After=strongswan.service" in text
    assert re.search(r"^Nice=([1-9]|1[0-9])$", text, re.M)  # below packet processing (softirq)
    caps = next(line for line in text.splitlines() if line.startswith("CapabilityBoundingSet="))
    # The three the lab measured as needed (tests/lab/scripts/systemd_lifecycle.py).
    assert set(caps.split("=")[1].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"}


def test_restart_keeps_what_the_next_daemon_adopts() -> None:
    text = UNIT.read_text()
    assert "RuntimeDirectoryPreserve=restart" in text  # state file: the groups it holds
    # the two membership sockets (IPv4 and IPv6 groups), handed from daemon to daemon
    m = re.search(r"^FileDescriptorStoreMax=(\d+)$", text, re.M)
    assert m and int(m[1]) >= 2, text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "-/run/xtables.lock" in text  # absent on nftables hosts: must not fail the start
