"""The SA table at scale: thousands of slots, the tail-call walk, and list updates under traffic.

    L: eth0 10.7.0.2 ── G: lan0 10.7.0.1/16   (LAN program on lan0 ingress)
                        G: xf0 ── xfpeer        (every copy for an SA is sent to xf0)

A witness program on xf0's egress (tests/kernel/bpf/witness.bpf.c) counts each copy by its
mark and takes it: an independent count per SA, next to our own per-slot counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from bcc import BPF

from forecast import bpf_build, layout, tc
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast.layout import Direction
from forecast_lab import netns, traffic
from tests.kernel.veth_gateway import stand_in_gateway

GROUP = "224.0.0.251"
PORT = 5353
MULTICAST = (IPv4Network("224.0.0.0/4"),)


WITNESS = Path(__file__).resolve().parent / "bpf" / "witness.bpf.c"


@dataclass
class ScaleGateway:
    gw: str
    lan: str
    datapath: Datapath
    witness: Any

    def seen(self) -> dict[int, int]:
        """Copies taken by the witness, by mark."""
        return {int(k.value): int(v.value) for k, v in self.witness[b"seen"].items()}

    def wait_seen(self, total: int, timeout: float = 20.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        got = self.seen()
        while sum(got.values()) < total and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.seen()
        return got


@pytest.fixture
def scale_gw(run_prefix: str, tmp_path: Path) -> Iterator[ScaleGateway]:
    gw, lan = f"{run_prefix}-sg", f"{run_prefix}-sl"
    # The witness goes with its device, when the namespace goes.
    with stand_in_gateway(tmp_path, gw, lan) as datapath:
        for ns, dev, cidr in ((gw, "lan0", "10.7.0.1/16"), (lan, "eth0", "10.7.0.2/16")):
            netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", dev], netns=ns)
            netns.run(["ip", "link", "set", dev, "up"], netns=ns)
        # No IPv6 chatter (MLD, router solicitations) through the witness.
        netns.run(["sysctl", "-qw", "net.ipv6.conf.xf0.disable_ipv6=1"], netns=gw)
        netns.run(["ip", "link", "set", "xf0", "up"], netns=gw)
        datapath.load()
        datapath.write_config(
            DatapathConfig(
                xfrm_ifindex=netns.ifindex(gw, "xf0"),
                lan_ifindex=netns.ifindex(gw, "lan0"),
                lan_mac=bytes.fromhex("02fc00000002"),
                lan_broadcast=IPv4Address("10.7.255.255"),
                groups=(IPv4Address(GROUP),),
            )
        )
        tc.attach(netns.ifindex(gw, "lan0"), datapath.fds["lan"], "fc_lan_ingress", netns=gw)
        bpf_build.use_kernel_headers()
        witness = BPF(src_file=str(WITNESS).encode(), cflags=["-Wno-everything"])
        fn = witness.load_func(b"witness", BPF.SCHED_CLS)
        tc.attach(netns.ifindex(gw, "xf0"), fn.fd, "witness", netns=gw, parent=tc.EGRESS)
        yield ScaleGateway(gw, lan, datapath, witness)


def _entry(slot: int) -> SaEntry:
    return SaEntry(0x10000 + slot, 0x10000 + slot, MULTICAST)


def test_full_table_every_sa_gets_exactly_one_copy_per_packet(scale_gw: ScaleGateway) -> None:
    dp, n, packets = scale_gw.datapath, layout.FC_MAX_SAS, 3
    for slot in range(n):
        dp.write_sa(slot, _entry(slot))
    assert dp.sync_targets()
    assert dp.targets is not None and len(dp.targets.current(layout.FC_LIST_LAN)) == n
    traffic.send(scale_gw.lan, GROUP, PORT, "full", packets, iface="eth0", interval=0.05)
    seen = scale_gw.wait_seen(packets * n)
    counts = dp.counters()
    per_slot = [counts[s].by_direction[Direction.LAN_TO_SA].packets for s in range(n)]
    drops = {r.name: v for r, v in dp.drops().items() if v}
    print(
        f"\n{n} SAs x {packets} packets: {sum(seen.values())} copies seen, drops {drops or 'none'}"
    )
    # Every slot, the last chunk's included: the walk spans all 33 tail calls.
    assert seen == {_entry(s).mark_out: packets for s in range(n)}
    assert per_slot == [packets] * n
    assert not drops


def test_list_updates_under_traffic_never_duplicate_or_skip(scale_gw: ScaleGateway) -> None:
    """4,096 SAs stay; 128 others, interleaved with them, come and go while the LAN sends.
    A removal moves the list's last entry into the gap, so the staying SAs keep changing
    places: a packet that saw half an update would give one of them two copies or none."""
    dp = scale_gw.datapath
    churn = set(range(16, 4224, 33))  # 128 slots spread over the table
    stable = [s for s in range(4224) if s not in churn]
    assert len(stable) == 4096
    for slot in range(4224):
        dp.write_sa(slot, _entry(slot))
    entries = {slot: _entry(slot) for slot in range(4224)}
    assert dp.publish_targets(entries)
    packets = 300
    sender = traffic.send(
        scale_gw.lan, GROUP, PORT, "churn", packets, iface="eth0", interval=0.004, background=True
    )
    assert sender is not None
    flips = 0
    deadline = time.monotonic() + 30
    going = sorted(churn)
    while sender.poll() is None and time.monotonic() < deadline:
        half = going[flips % 2 :: 2]  # alternate halves: removals from all over the list
        present = {s: e for s, e in entries.items() if s not in half}
        assert dp.publish_targets(present)
        assert dp.publish_targets(entries)
        flips += 2
    assert sender.wait(timeout=30) == 0
    counts = dp.counters()
    got = {s: counts[s].by_direction[Direction.LAN_TO_SA].packets for s in range(4224)}
    wrong = {s: got[s] for s in stable if got[s] != packets}
    print(f"\n{flips} list flips while {packets} packets crossed 4,096 staying SAs")
    assert flips >= 10, "the sender finished before the lists changed often enough"
    assert not wrong, f"staying SAs with other than {packets} copies: {list(wrong.items())[:10]}"
    assert all(0 <= got[s] <= packets for s in churn)
    seen = scale_gw.wait_seen(sum(got.values()))
    assert seen == {_entry(s).mark_out: n for s, n in got.items() if n}


def test_every_entry_moving_at_every_update_still_one_copy_each(scale_gw: ScaleGateway) -> None:
    """The generation flip itself: 4,096 SAs whose list order is rotated at every update, so
    every entry changes place each time. Written in place, a packet would meet some SAs twice
    and miss others; walking one whole generation, each SA gets every packet exactly once."""
    dp = scale_gw.datapath
    assert dp.targets is not None
    slots = list(range(4096))
    for slot in slots:
        dp.write_sa(slot, _entry(slot))
    dp.targets.publish_ordered({layout.FC_LIST_LAN: slots})
    packets = 300
    sender = traffic.send(
        scale_gw.lan, GROUP, PORT, "rotate", packets, iface="eth0", interval=0.004, background=True
    )
    assert sender is not None
    flips, deadline = 0, time.monotonic() + 30
    while sender.poll() is None and time.monotonic() < deadline:
        shift = 1 + (flips * 997) % 4095
        dp.targets.publish_ordered({layout.FC_LIST_LAN: slots[shift:] + slots[:shift]})
        flips += 1
    assert sender.wait(timeout=30) == 0
    counts = dp.counters(slots)
    got = {s: counts[s].by_direction[Direction.LAN_TO_SA].packets for s in slots}
    seen = scale_gw.wait_seen(packets * len(slots))
    wrong = {s: n for s, n in got.items() if n != packets}
    print(f"\n{flips} rotations of a 4,096-entry list while {packets} packets crossed it")
    assert flips >= 10, "the sender finished before the list changed often enough"
    assert not wrong, f"SAs with other than {packets} copies: {list(wrong.items())[:10]}"
    assert seen == {_entry(s).mark_out: packets for s in slots}


def test_status_of_4096_sas_fits_sorts_and_filters(scale_gw: ScaleGateway, tmp_path: Path) -> None:
    """`forecast-bpf status` against real pinned maps holding 4,096 SAs, as an operator runs
    it; the wall time (interpreter start included) is printed, not asserted."""
    dp, n = scale_gw.datapath, 4096
    for slot in range(n):
        dp.write_sa(slot, _entry(slot))
    assert dp.sync_targets()
    traffic.send(scale_gw.lan, GROUP, PORT, "st", 2, iface="eth0", interval=0.05)
    scale_gw.wait_seen(2 * n)
    state_file, cfg_path = tmp_path / "state.json", tmp_path / "forecast-bpf.yaml"
    slots = {
        str(s): {
            "ike": "rw",
            "child": "rw",
            "unique_id": 1000 + s,
            "ike_id": 1000 + s,
            "remote_id": f"client{s:04d}@lab",
            "remote_host": f"192.0.2.{s % 250 + 1}",
            "virtual_ips": [f"10.{200 + s // 250}.{s % 250}.1"],
            "remote_ts": ["224.0.0.0/4"],
            "mark_in": _entry(s).mark_in,
            "mark_out": _entry(s).mark_out,
            "spi_in": f"{0xC0000000 + s:08x}",
            "spi_out": f"{0xD0000000 + s:08x}",
            "reinject": False,
            "selectors": ["224.0.0.0/4"],
        }
        for s in range(n)
    }
    state = {"pid": os.getpid(), "maps_dir": str(dp.maps_dir), "filters": {}, "slots": slots}
    state_file.write_text(json.dumps(state))
    cfg_path.write_text(f"state_file: {state_file}\npin_dir: {dp.pin_dir}\n")

    def status(*args: str, columns: int = 100) -> tuple[subprocess.CompletedProcess[str], float]:
        env = {**os.environ, "COLUMNS": str(columns)}
        t0 = time.monotonic()
        argv = [sys.executable, "-m", "forecast", "status", "--config", str(cfg_path), *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        return out, time.monotonic() - t0

    table, seconds = status()
    lines = table.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines)
    # header, every SA, totals, drops, copies by family and daemon lines
    assert len(lines) == 1 + n + 1 + 3
    assert lines[-4].split()[:3] == ["total", "4096", "8.2K/262KB"], lines[
        -4
    ]  # 2 x 4,096 copies of 32 bytes
    assert lines[-2].startswith(
        "copies by family: IPv4 LAN>SA 8.2K SA>LAN 0 SA>SA 0 | IPv6 LAN>SA 0"
    )
    doc, json_seconds = status("--json")
    sas = json.loads(doc.stdout)["sas"]
    assert len(sas) == n and all(sa["counters"]["lan_to_sa"]["packets"] == 2 for sa in sas)
    one, _ = status("--match", "10.203.17.1", "--json")
    picked = json.loads(one.stdout)
    assert [sa["unique_id"] for sa in picked["sas"]] == [1000 + 3 * 250 + 17]
    assert picked["selection"]["of"] == n
    top, _ = status("--top", "5", "--sort", "id", columns=60)
    rows = top.stdout.splitlines()
    assert all(len(line) <= 60 for line in rows) and len(rows) == 1 + 5 + 1 + 1 + 3
    print(f"\nstatus of {n} SAs: table {seconds:.2f} s, --json {json_seconds:.2f} s (wall)")
