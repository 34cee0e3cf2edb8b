"""Faults under load, for lab scripts: the LAN sends to every client at a fixed rate while
something goes wrong (rekeys, a reauthentication, a dead daemon, a half-removed SA, a crashed
charon); each client counts every copy by sequence number. A capture on the gateway's WAN side
watches the whole time for anything it sends that is not IKE or ESP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forecast_lab import conns, ipsec_state, netns, traffic
from forecast_lab.charon import CharonInstance
from forecast_lab.pktgen import Flow, Pktgen, bridged_device, multicast_mac
from forecast_lab.topology import Host, Topology

GROUP, PORT = "239.255.255.250", 5360
FIRST_SOURCE_PORT = 41000  # phase i's frames come from port 41000 + i
# What a gateway may send towards clients: IKE (500, 4500 with the non-ESP marker), ESP, and
# ESP in UDP. Everything else leaving the WAN device is suspect, and listed.
CLEAR_FILTER = "ip and not esp and not (udp port 500 or udp port 4500)"


def backlog_drops() -> int:
    """Frames the kernel dropped because a CPU's input backlog was full, all CPUs."""
    lines = Path("/proc/net/softnet_stat").read_text().splitlines()
    return sum(int(line.split()[1], 16) for line in lines)


class WanCapture:
    """tcpdump on the gateway's WAN device, outgoing only: what was sent in clear, and (for
    proof the capture saw the traffic at all) how many encrypted packets went out."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.pcap = workdir / "wan-clear.pcap"
        base = ["ip", "netns", "exec", topo.gateway.netns, "tcpdump", "-n", "-p", "-Q", "out"]
        base += ["-i", topo.gw_wan_if, "-B", "8192"]
        self.clear = subprocess.Popen(
            [*base, "-w", str(self.pcap), CLEAR_FILTER],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.encrypted = subprocess.Popen(
            [*base, "-w", "/dev/null", "esp or udp port 4500"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # tcpdump attaches its filter before the first scenario step

    @staticmethod
    def _stop(proc: subprocess.Popen[str]) -> tuple[int, int]:
        """(captured, dropped by the kernel) as tcpdump reports them at exit."""
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        captured = re.search(r"(\d+) packets? captured", err)
        dropped = re.search(r"(\d+) packets? dropped by kernel", err)
        if not captured:
            raise RuntimeError(f"tcpdump did not report: {err.strip()}")
        return int(captured[1]), int(dropped[1]) if dropped else 0

    def stop(self) -> dict[str, Any]:
        clear, clear_dropped = self._stop(self.clear)
        encrypted, enc_dropped = self._stop(self.encrypted)
        lines = subprocess.run(
            ["tcpdump", "-n", "-r", str(self.pcap)], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        return {
            "clear": clear,
            "clear_examples": lines[:5],
            "encrypted": encrypted,
            "dropped_by_kernel": clear_dropped + enc_dropped,
        }


@dataclass
class Load:
    """Receivers on every client for the whole scenario; the LAN host's pktgen sends one run
    per phase at exactly `rate`, each run tagged by its own UDP source port."""

    topo: Topology
    rate: int = 1000
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    receivers: dict[str, traffic.Receiver] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lan = self.topo.lan_host
        self.gen = Pktgen(lan.netns, bridged_device(lan.netns))
        self.receivers = {
            c.name: traffic.Receiver(c.netns, PORT, [GROUP], seconds=1800, wait=False, pktgen=True)
            for c in self.topo.clients
        }
        for r in self.receivers.values():
            r.wait_ready()

    def phase(
        self, tag: str, seconds: float, action: Callable[[], dict[str, Any]], lead: float = 1.0
    ) -> dict[str, Any]:
        """The LAN sends to GROUP at `rate` for `seconds`; `action` runs `lead` s in and must
        end before the sender does (whether it did is reported)."""
        port = FIRST_SOURCE_PORT + len(self.phases)
        flow = Flow(self.topo.lan_host.lan_addr, GROUP, multicast_mac(GROUP), 64, PORT, port)
        before = {c.name: netns.udp_counters(c.netns) for c in self.topo.clients}
        backlog_before = backlog_drops()
        sender = self.gen.start_background(flow, self.rate, seconds)
        t0 = time.monotonic()
        time.sleep(lead)
        detail = action()
        detail["action_s"] = round(time.monotonic() - t0 - lead, 2)
        if sender.wait(timeout=seconds * 4 + 60) != 0:
            raise RuntimeError(f"pktgen run {tag} failed")
        detail["sender_s"] = round(time.monotonic() - t0, 2)
        detail["within_sender"] = detail["action_s"] + lead < detail["sender_s"]
        time.sleep(0.5)  # the last copies in flight
        # Copies a client's kernel received but could not queue for the counting socket: lost
        # by the lab's own receiver, not by the forwarder.
        detail["receiver_overflow"] = {
            c.name: netns.udp_counters(c.netns)["RcvbufErrors"] - before[c.name]["RcvbufErrors"]
            for c in self.topo.clients
        }
        # The lab's one kernel drops frames when its per-CPU input queues overflow (a CPU busy
        # elsewhere, such as with a daemon starting under emulation): on any device, any host.
        detail["backlog_drops"] = backlog_drops() - backlog_before
        self.phases[tag] = {"count": self.gen.sent(), "port": port, "rate": self.rate, **detail}
        return detail

    def losses(self) -> dict[str, dict[str, dict[str, int]]]:
        """phase → client → sent, received, lost, duplicates (stops the receivers)."""
        got = {name: r.stop() for name, r in self.receivers.items()}
        self.receivers = {}
        out: dict[str, dict[str, dict[str, int]]] = {}
        for tag, info in self.phases.items():
            out[tag] = {}
            for name, received in got.items():
                seen = received.for_tag(f"p{info['port']}")
                out[tag][name] = {
                    "sent": info["count"],
                    "received": sum(seen.values()),
                    "lost": info["count"] - len(seen),
                    "duplicates": sum(seen.values()) - len(seen),
                }
        return out

    def close(self) -> None:
        for r in self.receivers.values():
            r.stop()
        self.receivers = {}
        self.gen.close()


def rekeys(
    clients: list[Host], child: int, ike: int, reauth: int, pause: float = 0.3
) -> dict[str, Any]:
    """Client-initiated CHILD_SA rekeys, then IKE_SA rekeys, then reauthentications, round
    robin over the clients, one at a time; returns how many of each completed."""
    done = {"child_rekeys": 0, "ike_rekeys": 0, "reauths": 0}
    plan = (
        [("child_rekeys", {"child": conns.CLIENT_CHILD})] * child
        + [("ike_rekeys", {"ike": conns.CLIENT_CONN})] * ike
        + [("reauths", {"ike": conns.CLIENT_CONN, "reauth": "yes"})] * reauth
    )
    for i, (kind, args) in enumerate(plan):
        ipsec_state.command(clients[i % len(clients)].vici_socket, "rekey", args)
        done[kind] += 1
        time.sleep(pause)
    return done


def _alive(pid: int) -> bool:
    """Running, not a zombie its parent (the lab, not this script) has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class GatewayCharon:
    """The gateway's charon as the lab started it, to crash and start again from a script."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.workdir = Path(topo.gateway.vici_socket).parent
        self.mode = conns.GatewayMode(topo.extra["gateway_mode"])
        self.instance: CharonInstance | None = None

    def pid(self) -> int:
        return int((self.workdir / "run" / "charon.pid").read_text().strip())

    def kill(self) -> int:
        """SIGKILL, as a crash: charon removes nothing, the kernel keeps its SAs and
        policies."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Its parent (the lab) reaps it only at the end, and charon takes a pid file whose
        # process still exists, even as a zombie, for a charon already running.
        (self.workdir / "run" / "charon.pid").unlink(missing_ok=True)
        return pid

    def start(self) -> None:
        """A new charon with the lab's configuration, its connections loaded (the lab's
        clients then connect to it as to a rebooted gateway)."""
        Path(self.topo.gateway.vici_socket).unlink(missing_ok=True)
        self.instance = CharonInstance(
            "gw",
            self.topo.gateway.netns,
            self.workdir,
            conns.charon_plugins(
                gateway=True, mode=self.mode, libipsec=self.topo.extra.get("esp") == "libipsec"
            ),
        )
        self.instance.start()
        self.instance.load(
            conns=conns.gateway_conn(
                wan_addr=self.topo.gateway.wan_addr,
                lan_net=self.topo.lan_net,
                lan_broadcast=self.topo.lan_broadcast,
                mode=self.mode,
                if_id=int(self.topo.extra["if_id"]),
            ),
            secrets=[conns.shared_secret()],
            pools=conns.pool(self.topo.vip_pool),
        )

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()


def reconnect(client: Host) -> None:
    """The client forgets its IKE_SA with a gateway that no longer knows it, and connects
    again (as after the gateway's reboot, once its DPD notices)."""
    ipsec_state.command(client.vici_socket, "terminate", {"ike": conns.CLIENT_CONN, "force": "yes"})
    args = {"ike": conns.CLIENT_CONN, "child": conns.CLIENT_CHILD, "timeout": 20000}
    ipsec_state.command(client.vici_socket, "initiate", args)
