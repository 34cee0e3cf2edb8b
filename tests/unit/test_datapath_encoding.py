"""What the control plane writes into the maps, byte for byte, and what it refuses."""

from __future__ import annotations

import ctypes
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from forecast import layout
from forecast.config import RateLimit
from forecast.datapath import (
    DatapathConfig,
    DatapathError,
    SaEntry,
    decode_sa,
    encode_config,
    encode_sa,
)
from forecast.layout import Direction, be32, be128

MC = IPv4Network("224.0.0.0/4")


def test_sa_selectors_are_network_order_address_and_mask() -> None:
    sa = encode_sa(SaEntry(0x2, 0x3, (IPv4Network("10.1.255.255/32"), MC), reinject=True))
    assert sa.flags == layout.FC_SA_ACTIVE | layout.FC_SA_REINJECT
    assert (sa.mark_out, sa.mark_in, sa.n_ts) == (2, 3, 2)
    assert bytes(ctypes.c_uint32(sa.ts[0].addr)) == bytes([10, 1, 255, 255])
    assert bytes(ctypes.c_uint32(sa.ts[0].mask)) == bytes([255, 255, 255, 255])
    assert bytes(ctypes.c_uint32(sa.ts[1].mask)) == bytes([240, 0, 0, 0])
    everything = encode_sa(SaEntry(1, 1, (IPv4Network("0.0.0.0/0"),)))
    assert everything.ts[0].mask == 0  # matches every destination, as the C side expects


def test_ipv6_selectors_go_to_their_own_array_and_read_back_the_same() -> None:
    nets = (
        IPv6Network("ff02::/16"),
        IPv6Network("fd00:1::5/128"),
        IPv6Network("::/0"),
    )
    entry = SaEntry(0x2, 0x3, (IPv4Network("10.1.255.255/32"), *nets, MC))
    sa = encode_sa(entry)
    assert (sa.n_ts, sa.n_ts6) == (2, 3)
    assert bytes((ctypes.c_uint32 * 4)(*sa.ts6[0].addr)) == bytes([0xFF, 2] + [0] * 14)
    assert bytes((ctypes.c_uint32 * 4)(*sa.ts6[0].mask)) == bytes([0xFF, 0xFF] + [0] * 14)
    assert tuple(sa.ts6[1].addr) == be128("fd00:1::5")
    assert tuple(sa.ts6[1].mask) == (0xFFFFFFFF,) * 4
    assert tuple(sa.ts6[2].mask) == (0, 0, 0, 0)  # matches every IPv6 destination
    back = decode_sa(sa)
    assert back is not None
    # read back per family: IPv4 first, then IPv6, each in its order
    assert back.selectors == (IPv4Network("10.1.255.255/32"), MC, *nets)


def test_sa_limits() -> None:
    too_many = tuple(IPv4Network(f"239.0.{i}.0/24") for i in range(layout.FC_MAX_TS + 1))
    with pytest.raises(DatapathError, match=f"5 IPv4 selectors.*at most {layout.FC_MAX_TS}"):
        encode_sa(SaEntry(1, 1, too_many))
    too_many6 = tuple(IPv6Network(f"ff0{i}::/16") for i in range(1, layout.FC_MAX_TS + 2))
    with pytest.raises(DatapathError, match=f"5 IPv6 selectors.*at most {layout.FC_MAX_TS}"):
        encode_sa(SaEntry(1, 1, too_many6))
    # four of each family fit
    both = encode_sa(SaEntry(1, 1, too_many[:4] + too_many6[:4]))
    assert (both.n_ts, both.n_ts6) == (4, 4)
    with pytest.raises(DatapathError, match="non-zero in and out marks"):
        encode_sa(SaEntry(0, 1, (MC,)))


def test_config_encoding_and_refusals() -> None:
    cfg = DatapathConfig(
        xfrm_ifindex=7,
        lan_ifindex=3,
        lan_mac=bytes.fromhex("020000000001"),
        lan_broadcast=IPv4Address("10.1.255.255"),
        groups=(IPv4Address("239.255.255.250"),),
    )
    out = encode_config(cfg)
    assert (out.xfrm_ifindex, out.lan_ifindex, out.n_groups) == (7, 3, 1)
    assert bytes(out.lan_mac) == bytes.fromhex("020000000001")
    with pytest.raises(DatapathError, match="is not a multicast address"):
        encode_config(DatapathConfig(7, 3, bytes(6), None, (IPv4Address("10.0.0.1"),)))
    with pytest.raises(DatapathError, match="LAN MAC must be 6 bytes"):
        encode_config(DatapathConfig(7, 3, bytes(4), None, ()))


def test_group_directions_and_rates_encoding() -> None:
    lan, extra = IPv4Address("239.255.255.250"), IPv4Address("239.1.2.3")
    cfg = DatapathConfig(
        xfrm_ifindex=7,
        lan_ifindex=3,
        lan_mac=bytes(6),
        lan_broadcast=None,
        groups=(lan,),
        client_groups_to_lan=None,  # any
        client_groups_to_sas=(lan, extra),
        lan_rate=RateLimit(1000, 2000),
        sa_rate=RateLimit(3, 1),
    )
    out = encode_config(cfg)
    bit = {d: 1 << d for d in Direction}
    assert out.n_groups == 2
    assert out.groups[0] == be32(str(lan)) and out.groups[1] == be32(str(extra))
    assert out.group_dirs[0] == bit[Direction.LAN_TO_SA] | bit[Direction.SA_TO_SA]
    assert out.group_dirs[1] == bit[Direction.SA_TO_SA]
    assert out.any_group_dirs == bit[Direction.SA_TO_LAN]
    assert (out.lan_rate.interval_ns, out.lan_rate.burst_ns) == (1_000_000, 2_000_000_000)
    assert (out.sa_rate.interval_ns, out.sa_rate.burst_ns) == (333_333_333, 333_333_333)
    unlimited = encode_config(DatapathConfig(7, 3, bytes(6), None, ()))
    assert unlimited.lan_rate.interval_ns == unlimited.sa_rate.interval_ns == 0
    with pytest.raises(DatapathError, match="17 IPv4 groups"):
        encode_config(
            DatapathConfig(
                7, 3, bytes(6), None, tuple(IPv4Address(f"239.0.0.{i}") for i in range(1, 18))
            )
        )


def test_ipv6_groups_are_encoded_beside_the_ipv4_ones() -> None:
    mdns4, mdns6, llmnr6 = (
        IPv4Address("224.0.0.251"),
        IPv6Address("ff02::fb"),
        IPv6Address("ff02::1:3"),
    )
    cfg = DatapathConfig(
        xfrm_ifindex=7,
        lan_ifindex=3,
        lan_mac=bytes(6),
        lan_broadcast=None,
        groups=(mdns4, mdns6),
        client_groups_to_lan=(mdns6, llmnr6),
        client_groups_to_sas=(),
    )
    out = encode_config(cfg)
    bit = {d: 1 << d for d in Direction}
    assert (out.n_groups, out.n_groups6) == (1, 2)
    assert out.groups[0] == be32(str(mdns4)) and out.group_dirs[0] == bit[Direction.LAN_TO_SA]
    assert tuple(out.groups6[0].addr) == be128(str(mdns6))
    assert out.group6_dirs[0] == bit[Direction.LAN_TO_SA] | bit[Direction.SA_TO_LAN]
    assert tuple(out.groups6[1].addr) == be128(str(llmnr6))
    assert out.group6_dirs[1] == bit[Direction.SA_TO_LAN]
    with pytest.raises(DatapathError, match="is not a multicast address"):
        encode_config(DatapathConfig(7, 3, bytes(6), None, (IPv6Address("fe80::1"),)))
    sixteen = tuple(IPv6Address(f"ff02::{i:x}") for i in range(1, 17))
    fits = encode_config(DatapathConfig(7, 3, bytes(6), None, (*sixteen, mdns4)))
    assert (fits.n_groups, fits.n_groups6) == (1, 16)  # 16 per family, not 16 in all
    with pytest.raises(DatapathError, match="17 IPv6 groups"):
        encode_config(DatapathConfig(7, 3, bytes(6), None, (*sixteen, IPv6Address("ff02::99"))))
