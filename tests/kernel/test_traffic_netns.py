"""The traffic helpers themselves, over a veth pair: exactly-once counting is what every lab
check rests on, so it is tested against real sockets first."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from forecast_lab import netns, traffic


@pytest.fixture
def pair(run_prefix: str) -> Iterator[tuple[str, str]]:
    a, b = f"{run_prefix}-ta", f"{run_prefix}-tb"
    netns.create(a)
    netns.create(b)
    try:
        netns.add_veth("eth0", a, "eth0", b)
        for ns, addr in ((a, "10.9.0.1/24"), (b, "10.9.0.2/24")):
            netns.run(["ip", "addr", "add", addr, "brd", "+", "dev", "eth0"], netns=ns)
            netns.run(["ip", "link", "set", "eth0", "up"], netns=ns)
        yield a, b
    finally:
        netns.delete(a)
        netns.delete(b)


def test_multicast_and_broadcast_counted_exactly_once(pair: tuple[str, str]) -> None:
    a, b = pair
    rx_b = traffic.Receiver(b, 1900, ["239.255.255.250"])
    rx_a = traffic.Receiver(a, 1900, ["239.255.255.250"])
    traffic.send(a, "239.255.255.250", 1900, "mc", 25, iface="eth0")
    traffic.send(a, "10.9.0.255", 1900, "bc", 7)
    time.sleep(0.5)
    got_b, got_a = rx_b.stop(), rx_a.stop()
    assert got_b.exactly_once("mc", 25)
    assert got_b.exactly_once("bc", 7)
    assert got_b.sources["mc 0"] == "10.9.0.1"
    # Multicast loop is off in the sender: the origin hears nothing of its own multicast.
    assert got_a.total("mc") == 0


def test_group_not_joined_is_not_received(pair: tuple[str, str]) -> None:
    a, b = pair
    rx = traffic.Receiver(b, 1900, ["239.255.255.250"])
    traffic.send(a, "224.0.0.251", 1900, "mdns", 5, iface="eth0")
    got = rx.stop()
    assert got.total("mdns") == 0


def test_send_count_is_bounded(pair: tuple[str, str]) -> None:
    with pytest.raises(RuntimeError, match="--count must be"):
        traffic.send(pair[0], "10.9.0.2", 1900, "x", 10**6)
