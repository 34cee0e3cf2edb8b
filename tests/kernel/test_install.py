"""forecast-bpf as an operator installs it, not as a checkout runs it: the wheel in a clean
virtualenv, and the Debian package's files, each running the kernel tier's daemon test
(tests/kernel/test_daemon_control_plane.py) with the daemon and the CLI from that install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON_TEST = (
    "tests/kernel/test_daemon_control_plane.py::test_connect_rekey_disconnect_stop[nftables]"
)


def _daemon_test_with(python: Path, tmp_path: Path) -> str:
    """Run the daemon test with `python` as the daemon's and the CLI's interpreter; returns
    the daemon's log, which names where forecast was imported from."""
    env = {**os.environ, "FORECAST_TEST_DAEMON_PYTHON": str(python)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'pt'}",
            DAEMON_TEST,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    logs = list((tmp_path / "pt").rglob("daemon.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        timeout=300,
    )
    venv = tmp_path / "venv"
    # bcc exists only as Debian's python3-bpfcc: the virtualenv sees the system's packages.
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", *map(str, wheels.glob("*.whl"))],
        check=True,
        timeout=600,
    )
    site = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import forecast, os; print(os.path.dirname(forecast.__file__))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert site.startswith(str(venv)) and "site-packages" in site, site
    for data in (
        "bpf/lan_ingress.bpf.c",
        "bpf/lib/maps.h",
        "dashboards/forecast-bpf.json",
        "packaging/forecast-bpf.service",
        "packaging/forecast-bpf.yaml",
    ):
        assert (Path(site) / data).is_file(), data
    log = _daemon_test_with(venv / "bin/python", tmp_path)
    assert re.search(rf"forecast-bpf \S+ from {re.escape(site)}\n", log), log[:2000]


def test_debian_package_files_run_the_daemon(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_deb.py"), str(tmp_path), "0.1.0+test1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    deb = Path(build.stdout.strip())
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True).stdout
    assert "Version: 0.1.0+test1" in info
    for dep in ("python3-bpfcc", "strongswan-swanctl", "nftables | iptables"):
        assert dep in info
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    names = [line.split()[-1].removeprefix(".") for line in files.splitlines()]
    for path in (
        "/usr/bin/forecast-bpf",
        "/lib/systemd/system/forecast-bpf.service",
        "/etc/forecast-bpf/forecast-bpf.yaml",
        "/usr/share/forecast-bpf/dashboards/forecast-bpf.json",
        "/usr/lib/forecast-bpf/pyroute2/__init__.py",
        "/usr/lib/forecast-bpf/vici/__init__.py",
        "/usr/lib/forecast-bpf/prometheus_client/__init__.py",
    ):
        assert path in names, path
    # Nothing for the system's site-packages, no lab, byte code shipped (never written later).
    assert not [n for n in names if "site-packages" in n or "dist-packages" in n]
    assert not [n for n in names if n.startswith("/usr/lib/forecast-bpf/forecast_lab")]
    assert any(n.endswith(".cpython-311.pyc") for n in names)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text() == "/etc/forecast-bpf/forecast-bpf.yaml\n"
    # apt would resolve its dependencies from Debian on this machine.
    sim = subprocess.run(["apt-get", "-s", "install", str(deb)], capture_output=True, text=True)
    assert sim.returncode == 0 and "Inst forecast-bpf" in sim.stdout, sim.stdout + sim.stderr

    root = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    lib = root / "usr/lib/forecast-bpf"
    version = subprocess.run(
        [
            "/usr/bin/python3",
            "-IB",
            "-c",
            f"import sys; sys.path.insert(0, {str(lib)!r}); "
            "from forecast.cli import main; main(['--version'])",
        ],
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == "forecast-bpf 0.1.0", version.stderr
    # Debian's interpreter with only the package's private libraries added, as the launcher.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={lib} exec /usr/bin/python3 -B "$@"\n')
    python.chmod(0o755)
    log = _daemon_test_with(python, tmp_path)
    assert f"from {lib}/forecast\n" in log, log[:2000]
