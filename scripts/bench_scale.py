"""The data path's cost per copy by table size, on this machine's kernel (root, namespaces).

For each size N: N SAs in the maps and the LAN list, the LAN host sends PACKETS multicast
packets, and the kernel's own run-time accounting (BPF_ENABLE_STATS, held only while measuring)
gives the LAN program's time per packet, walker tail calls and clones included. Each copy is
taken at the stand-in XFRM interface's egress by a counting program (no ESP on this kernel: the
encryption a real copy costs is not in these numbers). Also the time to fill the table and
publish its list, and one list update (an SA leaving and coming back) at that size.

    python3 scripts/bench_scale.py [--sizes 8,64,1000,4096,8448] [--packets 200]
                                   [--control-plane HOSTSxIDENTITIES, e.g. 10x100]

--control-plane also runs the daemon against that many real SAs (real charons with user-space
ESP on this kernel, a veth standing in for the XFRM interface, as the kernel-tier tests do):
time from process start to READY with every SA applied, the latency of single SA events
(terminate or initiate at a client until the daemon's state file shows the change; p50/p99), a
reconnect storm (every identity down, then up), and the daemon's memory.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecast import bpf_build, layout, tc
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast.pinned import _libbpf, prog_info
from forecast_lab import netns, traffic

WITNESS = Path(__file__).resolve().parents[1] / "tests" / "kernel" / "bpf" / "witness.bpf.c"
GROUP, PORT = "224.0.0.251", 5353
BPF_STATS_RUN_TIME = 0


def enable_stats() -> int:
    lib = _libbpf()
    lib.bpf_enable_stats.argtypes = [ctypes.c_int]
    fd = int(lib.bpf_enable_stats(BPF_STATS_RUN_TIME))
    if fd < 0:
        raise RuntimeError("BPF_ENABLE_STATS failed (kernel 5.8+ and root needed)")
    return fd


def control_plane(hosts: int, identities: int, events: int) -> None:
    import json
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from forecast_lab import conns, ipsec_state
    from forecast_lab.conns import GatewayMode
    from forecast_lab.lab import Lab, LabOptions

    n = hosts * identities
    work = Path(tempfile.mkdtemp(prefix="fc-bench-cp-"))
    bpffs = work / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    opts = LabOptions(
        clients=hosts,
        identities=identities,
        libipsec=True,
        mode=GatewayMode.FORECAST_BPF,
        prefix=netns.unique_prefix("fcbc"),
    )
    lab = Lab(opts, log=open(os.devnull, "w"))  # noqa: SIM115 (closed with the process)
    proc = None
    try:
        t0 = time.monotonic()
        lab.up()
        print(f"\ncontrol plane: {n} real SAs up in {time.monotonic() - t0:.1f} s (libipsec)")
        gw = lab.topology.gateway.netns
        netns.add_veth("xfs0", gw, "xfs0p", gw)
        for dev in ("xfs0", "xfs0p"):
            netns.run(["ip", "link", "set", dev, "up"], netns=gw)
        state = work / "state.json"
        cfg = work / "forecast-bpf.yaml"
        cfg.write_text(
            f"interface: eth1\nxfrm: {{name: xfs0, if_id: {opts.if_id}}}\n"
            f"vici_socket: {lab.topology.gateway.vici_socket}\npin_dir: {bpffs / 'fc'}\n"
            f"state_file: {state}\nmetrics_per_sa: false\n"
        )
        log = work / "daemon.log"
        helper = Path(__file__).resolve().parents[1] / "tests" / "kernel" / "standin_daemon.py"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", gw, sys.executable, str(helper), str(cfg), "xfs0"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

        def slots() -> dict[str, object]:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return {}
            return {v["remote_id"]: v["unique_id"] for v in doc["slots"].values()}

        def wait(pred: object, limit: float = 300.0) -> float:
            t = time.monotonic()
            while not pred() and time.monotonic() - t < limit:  # type: ignore[operator]
                time.sleep(0.005)
            return time.monotonic() - t

        wait(lambda: len(slots()) == n)
        ready = [ln for ln in log.read_text().splitlines() if "ready:" in ln]
        print(f"  start: {ready[-1].split('ready: ', 1)[-1] if ready else 'no READY line'}")
        lat_down, lat_up = [], []
        host = lab.topology.clients[0]
        for k in conns.identity_numbers(identities)[:events]:
            rid = conns.client_id(host.name, k)
            ike = conns.client_conn_name(k)
            ipsec_state.command(host.vici_socket, "terminate", {"ike": ike, "timeout": 5000})
            lat_down.append(wait(lambda rid=rid: rid not in slots(), 30))
            ipsec_state.command(
                host.vici_socket, "initiate", {"ike": ike, "child": "gw", "timeout": 15000}
            )
            lat_up.append(wait(lambda rid=rid: rid in slots(), 30))

        def q(xs: list[float]) -> str:
            xs = sorted(xs)
            p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
            return f"p50 {statistics.median(xs) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"

        print(f"  {len(lat_down)} SA events at {n} SAs, VICI event to state applied:")
        print(f"    down: {q(lat_down)}; up: {q(lat_up)}")
        pairs = [(c, k) for c in lab.topology.clients for k in conns.identity_numbers(identities)]

        failures = 0

        def every(action: str) -> float:
            def one(pair: tuple[object, int]) -> None:
                nonlocal failures
                c, k = pair
                args: dict[str, object] = {"ike": conns.client_conn_name(k), "timeout": 15000}
                if action == "initiate":
                    args["child"] = "gw"
                for _attempt in range(3):  # an exchange can time out in a storm: again
                    try:
                        ipsec_state.command(c.vici_socket, action, args)  # type: ignore[attr-defined]
                        return
                    except Exception:
                        failures += 1

            t = time.monotonic()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(one, pairs))
            return time.monotonic() - t

        down = every("terminate")
        empty = wait(lambda: not slots())
        up = every("initiate")
        full = wait(lambda: len(slots()) == n)
        print(
            f"  storm: {n} terminated in {down:.1f} s, daemon empty {empty:.2f} s later; "
            f"{n} initiated in {up:.1f} s, daemon full {full:.2f} s later "
            f"({failures} VICI commands repeated)"
        )
        rss = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        print(f"  daemon RSS: {int(rss[0]) / 1024:.0f} MB" if rss else "  daemon RSS: ?")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        lab.down()
        subprocess.run(["umount", str(bpffs)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=f"8,64,1000,4096,{layout.FC_MAX_SAS}")
    parser.add_argument("--packets", type=int, default=200)
    parser.add_argument("--control-plane", metavar="HxM", help="e.g. 10x100: 1,000 real SAs")
    parser.add_argument("--events", type=int, default=30, help="single SA events to time")
    args = parser.parse_args()
    # A timeout's SIGTERM must still run the clean-ups below (namespaces, mounts, charons).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(x) for x in args.sizes.split(",")]
    prefix = netns.unique_prefix("fcb")
    gw, lan = f"{prefix}-g", f"{prefix}-l"
    work = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    pins = work / "bpffs"
    pins.mkdir()
    netns.create(gw)
    netns.create(lan)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True)
    dp = Datapath(pins / "forecast")
    try:
        netns.add_veth("lan0", gw, "eth0", lan)
        netns.add_veth("xf0", gw, "xfpeer", gw)
        for ns, dev, cidr in ((gw, "lan0", "10.7.0.1/16"), (lan, "eth0", "10.7.0.2/16")):
            netns.run(["ip", "addr", "add", cidr, "dev", dev], netns=ns)
            netns.run(["ip", "link", "set", dev, "up"], netns=ns)
        netns.run(["sysctl", "-qw", "net.ipv6.conf.xf0.disable_ipv6=1"], netns=gw)
        netns.run(["ip", "link", "set", "xf0", "up"], netns=gw)
        t0 = time.monotonic()
        dp.load()
        load_s = time.monotonic() - t0
        dp.write_config(
            DatapathConfig(
                xfrm_ifindex=netns.ifindex(gw, "xf0"),
                lan_ifindex=netns.ifindex(gw, "lan0"),
                lan_mac=bytes.fromhex("02fc00000003"),
                lan_broadcast=None,
                groups=(IPv4Address(GROUP),),
            )
        )
        tc.attach(netns.ifindex(gw, "lan0"), dp.fds["lan"], "fc_lan_ingress", netns=gw)
        from bcc import BPF  # only for the counting program: the product never imports bcc

        bpf_build.use_kernel_headers()
        witness = BPF(src_file=str(WITNESS).encode(), cflags=["-Wno-everything"])
        fn = witness.load_func(b"witness", BPF.SCHED_CLS)
        tc.attach(netns.ifindex(gw, "xf0"), fn.fd, "witness", netns=gw, parent=tc.EGRESS)
        seen = witness[b"seen"]
        print(f"compile + load of both programs and walkers (child process): {load_s:.2f} s")
        print(f"verifier instructions: {dp.verified}")
        print(
            f"{'SAs':>6} {'fill':>8} {'publish':>8} {'update':>8} {'ns/packet':>11} "
            f"{'ns/copy':>8} {'copies':>9}"
        )
        mc = (IPv4Network("224.0.0.0/4"),)
        written: set[int] = set()
        for n in sizes:
            t0 = time.monotonic()
            for slot in range(n):
                if slot not in written:
                    dp.write_sa(slot, SaEntry(0x10000 + slot, 0x10000 + slot, mc))
                    written.add(slot)
            for slot in sorted(written - set(range(n))):
                dp.write_sa(slot, None)
                written.discard(slot)
            fill_s = time.monotonic() - t0
            entries = {slot: SaEntry(0x10000 + slot, 0x10000 + slot, mc) for slot in range(n)}
            t0 = time.monotonic()
            dp.publish_targets(entries)
            publish_s = time.monotonic() - t0
            middle = n // 2
            t0 = time.monotonic()
            dp.publish_targets({s: e for s, e in entries.items() if s != middle})
            dp.publish_targets(entries)
            update_s = (time.monotonic() - t0) / 2
            seen.clear()
            stats = enable_stats()
            try:
                before = prog_info(dp.fds["lan"])
                traffic.send(lan, GROUP, PORT, "bench", args.packets, iface="eth0", interval=0.002)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    copies = sum(int(v.value) for v in seen.values())
                    if copies >= n * args.packets:
                        break
                    time.sleep(0.05)
                after = prog_info(dp.fds["lan"])
            finally:
                os.close(stats)
            runs = after.run_cnt - before.run_cnt
            ns = after.run_time_ns - before.run_time_ns
            copies = sum(int(v.value) for v in seen.values())
            print(
                f"{n:>6} {fill_s * 1000:>6.0f}ms {publish_s * 1000:>6.1f}ms "
                f"{update_s * 1000:>6.1f}ms {ns / max(runs, 1):>11.0f} "
                f"{ns / max(copies, 1):>8.0f} {copies:>9}"
            )
    finally:
        dp.remove()
        netns.delete(gw)
        netns.delete(lan)
        subprocess.run(["umount", str(pins)], check=False)
    if args.control_plane:
        hosts, identities = (int(x) for x in args.control_plane.lower().split("x"))
        control_plane(hosts, identities, args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
