"""The unit file passes systemd-analyze verify (with ExecStart pointing at this checkout's
console script, as an install would)."""

from __future__ import annotations

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
    unit.write_text(text.replace("/usr/local/bin/forecast-bpf", str(script)))
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


def test_verify_catches_a_mistyped_key(tmp_path: Path) -> None:
    _rc, problems, _output = _verify(
        tmp_path, UNIT.read_text().replace("Type=notify", "Tpye=notify")
    )
    assert any("Unknown key 'Tpye'" in line for line in problems)


def test_unit_is_notify_with_a_watchdog_and_bounded_capabilities() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert "After=strongswan.service" in text
    caps = next(line for line in text.splitlines() if line.startswith("CapabilityBoundingSet="))
    assert set(caps.split("=")[1].split()) == {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_SYS_RESOURCE",
    }
