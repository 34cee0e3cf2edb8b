"""The real TC programs on this kernel: copies, counters and drops (tests/kernel/veth_gateway.py
draws the set-up)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

from forecast import layout, tc
from forecast.datapath import SaEntry
from forecast.layout import Direction, DropReason, Family, LocalResult
from forecast.local_out import LocalOutSender, RingReader
from forecast.pinned import PinnedCounters
from forecast_lab import netns, traffic
from tests.kernel.veth_gateway import (
    BCAST,
    GROUP,
    GROUP6,
    OTHER_GROUP,
    OTHER_GROUP6,
    PAD,
    PORT,
    Gateway,
    add_sas,
    fcrules,
    total_copies,
)


def test_programs_attach_with_our_priority(gateway: Gateway) -> None:
    assert tc.bpf_filters(gateway.ifindex["lan0"], netns=gateway.gw) == [
        (tc.DEFAULT_PRIO, "fc_lan_ingress")
    ]
    assert tc.bpf_filters(gateway.ifindex["xf0"], netns=gateway.gw) == [
        (tc.DEFAULT_PRIO, "fc_tunnel_ingress")
    ]


def test_lan_multicast_and_broadcast_one_copy_per_target_sa(gateway: Gateway) -> None:
    add_sas(gateway)
    local = traffic.Receiver(gateway.gw, PORT, [GROUP], iface="lan0")
    traffic.send(gateway.lan, GROUP, PORT, "mc", 10, iface="eth0", pad=PAD)
    traffic.send(gateway.lan, BCAST, PORT, "bc", 7, pad=PAD)
    traffic.send(gateway.lan, OTHER_GROUP, PORT, "other", 5, iface="eth0", pad=PAD)
    traffic.send(gateway.lan, "10.9.0.1", PORT, "unicast", 5, pad=PAD)
    traffic.send(gateway.lan, BCAST, 67, "dhcp", 3, pad=PAD)
    time.sleep(0.5)
    got_local = local.stop()

    # Multicast: all three SAs; broadcast: the two that negotiated it; nothing else.
    assert fcrules(gateway) == {0x11: 10 + 7, 0x12: 10, 0x13: 10 + 7, 0: 0}
    assert total_copies(gateway) == 10 + 7 + 10 + 10 + 7
    # The original went on untouched to the gateway's own stack.
    assert got_local.exactly_once("mc", 10) and got_local.exactly_once("bc", 7)

    ip_len = 20 + 8 + len("mc 0") + PAD
    counters = gateway.datapath.counters([0, 1, 5])
    assert counters[0].by_direction[Direction.LAN_TO_SA].packets == 17
    assert counters[1].by_direction[Direction.LAN_TO_SA].packets == 10
    assert counters[1].by_direction[Direction.LAN_TO_SA].bytes == 10 * ip_len
    assert counters[5].by_direction[Direction.SA_TO_LAN].packets == 0
    assert all(v == 0 for v in gateway.datapath.drops().values())


def test_client_multicast_to_lan_and_reinjecting_sas_never_the_origin(gateway: Gateway) -> None:
    add_sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    # "Decrypted from the SA with mark 0x11": sent from xfpeer into xf0 with that mark.
    traffic.send(gateway.gw, GROUP, PORT, "c1", 12, iface="xfpeer", mark=0x11, pad=PAD)
    time.sleep(0.5)
    got = lan_rx.stop()
    assert got.exactly_once("c1", 12)  # the LAN copy, with a multicast MAC the LAN accepts
    # Only slot 1 reinjects and is not the origin; slot 5 takes no reinjected traffic.
    assert fcrules(gateway) == {0x11: 0, 0x12: 12, 0x13: 0, 0: 0}
    counters = gateway.datapath.counters([0, 1, 5])
    assert counters[0].by_direction[Direction.SA_TO_LAN].packets == 12
    assert counters[1].by_direction[Direction.SA_TO_SA].packets == 12
    assert counters[5].by_direction[Direction.SA_TO_SA].packets == 0


def test_unknown_origin_is_counted_and_not_forwarded(gateway: Gateway) -> None:
    add_sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    traffic.send(gateway.gw, GROUP, PORT, "who", 4, iface="xfpeer", mark=0x99, pad=PAD)
    time.sleep(0.5)
    assert lan_rx.stop().total("who") == 0
    assert fcrules(gateway) == {0x11: 0, 0x12: 0, 0x13: 0, 0: 0}
    assert gateway.datapath.drops()[DropReason.UNKNOWN_ORIGIN] == 4


def test_cleared_slot_gets_nothing_and_a_reused_slot_starts_from_zero(gateway: Gateway) -> None:
    add_sas(gateway)
    traffic.send(gateway.lan, GROUP, PORT, "a", 3, iface="eth0", pad=PAD)
    gateway.datapath.write_sa(1, None)
    assert gateway.datapath.sync_targets()
    traffic.send(gateway.lan, GROUP, PORT, "b", 4, iface="eth0", pad=PAD)
    time.sleep(0.3)
    assert fcrules(gateway)[0x12] == 3
    gateway.datapath.write_sa(1, SaEntry(0x21, 0x21, (IPv4Network("224.0.0.0/4"),)))
    assert gateway.datapath.sync_targets()
    assert gateway.datapath.counters([1])[1].by_direction[Direction.LAN_TO_SA].packets == 0


def test_a_slot_without_copies_still_forwards_what_it_decrypts(gateway: Gateway) -> None:
    """An SA superseded by a newer one to the same peer (desired.py): on no target list, still
    the origin of what the client sends on it."""
    add_sas(gateway)
    mc = IPv4Network("224.0.0.0/4")
    entries = {
        0: SaEntry(0x11, 0x11, (mc,), reinject=True, copies=False),
        1: SaEntry(0x12, 0x12, (mc,), reinject=True),
    }
    for slot, entry in entries.items():
        gateway.datapath.write_sa(slot, entry)
    gateway.datapath.write_sa(5, None)
    assert gateway.datapath.publish_targets(entries)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    traffic.send(gateway.lan, GROUP, PORT, "down", 4, iface="eth0", pad=PAD)
    traffic.send(gateway.gw, GROUP, PORT, "up", 3, iface="xfpeer", mark=0x11, pad=PAD)
    time.sleep(0.3)
    assert lan_rx.stop().exactly_once("up", 3)  # slot 0's decrypted traffic reached the LAN
    assert fcrules(gateway) == {0x11: 0, 0x12: 4 + 3, 0x13: 0, 0: 0}


def test_ipv6_multicast_both_ways_with_its_own_totals(gateway: Gateway) -> None:
    """Real IPv6 sockets: the LAN's mDNS group to the SAs whose IPv6 selectors contain it, a
    client's to the LAN and the other reinjecting SA, a group not configured nowhere; the totals
    per family say which family the copies were."""
    add_sas(gateway)
    traffic.send(gateway.lan, GROUP6, PORT, "mc6", 9, iface="eth0", src="fd09::2", pad=PAD)
    traffic.send(gateway.lan, OTHER_GROUP6, PORT, "other6", 4, iface="eth0", src="fd09::2")
    time.sleep(0.5)
    # slots 0 (ff02::/16) and 1 (ff00::/8); slot 5 has no IPv6 selector
    assert fcrules(gateway, (6,)) == {0x11: 9, 0x12: 9, 0x13: 0, 0: 0}
    assert fcrules(gateway, (4,)) == {0x11: 0, 0x12: 0, 0x13: 0, 0: 0}

    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP6])
    # "Decrypted from the SA with mark 0x11", sent from xfpeer into xf0
    traffic.send(gateway.gw, GROUP6, PORT, "c6", 6, iface="xfpeer", src="fd08::2", mark=0x11)
    time.sleep(0.5)
    got = lan_rx.stop()
    assert got.exactly_once("c6", 6)  # a frame to 33:33:00:00:00:fb the LAN host accepts
    assert got.sources["c6 0"] == "fd08::2"
    assert fcrules(gateway, (6,)) == {0x11: 9, 0x12: 9 + 6, 0x13: 0, 0: 0}  # never the origin

    ip6_len = 40 + 8 + len("mc6 0") + PAD
    counters = gateway.datapath.counters([0, 1])
    assert counters[0].by_direction[Direction.LAN_TO_SA].bytes == 9 * ip6_len
    assert counters[0].by_direction[Direction.SA_TO_LAN].packets == 6
    assert counters[1].by_direction[Direction.SA_TO_SA].packets == 6
    families = gateway.datapath.family_counters()
    assert families[Family.IPV6][Direction.LAN_TO_SA].packets == 18
    assert families[Family.IPV6][Direction.LAN_TO_SA].bytes == 18 * ip6_len
    assert families[Family.IPV6][Direction.SA_TO_LAN].packets == 6
    assert families[Family.IPV6][Direction.SA_TO_SA].packets == 6
    assert all(families[Family.IPV4][d].packets == 0 for d in Direction)
    assert all(v == 0 for v in gateway.datapath.drops().values())


def test_ipv4_copies_count_in_the_ipv4_totals(gateway: Gateway) -> None:
    add_sas(gateway)
    traffic.send(gateway.lan, GROUP, PORT, "mc", 5, iface="eth0", pad=PAD)
    time.sleep(0.3)
    families = gateway.datapath.family_counters()
    assert families[Family.IPV4][Direction.LAN_TO_SA].packets == 15
    assert families[Family.IPV4][Direction.LAN_TO_SA].bytes == 15 * (20 + 8 + len("mc 0") + PAD)
    assert families[Family.IPV6][Direction.LAN_TO_SA].packets == 0


def test_the_gateways_own_multicast_looped_back_is_left_alone(gateway: Gateway) -> None:
    """The daemon joins the groups on the LAN interface, so whatever the gateway itself sends
    to them (its MLD reports, an announcer of its own) the kernel hands back to it at LAN
    ingress, without a MAC header. Not the LAN's traffic: no copy, and no `malformed` count (the
    lab counted two at every start, the two MLD reports of the daemon's own joins)."""
    add_sas(gateway)
    script = (
        "import socket, struct\n"
        "i = socket.if_nametoindex('lan0')\n"
        "s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack('4s4si', "
        f"socket.inet_aton('{GROUP}'), socket.inet_aton('0.0.0.0'), i))\n"
        "s4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack('4s4si', "
        "socket.inet_aton('0.0.0.0'), socket.inet_aton('10.9.0.1'), i))\n"
        "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, struct.pack('16si', "
        f"socket.inet_pton(socket.AF_INET6, '{GROUP6}'), i))\n"
        "s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, i)\n"
        "for n in range(5):\n"
        f"    s4.sendto(b'own4', ('{GROUP}', {PORT}))\n"
        f"    s6.sendto(b'own6', ('{GROUP6}', {PORT}, 0, i))\n"
    )
    netns.run(["python3", "-c", script], netns=gateway.gw)
    time.sleep(0.5)
    assert total_copies(gateway) == 0
    assert all(v == 0 for v in gateway.datapath.drops().values()), gateway.datapath.drops()


def test_mark_only_sas_get_their_copies_queued_with_their_mark(gateway: Gateway) -> None:
    """A local-output SA (mark only) gets no clone: the packet is queued, whole, with its
    mark and slot, for the daemon to send; the XFRM-interface SAs beside it get their clones
    as before, and its counters count the queued copies."""
    add_sas(gateway)
    mc = IPv4Network("224.0.0.0/4")
    gateway.datapath.write_sa(7, SaEntry(0x21, 0x21, (mc,), local_out=True))
    assert gateway.datapath.sync_targets()
    ring = RingReader(gateway.datapath.maps_dir / "local_out")
    try:
        gateway.configure(local_out_sas=1)
        traffic.send(gateway.lan, GROUP, PORT, "mc", 10, iface="eth0", pad=PAD)
        time.sleep(0.5)
        records = list(ring.records())
        assert fcrules(gateway) == {0x11: 10, 0x12: 10, 0x13: 10, 0: 0}  # none for 0x21
        ip_len = 20 + 8 + len("mc 0") + PAD
        assert len(records) == 10
        payloads = set()
        for record in records:
            mark, slot, length, family = layout.LOCAL_COPY_HEADER.unpack_from(record)
            packet = record[layout.FC_LOCAL_HEADER : layout.FC_LOCAL_HEADER + length]
            assert (mark, slot, length, family) == (0x21, 7, ip_len, Family.IPV4)
            assert packet[16:20] == socket.inet_aton(GROUP) and packet[8] == 1  # TTL kept
            payloads.add(packet[28:32])
        assert payloads == {f"mc {i}".encode() for i in range(10)}
        counters = gateway.datapath.counters([7])
        assert counters[7].by_direction[Direction.LAN_TO_SA].packets == 10
        # With no local-output SA in the configuration, nothing is kept, nothing queued (the
        # walker counts what it could not queue, never an older packet).
        gateway.configure(local_out_sas=0)
        traffic.send(gateway.lan, GROUP, PORT, "none", 3, iface="eth0", pad=PAD)
        time.sleep(0.5)
        assert list(ring.records()) == []
        assert gateway.datapath.drops()[DropReason.LOCAL_OUT_SIZE] == 3
    finally:
        ring.close()


def test_the_sender_sends_live_marks_copies_with_their_mark_and_source(gateway: Gateway) -> None:
    """The daemon's sender (forecast/local_out.py) on the real ring: each live mark's copies
    leave the named device once, with that mark (iptables on the far side counts per mark) and
    the LAN sender's address; a mark not (or no longer) live is counted, not sent. Here xf0
    stands in for the WAN device."""
    mc = IPv4Network("224.0.0.0/4")
    gateway.datapath.write_sa(0, SaEntry(0x11, 0x11, (mc,), local_out=True))
    gateway.datapath.write_sa(1, SaEntry(0x12, 0x12, (mc,), local_out=True))
    assert gateway.datapath.sync_targets()
    gateway.configure(local_out_sas=2)
    with netns.entered(gateway.gw):
        sender = LocalOutSender(gateway.datapath.maps_dir, gateway.ifindex["xf0"])
    sources = "-A FCCOUNT -s 10.9.0.2/32 -d 239.255.255.250/32 -i xfpeer\n"  # as saved
    netns.run(
        ["iptables-restore", "-n"], netns=gateway.gw, input_text=f"*mangle\n{sources}COMMIT\n"
    )
    try:
        sender.allow({0x11})
        traffic.send(gateway.lan, GROUP, PORT, "one", 10, iface="eth0", pad=PAD)
        time.sleep(0.5)
        assert sender.drain() == 20  # a record per SA and packet
        assert fcrules(gateway, (4,)) == {0x11: 10, 0x12: 0, 0x13: 0, 0: 0}
        assert sender.summary().copies["sent"] == 10
        assert sender.summary().copies["not_live"] == 10

        sender.allow({0x11, 0x12})
        sender.retain({0x12})  # 0x11's SA going: its guard may be removed after this returns
        traffic.send(gateway.lan, GROUP, PORT, "two", 5, iface="eth0", pad=PAD)
        time.sleep(0.5)
        assert sender.drain() == 10
        assert fcrules(gateway, (4,)) == {0x11: 10, 0x12: 5, 0x13: 0, 0: 0}
        saved = netns.run(["iptables-save", "-c", "-t", "mangle"], netns=gateway.gw).stdout
        assert f"[15:{15 * (20 + 8 + len('one 0') + PAD)}] {sources.strip()}" in saved
        # what `status` reads: the pinned counts, the same as the sender's own
        pinned = PinnedCounters.open(gateway.datapath.maps_dir)
        try:
            counts = pinned.local_counts()
        finally:
            pinned.close()
        assert counts[LocalResult.SENT] == 15 and counts[LocalResult.NOT_LIVE] == 15
        assert sum(counts.values()) == 30
    finally:
        sender.stop()


def test_the_sender_without_cap_net_raw_says_so_and_opens_nothing(gateway: Gateway) -> None:
    """A unit without CAP_NET_RAW: the sender cannot exist (the daemon then leaves mark-only
    SAs alone, with a warning) and holds no ring or map open."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from forecast.local_out import LocalOutSender\n"
        "before = len(os.listdir('/proc/self/fd'))\n"
        "try:\n"
        "    LocalOutSender(Path(sys.argv[1]), 1)\n"
        "except PermissionError:\n"
        "    print('denied', len(os.listdir('/proc/self/fd')) - before)\n"
    )
    out = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_raw",
            "--inh-caps=-net_raw",
            sys.executable,
            "-c",
            code,
            str(gateway.datapath.maps_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.split() == ["denied", "0"], out.stderr


def test_the_tunnel_program_off_the_xfrm_interface_takes_only_decrypted_packets(
    gateway: Gateway,
) -> None:
    """On the WAN device (where mark-only SAs' traffic arrives) the tunnel program leaves the
    WAN's own traffic alone: multicast without a secpath is neither copied nor counted."""
    add_sas(gateway)
    netns.add_veth("wan0", gateway.gw, "eth9", gateway.lan)
    for ns, dev, cidr in (
        (gateway.gw, "wan0", "10.7.0.1/24"),
        (gateway.lan, "eth9", "10.7.0.2/24"),
    ):
        netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", dev], netns=ns)
        netns.run(["ip", "link", "set", dev, "up"], netns=ns)
    wan = netns.ifindex(gateway.gw, "wan0")
    tc.attach(wan, gateway.datapath.fd_for("wan"), "fc_tunnel_ingress", netns=gateway.gw)
    traffic.send(gateway.lan, GROUP, PORT, "wan", 10, iface="eth9", pad=PAD, mark=0x11)
    traffic.send(gateway.lan, "10.7.0.255", PORT, "wanbc", 5, pad=PAD)
    time.sleep(0.5)
    assert total_copies(gateway) == 0
    assert all(v == 0 for v in gateway.datapath.drops().values())
    assert tc.bpf_filters(wan, netns=gateway.gw) == [(tc.DEFAULT_PRIO, "fc_tunnel_ingress")]
