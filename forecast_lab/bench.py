"""Lab script: one forwarder (strongSwan's forecast plugin or forecast-bpf) under measured load.

Run by `forecast-bpf lab bench` on the gateway of a lab whose clients are not yet connected.
The forwarders (forecast_lab.bench_report.FORWARDERS): `plugin` in a reference-plugin lab,
`forecast-bpf` (copies cloned to the XFRM interface) in a forecast-bpf lab, and
`forecast-bpf-local-out` (the seed's mark-only configuration: copies queued to the daemon, sent
from its raw socket with the SA's mark) in a seed lab.
Prints one `BENCH {json}` line per measurement; forecast_lab.bench_report turns them into the
report. What it measures, in order:

1. forecast-bpf only: daemon start → ready → first copy at a client (cold: compile; warm: a
   restart that adopts the pinned build), with the daemon's own breakdown.
2. Control plane: a client's CHILD_SA up (the gateway's child-updown event) → the first copy
   into it on the client's wire (ESP) and the first copy the client decrypts, while the LAN
   streams, over --connects connects (kernel receive timestamps).
3. For each client count (clients connected incrementally) and payload size: the LAN sends
   multicast at stepped rates (pktgen, kernel-side); per step the copies each client decrypted
   (kernel UDP counters, nothing per packet in Python), loss, and CPU by kind.
4. Plain ESP: the LAN sends unicast to one client's virtual IP at stepped rates: what one ESP
   packet costs the gateway, the unit in which a copy's cost is stated.

CPU accounting: the lab's single kernel carries the LAN host, the gateway and every client, so
the benchmark gives the gateway a CPU of its own. Packets the gateway receives on its LAN device
are steered (RPS) to CPU 1, where the gateway's charon and daemon are pinned too; what leaves
the gateway towards the clients is steered back to CPU 0, where the sender (pktgen), the bridge
and the clients' decryption run. CPU 1's user, system and softirq time is the gateway's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici

from forecast.datapath import layout_digest
from forecast.desired import PATH_LOCAL_OUT, PATH_XFRM
from forecast.local_out import RingReader
from forecast_lab import conns, ipsec_state, netns
from forecast_lab.bench_report import FORWARDERS, lossless
from forecast_lab.daemon_run import PIN_DIR, LabDaemon
from forecast_lab.pktgen import Flow, Pktgen, bridged_device, multicast_mac
from forecast_lab.topology import Host, Topology

GROUP = "224.0.0.251"  # mDNS: in both forwarders' default groups
PORT = 5353  # nobody listens here: a copy is counted by the kernel as IgnoredMulti / NoPorts
MEMBERSHIP_PORT = 9  # the socket that makes a client accept the group binds elsewhere
PAST_KNEE = 0.2  # a step losing more than this ends a series
COPIES_LADDER = [250 * 2**i for i in range(11)]  # offered copies/s: 250 … 256k
USER_HZ = os.sysconf("SC_CLK_TCK")
LAB_CPU, GATEWAY_CPU = 0, 1  # pktgen's first thread is bound to CPU 0


def emit(kind: str, **fields: Any) -> None:
    print("BENCH " + json.dumps({"kind": kind, **fields}), flush=True)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- CPU ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cpu:
    user: float
    system: float
    softirq: float
    total: float  # every non-idle field

    @classmethod
    def now(cls, cpu: int) -> Cpu:
        line = next(
            ln for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith(f"cpu{cpu} ")
        )
        f = [int(x) for x in line.split()[1:]]
        user, nice, system, idle, iowait, _irq, softirq = f[:7]
        busy = sum(f) - idle - iowait
        return cls((user + nice) / USER_HZ, system / USER_HZ, softirq / USER_HZ, busy / USER_HZ)

    def __sub__(self, o: Cpu) -> Cpu:
        return Cpu(
            self.user - o.user,
            self.system - o.system,
            self.softirq - o.softirq,
            self.total - o.total,
        )

    def scaled(self, k: float) -> Cpu:
        return Cpu(self.user * k, self.system * k, self.softirq * k, self.total * k)

    def floor0(self) -> Cpu:
        return Cpu(*(max(0.0, v) for v in (self.user, self.system, self.softirq, self.total)))


def cpus_now() -> tuple[Cpu, Cpu]:
    return Cpu.now(LAB_CPU), Cpu.now(GATEWAY_CPU)


def background(windows: int = 5, seconds: float = 0.4) -> tuple[Cpu, Cpu]:
    """CPU per second with no traffic (charons, the daemon's timers): subtracted from steps.

    The median of several short windows: one window that catches a burst (the daemon's
    periodic resync, a charon timer) would be subtracted from every step of the series and could
    floor a whole step's figure to zero; the quietest window would leave the usual background in
    every figure."""
    samples: list[tuple[Cpu, Cpu]] = []
    for _ in range(windows):
        lab0, gw0 = cpus_now()
        time.sleep(seconds)
        lab1, gw1 = cpus_now()
        samples.append(((lab1 - lab0).scaled(1 / seconds), (gw1 - gw0).scaled(1 / seconds)))
    lab = sorted((s[0] for s in samples), key=lambda c: c.total)
    gw = sorted((s[1] for s in samples), key=lambda c: c.total)
    return lab[windows // 2], gw[windows // 2]


# -- one CPU for the gateway -------------------------------------------------------------------
def _rps(ns: str, device: str, cpu: int) -> None:
    # `ip netns exec` mounts the namespace's own sysfs, where its devices' queues are.
    path = f"/sys/class/net/{device}/queues/rx-0/rps_cpus"
    netns.run(["sh", "-c", f"echo {1 << cpu:x} > {path}"], netns=ns)


def _pin(ns: str, cpu: int, skip: int | None = None) -> None:
    """Every thread of every process in namespace `ns` (but `skip`) onto `cpu`."""
    for pid in netns.run(["ip", "netns", "pids", ns]).stdout.split():
        if int(pid) == skip:
            continue
        for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}") else []:
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(tid), {cpu})


def steer(topo: Topology) -> None:
    """The gateway's work onto GATEWAY_CPU, everything else onto LAB_CPU."""
    os.sched_setaffinity(0, {LAB_CPU})  # this script (threads started later inherit it)
    _rps(topo.gateway.netns, topo.gw_lan_if, GATEWAY_CPU)  # LAN frames in
    _rps(topo.switch_netns, "p-gw", LAB_CPU)  # what the gateway sends out
    _pin(topo.gateway.netns, GATEWAY_CPU, skip=os.getpid())
    for host in (topo.lan_host, *topo.clients):
        _pin(host.netns, LAB_CPU)


# -- counting at the clients -------------------------------------------------------------------
def join_group(host: Host) -> socket.socket:
    """A socket in `host` joined to GROUP on its WAN device (where decrypted copies arrive),
    bound to another port: the kernel accepts the copies and counts them, nobody reads them."""
    with netns.entered(host.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", MEMBERSHIP_PORT))
        mreq = struct.pack(
            "4s4si", socket.inet_aton(GROUP), bytes(4), socket.if_nametoindex("eth0")
        )
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return sock


def counted(hosts: list[Host], field: str) -> dict[str, int]:
    return {h.name: netns.udp_counters(h.netns)[field] for h in hosts}


# -- clients -----------------------------------------------------------------------------------
def connect(hosts: list[Host]) -> float:
    """Bring these clients' tunnels up (8 at a time); returns seconds."""

    def one(h: Host) -> None:
        for attempt in range(3):  # under emulation an exchange can time out: again
            try:
                args = {"ike": conns.CLIENT_CONN, "child": conns.CLIENT_CHILD, "timeout": 20000}
                ipsec_state.command(h.vici_socket, "initiate", args)
                return
            except Exception:
                if attempt == 2:
                    raise

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, hosts))
    return time.monotonic() - t0


def virtual_ip(h: Host) -> str:
    for child in ipsec_state.child_sas(h.vici_socket):
        if child["local-vips"]:
            return child["local-vips"].split()[0]
    raise RuntimeError(f"{h.name} has no virtual IP")


def gateway_has(topo: Topology, remote_id: str) -> bool:
    return any(c["remote-id"] == remote_id for c in ipsec_state.child_sas(topo.gateway.vici_socket))


def wait_for(what: str, pred: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


# -- one step ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, topo: Topology, forwarder: str, step_seconds: float) -> None:
        self.topo = topo
        self.forwarder = forwarder
        self.step_seconds = step_seconds
        self.gen = Pktgen(topo.lan_host.netns, bridged_device(topo.lan_host.netns))
        mac_file = f"/sys/class/net/{topo.gw_lan_if}/address"
        self.gw_mac = netns.run(["cat", mac_file], netns=topo.gateway.netns).stdout.strip()
        steer(topo)
        self.members = [join_group(h) for h in topo.clients]
        self.ring: RingReader | None = None  # the local output path's queue, once watched

    def watch_ring(self) -> None:
        """The local output path queues copies for the daemon to send: a step ends when the
        queue is empty, and the next starts only then (else the late copies of a step past the
        knee would be counted, and their CPU subtracted as background, in the next)."""
        self.ring = RingReader(PIN_DIR / f"maps-{layout_digest()}" / "local_out")

    def drained(self, seconds: float = 120) -> float:
        """Waits until no copy is queued (bounded); returns when (monotonic)."""
        deadline = time.monotonic() + seconds
        while self.ring is not None and self.ring.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        return time.monotonic()

    def flow(self, payload: int, dst: str = GROUP) -> Flow:
        mac = multicast_mac(dst) if dst == GROUP else self.gw_mac
        return Flow(self.topo.lan_host.lan_addr, dst, mac, payload, PORT)

    def step(
        self,
        flow: Flow,
        rate: float,
        receivers: list[Host],
        field: str,
        idle: tuple[Cpu, Cpu],
    ) -> dict[str, Any]:
        count = max(10, int(rate * self.step_seconds))
        self.drained()
        before = counted(receivers, field)
        lab0, gw0 = cpus_now()
        t0 = time.monotonic()
        sent = self.gen.run(flow, rate, count)
        # Sending takes as long as the forwarder still has copies queued (local output path).
        sending = max(sent.seconds, self.drained() - t0)
        time.sleep(0.3)  # copies still in queues
        window = time.monotonic() - t0
        lab1, gw1 = cpus_now()
        gw = (gw1 - gw0 - idle[1].scaled(window)).floor0()
        after = counted(receivers, field)
        got = {h: after[h] - before[h] for h in after}
        delivered = sum(got.values())
        expected = sent.packets * len(receivers)
        loss = 1 - delivered / expected if expected else 1.0
        per = 1e6 / delivered if delivered else math.nan  # µs per delivered copy
        return {
            "offered_pps": round(rate, 1),
            "offered_copies_per_s": round(rate * len(receivers), 1),
            "sent": sent.packets,
            "send_seconds": round(sent.seconds, 3),
            "achieved_pps": round(sent.rate, 1),
            "delivered_by_client": got,
            "delivered": delivered,
            "delivered_per_s": round(delivered / sending, 1) if sending else 0,
            # after the LAN's last packet until the forwarder's queue was empty
            "drain_seconds": round(sending - sent.seconds, 3),
            "loss": round(max(0.0, loss), 6),
            # busy share of each CPU: which side bounds a step
            "gateway_cpu_busy": round((gw1 - gw0).total / window, 3),
            "lab_cpu_busy": round((lab1 - lab0).total / window, 3),
            # what was subtracted as background: a zero figure below is explained here
            "gateway_background_cpu_s": round(idle[1].total * window, 3),
            "gateway_cpu_s": {
                "user": round(gw.user, 3),
                "system": round(gw.system, 3),
                "softirq": round(gw.softirq, 3),
                "total": round(gw.total, 3),
            },
            "us_per_copy": {
                "user": round(gw.user * per, 2),
                "system": round(gw.system * per, 2),
                "softirq": round(gw.softirq * per, 2),
                "total": round(gw.total * per, 2),
            },
        }

    def series(
        self,
        kind: str,
        flow: Flow,
        receivers: list[Host],
        field: str,
        rates: list[float] | None,
        refine: int,
    ) -> None:
        """Stepped rates (LAN packets/s) until past the knee, then `refine` bisections of the
        bracket around the highest lossless rate (bench_report.lossless); one BENCH line per
        step."""
        self.drained()
        idle = background()
        n = len(receivers)
        ladder = rates or [c / n for c in COPIES_LADDER]
        tag = {"forwarder": self.forwarder, "series": kind, "clients": n, "payload": flow.payload}
        results: list[tuple[float, bool]] = []
        for rate in ladder:
            r = self.step(flow, rate, receivers, field, idle)
            emit("step", **tag, **r)
            say(f"{kind} {n} clients {flow.payload} B {rate:.0f} pps: loss {r['loss']:.4f}")
            results.append((rate, lossless(r)))
            if r["loss"] > PAST_KNEE and not rates:
                break
        for _ in range(refine):
            good = [rate for rate, ok in results if ok]
            bad = [rate for rate, ok in results if not ok and rate > max(good, default=0)]
            if not good or not bad:
                break
            rate = math.sqrt(max(good) * min(bad))
            r = self.step(flow, rate, receivers, field, idle)
            emit("step", **tag, **r, refined=True)
            results.append((rate, lossless(r)))

    def close(self) -> None:
        for s in self.members:
            s.close()
        if self.ring is not None:
            self.ring.close()
        self.gen.close()


# -- control plane -----------------------------------------------------------------------------
class UpEvents:
    """child-updown "up" events from the gateway's charon, timed (CLOCK_REALTIME) on arrival:
    remote id → time. charon raises the event once it installed both SAs and the policies: the
    moment forecast-bpf's daemon hears of the SA over VICI (the plugin hears it in-process)."""

    def __init__(self, vici_socket: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(vici_socket)
        self.times: dict[str, float] = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for _label, event in vici.Session(self.sock).listen(["child-updown"]):
                now = time.time()
                if event.get("up") not in (b"yes", "yes"):
                    continue
                for ike in event.values():
                    if isinstance(ike, dict) and "remote-id" in ike:
                        with self.cond:
                            self.times[ike["remote-id"].decode()] = now
                            self.cond.notify_all()
        except OSError:
            pass  # closed

    def wait(self, remote_id: str, timeout: float = 5.0) -> float:
        """When `remote_id`'s CHILD_SA came up (nan if it did not within timeout)."""
        with self.cond:
            self.cond.wait_for(lambda: remote_id in self.times, timeout=timeout)
            return self.times.pop(remote_id, math.nan)

    def close(self) -> None:
        self.sock.close()


# Kernel receive timestamps (CLOCK_REALTIME, as struct timespec): when a packet arrived, not when
# a Python thread got round to it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
IPPROTO_ESP = 50


def _stamp(ancdata: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", data[:16])
            return float(sec + nsec / 1e9)
    return time.time()


def first_copy(
    host: Host, port: int, timeout: float, ready: threading.Event, group: str = GROUP
) -> float:
    """When the first datagram to group:port reached `host`'s socket (kernel time; nan on
    timeout): the copy decrypted and delivered."""
    with netns.entered(host.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        mreq = struct.pack(
            "4s4si", socket.inet_aton(group), bytes(4), socket.if_nametoindex("eth0")
        )
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.settimeout(timeout)
    ready.set()
    try:
        _data, anc, _flags, _addr = sock.recvmsg(2048, socket.CMSG_SPACE(16))
        return _stamp(anc)
    except TimeoutError:
        return math.nan
    finally:
        sock.close()


def first_esp(host: Host, timeout: float, ready: threading.Event) -> float:
    """When the first ESP packet reached `host`'s WAN device (kernel time; nan on timeout).
    The host has no other SA while it reconnects, so that is the forwarder's first copy into the
    new SA, whether or not the host has installed its end yet."""
    with netns.entered(host.netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        sock.bind(("eth0", ETH_P_IP))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    deadline = time.monotonic() + timeout
    ready.set()
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data, anc, _flags, addr = sock.recvmsg(64, socket.CMSG_SPACE(16))
            if addr[2] != PACKET_OUTGOING and len(data) > 9 and data[9] == IPPROTO_ESP:
                return _stamp(anc)
        return math.nan
    except TimeoutError:
        return math.nan
    finally:
        sock.close()


def _connect_and_first_copy(host: Host) -> tuple[float, float, float]:
    """Connect `host` with receivers waiting there: (first ESP packet on its wire, first copy
    decrypted, initiate), all CLOCK_REALTIME. Both receivers end by their own timeouts."""
    ready_copy, ready_esp = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        copy = pool.submit(first_copy, host, PORT, 15.0, ready_copy)
        esp = pool.submit(first_esp, host, 15.0, ready_esp)
        ready_copy.wait(5)
        ready_esp.wait(5)
        t_init = time.time()
        connect([host])
        return esp.result(), copy.result(), t_init


def control_plane(
    bench: Bench,
    topo: Topology,
    hosts: list[Host],
    connects: int,
    forgotten: Callable[[Host], bool],
) -> None:
    """Disconnect and reconnect `hosts` in turn `connects` times while the LAN streams.
    forgotten(host): the forwarder is done with host's old SA (each connect starts idle)."""
    rate = 1000.0
    events = UpEvents(topo.gateway.vici_socket)
    stream = bench.gen.start_background(bench.flow(64), rate, seconds=connects * 20 + 60)
    samples: list[dict[str, Any]] = []
    try:
        for i in range(connects):
            host = hosts[i % len(hosts)]
            rid = conns.client_id(host.name)
            ipsec_state.command(host.vici_socket, "terminate", {"ike": conns.CLIENT_CONN})
            wait_for(
                f"{host.name} gone from the gateway",
                lambda rid=rid: not gateway_has(topo, rid),  # type: ignore[misc]
            )
            wait_for(f"the forwarder to drop {host.name}", lambda h=host: forgotten(h))  # type: ignore[misc]
            time.sleep(0.5)
            t_esp, t_copy, t_init = _connect_and_first_copy(host)
            t_gw = events.wait(rid)
            samples.append(
                {
                    "client": host.name,
                    # what the forwarder controls: the gateway's event → its first copy sent
                    "up_to_first_esp_ms": round((t_esp - t_gw) * 1000, 2),
                    # what the client sees: it installs its end after the gateway (it learns of
                    # the SA from the gateway's last IKE message); copies before that die there
                    "up_to_first_copy_ms": round((t_copy - t_gw) * 1000, 2),
                    "initiate_to_first_copy_ms": round((t_copy - t_init) * 1000, 2),
                }
            )
    finally:
        bench.gen.stop()
        stream.wait(30)
        events.close()
    emit("latency", forwarder=bench.forwarder, stream_pps=rate, samples=samples)
    say(f"control plane: {len(samples)} connects measured")


# -- daemon start (forecast-bpf) ----------------------------------------------------------------
def daemon_start(bench: Bench, daemon: LabDaemon, hosts: list[Host], how: str) -> None:
    """Start the daemon while the LAN streams: start → ready → first copy at hosts[0]."""
    rate = 1000.0
    stream = bench.gen.start_background(bench.flow(64), rate, seconds=300)
    ready_evt = threading.Event()
    got: list[float] = []
    rx = threading.Thread(
        target=lambda: got.append(first_copy(hosts[0], PORT, 240.0, ready_evt)), daemon=True
    )
    rx.start()
    ready_evt.wait(5)
    try:
        t0 = time.time()  # first_copy() gives CLOCK_REALTIME
        seconds_all = daemon.start(expect=len(hosts))
        steer(bench.topo)  # the new daemon onto the gateway's CPU
        rx.join(240)
    finally:
        bench.gen.stop()
        stream.wait(30)
    ready = [ln for ln in daemon.log.read_text().splitlines() if "ready:" in ln]
    compiled = [ln for ln in daemon.log.read_text().splitlines() if "programs build" in ln]
    emit(
        "daemon_start",
        forwarder=bench.forwarder,
        how=how,
        sas=len(hosts),
        start_to_all_slots_s=round(seconds_all, 2),
        start_to_first_copy_s=round(got[0] - t0, 2) if got else None,
        ready_line=ready[-1] if ready else "",
        build_line=compiled[-1] if compiled else "",
    )
    say(f"daemon start ({how}): all slots after {seconds_all:.1f} s")


# -- main ---------------------------------------------------------------------------------------
# The path the daemon must have chosen for every SA: the lab's gateway mode decides it, and a
# benchmark of the wrong path would be reported under the other's name.
PATHS = {"forecast-bpf": PATH_XFRM, "forecast-bpf-local-out": PATH_LOCAL_OUT}


def _expect_path(daemon: LabDaemon, path: str) -> None:
    paths = {name: slot.get("path") for name, slot in daemon.by_client().items()}
    if not paths or set(paths.values()) != {path}:
        raise RuntimeError(f"every SA should be on the {path} path, the daemon has {paths}")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--forwarder", choices=FORWARDERS, required=True)
    ap.add_argument("--clients", type=ints, default=[2, 8, 32], help="e.g. 2,8,32")
    ap.add_argument("--payloads", type=ints, default=[64, 1000], help="UDP payload bytes")
    ap.add_argument("--rates", type=ints, default=None, help="fixed LAN packets/s steps")
    ap.add_argument("--refine", type=int, default=2, help="bisections around the knee")
    ap.add_argument("--step-seconds", type=float, default=2.0)
    ap.add_argument("--connects", type=int, default=30)
    args = ap.parse_args(argv)

    topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
    if max(args.clients) > len(topo.clients):
        ap.error(f"--clients up to {max(args.clients)}: the lab has {len(topo.clients)}")
    emit(
        "meta",
        forwarder=args.forwarder,
        kernel=os.uname().release,
        cpus=os.cpu_count(),
        step_seconds=args.step_seconds,
    )
    bench = Bench(topo, args.forwarder, args.step_seconds)
    daemon = None
    try:
        first = topo.clients[: min(args.clients)]
        connect(first)
        if args.forwarder != "plugin":
            # The benchmark measures capacity: the storm guard (a limit by design) stays off.
            daemon = LabDaemon(topo, reinject=[], groups=[GROUP], extra=["storm_guard: off"])
            daemon_start(bench, daemon, first, "cold: compile and pin")
            daemon.handover()
            daemon_start(bench, daemon, first, "restart: adopt the pinned build")
            _expect_path(daemon, PATHS[args.forwarder])
            if PATHS[args.forwarder] == PATH_LOCAL_OUT:
                bench.watch_ring()
        else:
            time.sleep(1.0)  # the plugin learns the SAs inside charon
        if daemon is not None:
            d = daemon

            def forgotten(h: Host) -> bool:
                return h.name not in d.by_client()

        else:

            def forgotten(h: Host) -> bool:
                time.sleep(1.0)  # the plugin's clean-up runs inside charon, unseen
                return True

        control_plane(bench, topo, first, args.connects, forgotten)

        vip = virtual_ip(first[0])
        for payload in args.payloads:
            bench.series(
                "esp",
                bench.flow(payload, dst=vip),
                [first[0]],
                "NoPorts",
                args.rates,
                args.refine,
            )
        up = len(first)
        for n in sorted(args.clients):
            if n > up:
                say(f"connect {n - up} more clients: {connect(topo.clients[up:n]):.1f} s")
                up = n
                if daemon is not None:
                    daemon.wait_state(f"{n} SAs", lambda s, n=n: len(s["slots"]) == n)  # type: ignore[misc]
                    _expect_path(daemon, PATHS[args.forwarder])
                else:
                    time.sleep(1.0)
            for payload in args.payloads:
                bench.series(
                    "multicast",
                    bench.flow(payload),
                    topo.clients[:n],
                    "IgnoredMulti",
                    args.rates,
                    args.refine,
                )
    finally:
        bench.close()
        left = daemon.stop() if daemon is not None else None
    if left is not None and not LabDaemon.clean(left):
        say(f"the daemon left something behind: {left}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
