"""forecast-bpf as a Debian service under a real systemd (PID 1 of the lab VM): the package
installs, starts, reloads, restarts, upgrades, survives kill -9 and a hang, stops and purges,
and no copy of the LAN's 200 packets/s is lost on the way (tests/lab/scripts/
systemd_lifecycle.py prints each figure)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.lab.conftest import LabRunner

REPO = Path(__file__).resolve().parents[2]


def _build(out: Path, version: str) -> Path:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_deb.py"), str(out), version],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def test_package_lifecycle_under_systemd(lab_systemd: LabRunner, tmp_path: Path) -> None:
    debs = [_build(tmp_path, v) for v in ("0.1.0+lab1", "0.1.0+lab2")]
    run = lab_systemd.script(
        "systemd_lifecycle.py",
        "--gateway-mode",
        "forecast-bpf",
        "--clients",
        "2",
        script_args=tuple(str(lab_systemd.guest_path(d)) for d in debs),
        timeout=900,
        # The lab's charons keep their VICI sockets in its work directory: not under /tmp,
        # which the service cannot see (PrivateTmp), nor /run, which each charon replaces.
        env={"TMPDIR": "/srv"},
    )
    print(run.output[-6000:])
    failed = [r for r in run.results if not r["ok"]]
    assert run.rc == 0 and not failed, run.output[-8000:]
    names = [r["name"] for r in run.results]
    for tag in ("reload", "restart", "upgrade", "crash", "watchdog"):
        assert f"{tag}: every copy reached every client exactly once" in names
    assert names[-1] == "purge: nothing of forecast-bpf left in the kernel"
    # Every capability in the unit was measured as needed (a cold start without it fails).
    caps = run.result("least privilege")["detail"]
    assert caps["needed"] == caps["bounding_set"] and caps["trials"]["none taken (legacy)"]["works"]
    copies = run.result("restart: every copy")["detail"]
    assert all(c["lost"] == 0 and c["sent"] == 2000 for c in copies.values())
