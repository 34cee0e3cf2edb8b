"""A real daemon on the lab gateway of this kernel: real charons with user-space ESP, the
product's Daemon with a veth standing in for the XFRM interface (tests/kernel/standin_daemon.py).
Shared by the control-plane and observability tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forecast import rules_nft
from forecast_lab import netns
from forecast_lab.conns import GatewayMode
from forecast_lab.lab import Lab, LabOptions

HELPER = Path(__file__).with_name("standin_daemon.py")
# The interpreter the daemon runs under: this one, or an installed build's (test_install.py).
DAEMON_PYTHON = os.environ.get("FORECAST_TEST_DAEMON_PYTHON", sys.executable)
IF_ID = 42


def _spawn(gw: str, cfg_path: Path, log: Path, env: dict[str, str] | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", gw, DAEMON_PYTHON, str(HELPER), str(cfg_path), "xfs0"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # The most permissive umask: what the daemon keeps private it must make so itself.
        umask=0,
    )


@dataclass
class Running:
    lab: Lab
    proc: subprocess.Popen[str]
    cfg_path: Path
    state_file: Path
    pin_dir: Path
    log: Path

    def spawn(self) -> None:
        """Start another daemon on the same config (after this one exited or was killed)."""
        assert self.proc.poll() is not None, "the previous daemon still runs"
        self.proc = _spawn(self.gw, self.cfg_path, self.log, None)

    @property
    def gw(self) -> str:
        return self.lab.topology.gateway.netns

    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def wait(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], seconds: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}:\n" + self.log.read_text()
                )
            try:
                state = self.state()
                if predicate(state):
                    return state
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}; state {state}\n" + self.log.read_text()[-3000:]
        )

    def rules(self) -> list[str]:
        """Our MARK rules in either back end (the lines each prints), both families."""
        legacy = [
            line
            for tool in ("iptables-save", "ip6tables-save")
            for line in netns.run([tool, "-t", "mangle"], netns=self.gw).stdout.splitlines()
            if "FORECAST" in line
        ]
        return legacy + rules_nft.NftRules(self.gw).current()

    def routes(self) -> str:
        return "".join(
            netns.run(["ip", family, "route", "show", "proto", "252"], netns=self.gw).stdout
            for family in ("-4", "-6")
        )


def start_running(
    run_prefix: str,
    tmp_path: Path,
    extra_config: str = "",
    env: dict[str, str] | None = None,
    charon_down: bool = False,
    ipv6: bool = False,
) -> Iterator[Running]:
    """A lab (2 clients, not connected) and the daemon on its gateway. charon_down: the
    gateway's charon is stopped before the daemon starts (and not waited for). ipv6: a
    dual-stack lab (IPv6 virtual IPs and selectors too)."""
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    # Mounted before the daemon starts, so its `ip netns exec` mount namespace shares it
    # with this test process (which reads the pins as `status` does).
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    opts = LabOptions(
        clients=2,
        libipsec=True,
        mode=GatewayMode.FORECAST_BPF,
        if_id=IF_ID,
        connect=False,
        prefix=f"{run_prefix}p",
        ipv6=ipv6,
    )
    lab = Lab(opts)
    proc = None
    try:
        lab.up()
        gw = lab.topology.gateway.netns
        netns.add_veth("xfs0", gw, "xfs0p", gw)
        for dev in ("xfs0", "xfs0p"):
            netns.run(["ip", "link", "set", dev, "up"], netns=gw)
        state_file, pin_dir = tmp_path / "state.json", bpffs / "forecast"
        cfg_path = tmp_path / "forecast-bpf.yaml"
        cfg_path.write_text(
            f"interface: eth1\nreinject: [rw]\nxfrm: {{name: xfs0, if_id: {IF_ID}}}\n"
            f"vici_socket: {lab.topology.gateway.vici_socket}\n"
            f"pin_dir: {pin_dir}\nstate_file: {state_file}\n" + extra_config
        )
        log = tmp_path / "daemon.log"
        if charon_down:
            lab.charons["gw"].stop()
        proc = _spawn(gw, cfg_path, log, env)
        r = Running(lab, proc, cfg_path, state_file, pin_dir, log)
        if not charon_down:
            r.wait("the daemon's first snapshot", lambda s: s["vici_connected"])
        yield r
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        lab.down()
        subprocess.run(["umount", str(bpffs)], check=False)


@pytest.fixture
def running(run_prefix: str, tmp_path: Path) -> Iterator[Running]:
    yield from start_running(run_prefix, tmp_path)
