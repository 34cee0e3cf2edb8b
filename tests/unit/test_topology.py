from __future__ import annotations

from pathlib import Path

import pytest

from forecast_lab.topology import Topology


def test_plan_addresses_and_names() -> None:
    topo = Topology.plan("fcx", 3)
    assert [c.name for c in topo.clients] == ["c1", "c2", "c3"]
    assert [c.wan_addr for c in topo.clients] == ["192.168.0.101", "192.168.0.102", "192.168.0.103"]
    assert topo.gateway.netns == "fcx-gw"
    assert all(ns.startswith("fcx-") for ns in topo.namespaces)
    assert len(set(topo.namespaces)) == len(topo.namespaces) == 6


@pytest.mark.parametrize("clients", [0, -1, 101])
def test_plan_rejects_bad_client_counts(clients: int) -> None:
    with pytest.raises(ValueError, match="clients must be"):
        Topology.plan("fcx", clients)


def test_json_round_trip_and_environment() -> None:
    topo = Topology.plan("fcy", 2)
    topo.clients[0].virtual_ip = "10.1.0.129"
    topo.gateway.vici_socket = "/tmp/x/charon.vici"
    again = Topology.from_json(topo.to_json())
    assert again == topo
    env = topo.environment(Path("/tmp/t.json"))
    assert env["FORECAST_LAB_CLIENTS"] == "c1 c2"
    assert env["FORECAST_LAB_C1_VIRTUAL_IP"] == "10.1.0.129"
    assert env["FORECAST_LAB_GW_VICI_SOCKET"] == "/tmp/x/charon.vici"
    assert env["FORECAST_LAB_LAN_NS"] == "fcy-lan"
    assert "FORECAST_LAB_C2_VIRTUAL_IP" not in env  # not connected: not invented


def test_unknown_host_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no lab host named 'c9'"):
        Topology.plan("fcz", 2).host("c9")


def test_identities_widen_the_pool_and_are_bounded() -> None:
    small = Topology.plan("fcx", 20, 6)
    assert small.vip_pool == "10.1.0.128/25" and small.identities == 6
    big = Topology.plan("fcx", 20, 50)
    assert big.vip_pool == "10.1.16.0/20"
    assert Topology.from_json(big.to_json()).identities == 50
    assert big.environment(Path("/tmp/t.json"))["FORECAST_LAB_IDENTITIES"] == "50"
    with pytest.raises(ValueError, match="identities must be"):
        Topology.plan("fcx", 2, 101)
    with pytest.raises(ValueError, match="at most 4000"):
        Topology.plan("fcx", 100, 41)
