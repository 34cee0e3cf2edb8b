"""Build build/forecast-bpf_<version>_all.deb: the daemon and CLI for a Debian 12 gateway.

What Debian ships at the needed versions comes from Debian (python3-bpfcc, python3-yaml,
strongSwan, iptables); the Python libraries it lacks at them (pyroute2 >= 0.9, vici,
prometheus-client >= 0.20) are installed privately under /usr/lib/forecast-bpf, at the versions
this checkout's virtualenv was tested with. Nothing goes into the system's site-packages, no
pip runs on the gateway, and every file is dpkg's (byte-code compiled here, never written at
run time), so `apt purge` leaves nothing. The lab is not part of it.

Usage: build_deb.py OUT_DIR [VERSION]   (VERSION: the project's own by default)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRIVATE_LIBS = ("pyroute2", "vici", "prometheus_client")
LIB_DIR = "usr/lib/forecast-bpf"

CONTROL = """\
Package: forecast-bpf
Version: {version}
Architecture: all
Maintainer: forecast-bpf developers <forecast-bpf@localhost>
Section: net
Priority: optional
Depends: python3 (>= 3.11), python3-bpfcc, python3-yaml, libbpf1, strongswan-charon,
 strongswan-swanctl, nftables | iptables, iproute2
Recommends: linux-headers-amd64
Description: multicast and broadcast across strongSwan IPsec tunnels (eBPF)
 Forwards mDNS, LLMNR, SSDP/WS-Discovery and NetBIOS announcements between a gateway's LAN
 and its road-warrior clients, and between the clients, with a TC/eBPF data path: the job of
 strongSwan's forecast plugin, with per-SA counters, Prometheus metrics and restarts that do
 not interrupt forwarding.
"""

LAUNCHER = """\
#!/usr/bin/python3 -IB
# forecast-bpf: the package's private libraries first, Debian's (bcc, yaml) after them.
import sys

sys.path.insert(0, "/{lib_dir}")
from forecast.cli import main

# Guarded: the BPF compile runs in a spawned child that imports this file as a module.
if __name__ == "__main__":
    sys.exit(main())
"""

POSTINST = """\
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ -n "$2" ]; then
    # An upgrade: a restart hands the data path over to the new daemon, which adopts it (or
    # swaps in the new programs atomically): forwarding never stops.
    systemctl try-restart forecast-bpf.service
  else
    systemctl enable forecast-bpf.service
    # READY waits for charon's first SA snapshot: never hold apt up for it.
    systemctl start --no-block forecast-bpf.service
  fi
fi
exit 0
"""

PRERM = """\
#!/bin/sh
set -e
case "$1" in
  remove|deconfigure)
    if [ -d /run/systemd/system ]; then
      systemctl disable forecast-bpf.service >/dev/null 2>&1 || true
      systemctl stop forecast-bpf.service || true
    fi
    # A data path left without a daemon (a crash, a hand-over without a successor).
    /usr/bin/forecast-bpf stop --config /etc/forecast-bpf/forecast-bpf.yaml >/dev/null 2>&1 || true
    ;;
esac
exit 0
"""

POSTRM = """\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
  rm -rf /var/cache/forecast-bpf /run/forecast-bpf
  rmdir /etc/forecast-bpf 2>/dev/null || true
fi
exit 0
"""


def project_version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise SystemExit("build_deb: no version in pyproject.toml")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build(out_dir: Path, version: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forecast-deb-") as tmp:
        root = Path(tmp) / "root"
        wheels = Path(tmp) / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
            check=True,
        )
        pins = [f"{name}=={metadata.version(name)}" for name in PRIVATE_LIBS]
        lib = root / LIB_DIR
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-compile",
                "--target",
                str(lib),
                *map(str, wheels.glob("*.whl")),
                *pins,
            ],
            check=True,
        )
        # Only the importable code: the gateway needs neither the lab nor pip's metadata
        # scripts (the entry point is ours, below).
        shutil.rmtree(lib / "forecast_lab")
        shutil.rmtree(lib / "bin", ignore_errors=True)
        share = root / "usr/share/forecast-bpf"
        shutil.copytree(
            lib / "forecast" / "dashboards",
            share / "dashboards",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        _write(
            root / "lib/systemd/system/forecast-bpf.service",
            (REPO / "packaging/forecast-bpf.service").read_text(),
        )
        _write(
            root / "etc/forecast-bpf/forecast-bpf.yaml",
            (REPO / "packaging/forecast-bpf.yaml").read_text(),
        )
        _write(root / "usr/share/doc/forecast-bpf/README.md", (REPO / "README.md").read_text())
        _write(
            root / "usr/share/doc/forecast-bpf/copyright",
            "forecast-bpf, GPL-2.0-or-later; bundled: "
            + ", ".join(pins)
            + " (their own licences, in their dist-info)\n",
        )
        _write(root / "usr/bin/forecast-bpf", LAUNCHER.format(lib_dir=LIB_DIR), 0o755)
        # Debian's interpreter compiles: its byte code matches what runs on the gateway.
        subprocess.run(
            ["/usr/bin/python3", "-m", "compileall", "-q", "-j", "0", str(lib)], check=True
        )
        debian = root / "DEBIAN"
        _write(debian / "control", CONTROL.format(version=version))
        _write(debian / "conffiles", "/etc/forecast-bpf/forecast-bpf.yaml\n")
        for name, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
            _write(debian / name, text, 0o755)
        for path in root.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        out = out_dir / f"forecast-bpf_{version}_all.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = build(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else project_version())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
