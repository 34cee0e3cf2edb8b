"""The real `forecast-bpf run` on a lab gateway: config, start, readiness, status, stop, and
what (if anything) it left behind. Runs inside the gateway's namespace (a lab script's)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forecast import netfilter
from forecast_lab.topology import Topology

PIN_DIR = Path("/sys/fs/bpf/forecast-bpf")
XFRM_NAME = "fcxfrm0"


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


class LabDaemon:
    def __init__(
        self,
        topo: Topology,
        *,
        reinject: list[str],
        groups: list[str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        """reinject: CHILD_SA config names whose clients get other clients' multicast;
        extra: more lines of YAML configuration."""
        self.topo = topo
        self.work = Path(f"/tmp/{topo.prefix}-daemon")
        self.work.mkdir(exist_ok=True)
        self.state_file = self.work / "state.json"
        self.config = self.work / "forecast-bpf.yaml"
        self.log = self.work / "daemon.log"
        lines = [
            f"interface: {topo.gw_lan_if}",
            f"reinject: [{', '.join(reinject)}]",
            f"xfrm: {{name: {XFRM_NAME}, if_id: {topo.extra['if_id']}, dev: {topo.gw_wan_if}}}",
            f"vici_socket: {topo.gateway.vici_socket}",
            f"state_file: {self.state_file}",
            "log_level: info",
        ]
        if groups:
            lines.append(f"groups: [{', '.join(groups)}]")
        lines += extra or []
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forecast", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )

    def start(self, expect: int | None = None) -> float:
        """Start and wait until every SA of the lab (or `expect` SAs) is in the data path;
        returns seconds."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            # At the unit's priority (Nice=10): packet processing comes first.
            [
                "nice",
                "-n",
                "10",
                sys.executable,
                "-m",
                "forecast",
                "run",
                "--config",
                str(self.config),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        n = len(self.topo.clients) * self.topo.identities if expect is None else expect
        # Ready by its own log, not by the state file alone: a daemon that took over from
        # another finds that one's state file already complete.
        self.wait_state(
            "every SA in the data path",
            lambda s: (
                bool(s.get("vici_connected"))
                and len(s["slots"]) == n
                and "ready:" in self.log_tail(100_000)
            ),
        )
        return time.monotonic() - t0

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_state(
        self, what: str, pred: Callable[[dict[str, Any]], bool], seconds: float = 300
    ) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s = self.state()
            if s and pred(s):
                return s
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; daemon log:\n{self.log_tail()}")

    def by_client(self, state: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        s = state if state is not None else self.state()
        return {v["remote_id"].split("@")[0]: v for v in s.get("slots", {}).values()}

    def status_json(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        if out.returncode != 0:
            raise RuntimeError(f"status failed: {out.stderr}")
        return dict(json.loads(out.stdout))

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""

    def handover(self) -> int:
        """SIGUSR2: the daemon exits and leaves the data path forwarding for the next one."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR2)
        rc = self.proc.wait(timeout=60)
        if rc != 0:
            raise RuntimeError(f"hand-over exit {rc}; daemon log:\n{self.log_tail()}")
        return rc

    def stop(self) -> dict[str, Any]:
        """SIGTERM and wait; returns what is left of the daemon's state (all falsy: clean)."""
        rc = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = -9
        return {
            "exit_code": rc,
            "rules": [rules.detail for rules in netfilter.holding()],
            "routes": _sh("ip", "route", "show", "proto", "252").strip(),
            "xfrm_link": XFRM_NAME in _sh("ip", "-br", "link"),
            "lan_filters": _sh(
                "tc", "filter", "show", "dev", self.topo.gw_lan_if, "ingress"
            ).strip(),
            # the tunnel program's second place, for mark-only SAs' decrypted traffic
            "wan_filters": _sh(
                "tc", "filter", "show", "dev", self.topo.gw_wan_if, "ingress"
            ).strip(),
            "pins": PIN_DIR.exists() and any(PIN_DIR.iterdir()),
            "state_file": self.state_file.exists(),
        }

    @staticmethod
    def clean(left: dict[str, Any]) -> bool:
        return left["exit_code"] == 0 and not any(v for k, v in left.items() if k != "exit_code")
