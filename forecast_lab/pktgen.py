"""The kernel's packet generator (pktgen) as the benchmark's paced sender.

It runs in a kernel thread bound to CPU 0, so the sender is never a Python loop per packet and
never the bottleneck: it transmits on the LAN host's device, and the gateway receives the
frames exactly as from a wire (through its receive queue, which drops when it overflows).
Between frames closer than 100 µs apart pktgen busy-waits on its own CPU instead of sleeping;
the benchmark keeps the gateway on the other CPU, so that spin is never billed to it.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from forecast_lab import netns

# The calling thread's namespace (/proc/net follows the process's first thread).
PROC = Path("/proc/thread-self/net/pktgen")
ETH_IP_UDP = 14 + 20 + 8
MIN_PAYLOAD = 18  # pktgen's own header (magic, sequence, timestamp) lives in the payload


class PktgenError(RuntimeError):
    """pktgen refused a setting or did not send; the message names which."""


@dataclass(frozen=True)
class Flow:
    """What one pktgen run sends: UDP from src to dst, `payload` bytes of UDP payload."""

    src_ip: str
    dst_ip: str
    dst_mac: str
    payload: int
    dst_port: int
    src_port: int = 40000

    @property
    def frame_size(self) -> int:
        return ETH_IP_UDP + self.payload


@dataclass(frozen=True)
class Sent:
    packets: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


def multicast_mac(group: str) -> str:
    """The Ethernet address of an IPv4 group (01:00:5e + its low 23 bits)."""
    _, b, c, d = (int(x) for x in group.split("."))
    return f"01:00:5e:{b & 0x7F:02x}:{c:02x}:{d:02x}"


def bridged_device(ns: str) -> str:
    """A device for pktgen on the LAN host, behind a bridge in front of its LAN device.

    pktgen keeps a reference to every frame it sends, and a shared frame must never reach the
    gateway: a TC program that clones it (bpf_clone_redirect makes the original writable)
    would crash the kernel, which no real NIC can cause. A bridge port takes its own copy of
    a shared frame (skb_share_check), so the gateway receives frames as from a wire."""
    for argv in (
        ["ip", "link", "add", "pg0", "type", "veth", "peer", "name", "pg1"],
        ["ip", "link", "add", "lanbr", "type", "bridge", "mcast_snooping", "0"],
        ["ip", "link", "set", "pg1", "master", "lanbr", "up"],
        ["ip", "link", "set", "eth0", "master", "lanbr"],
        ["ip", "link", "set", "lanbr", "up"],
        ["ip", "link", "set", "pg0", "up"],
    ):
        netns.run(argv, netns=ns)
    return "pg0"


class Pktgen:
    """pktgen on `device` inside namespace `ns` (each namespace has its own pktgen threads)."""

    def __init__(self, ns: str, device: str) -> None:
        self.ns = ns
        self.device = device
        subprocess.run(["modprobe", "pktgen"], check=True, capture_output=True)
        with netns.entered(ns):
            self._write("kpktgend_0", "rem_device_all")
            self._write("kpktgend_0", f"add_device {device}")

    def _write(self, name: str, command: str) -> None:
        # pktgen reports a refused setting in its "Result:" line, not as a write error.
        path = PROC / name
        with open(path, "w") as f:
            f.write(command + "\n")
        if name != "pgctrl":
            result = self._result(path)
            if result and not result.startswith("OK") and "Idle" not in result:
                raise PktgenError(f"pktgen {name}: {command!r}: {result}")

    @staticmethod
    def _result(path: Path) -> str:
        m = re.search(r"^Result: (.*)$", path.read_text(), re.M)
        return m[1].strip() if m else ""

    def configure(self, flow: Flow, rate: float, count: int) -> None:
        """Set up one run of `count` frames at `rate` per second."""
        if flow.payload < MIN_PAYLOAD:
            raise PktgenError(f"payload {flow.payload} B: pktgen needs at least {MIN_PAYLOAD}")
        settings = [
            "clone_skb 0",  # a fresh frame each time: the receiver may change it
            f"count {count}",
            f"pkt_size {flow.frame_size}",
            f"src_min {flow.src_ip}",
            f"src_max {flow.src_ip}",
            f"dst {flow.dst_ip}",
            f"dst_mac {flow.dst_mac}",
            f"udp_src_min {flow.src_port}",
            f"udp_src_max {flow.src_port}",
            f"udp_dst_min {flow.dst_port}",
            f"udp_dst_max {flow.dst_port}",
            f"delay {int(1e9 / rate)}",
        ]
        with netns.entered(self.ns):
            for s in settings:
                self._write(self.device, s)

    def run(self, flow: Flow, rate: float, count: int) -> Sent:
        """Send `count` frames at `rate` per second; returns when the last one went."""
        self.configure(flow, rate, count)
        t0 = time.monotonic()
        with netns.entered(self.ns):
            self._write("pgctrl", "start")  # returns when the run is over
            text = (PROC / self.device).read_text()
        # pktgen's own clock from first to last frame (the write also waits for its start-up)
        m = re.search(r"^Result: OK: (\d+)\(c", text, re.M)
        seconds = int(m[1]) / 1e6 if m else time.monotonic() - t0
        return Sent(self.sent(), seconds)

    def sent(self) -> int:
        """Frames the last (or current) run handed over so far."""
        with netns.entered(self.ns):
            text = (PROC / self.device).read_text()
        m = re.search(r"pkts-sofar: (\d+)", text)
        return int(m[1]) if m else 0

    def start_background(self, flow: Flow, rate: float, seconds: float) -> subprocess.Popen[str]:
        """A steady stream for up to `seconds` that the caller stops with stop(): the start
        write blocks, so it runs in a child process inside the namespace."""
        self.configure(flow, rate, int(rate * seconds))
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "sh", "-c", "echo start > /proc/net/pktgen/pgctrl"],
            text=True,
        )

    def stop(self) -> None:
        with netns.entered(self.ns):
            self._write("pgctrl", "stop")

    def close(self) -> None:
        """Take the device off pktgen's thread (the module stays loaded)."""
        with netns.entered(self.ns):
            self._write("kpktgend_0", "rem_device_all")
