from __future__ import annotations

from forecast_lab import conns
from forecast_lab.conns import GatewayMode


def _child(mode: GatewayMode) -> dict[str, object]:
    conn = conns.gateway_conn(
        wan_addr="192.168.0.1",
        lan_net="10.1.0.0/16",
        lan_broadcast="10.1.255.255",
        mode=mode,
        if_id=42,
    )
    child: dict[str, object] = conn["rw"]["children"]["rw"]
    return child


def test_gateway_child_follows_the_seed() -> None:
    child = _child(GatewayMode.SEED)
    assert child["local_ts"] == ["10.1.0.0/16", "224.0.0.0/4"]
    assert child["remote_ts"] == ["dynamic", "224.0.0.0/4", "10.1.255.255"]
    assert child["mark_in"] == child["mark_out"] == "%unique"
    assert "if_id_in" not in child and "set_mark_in" not in child


def test_forecast_bpf_mode_adds_if_id_and_set_mark_in() -> None:
    child = _child(GatewayMode.FORECAST_BPF)
    assert child["if_id_in"] == child["if_id_out"] == "42"
    assert child["set_mark_in"] == "%same"
    assert child["mark_in"] == "%unique"


def test_reference_plugin_is_loaded_only_on_the_gateway_in_its_mode() -> None:
    ref = conns.charon_plugins(gateway=True, mode=GatewayMode.REFERENCE_PLUGIN, libipsec=False)
    assert "forecast" in ref and "farp" in ref
    assert "forecast" not in conns.charon_plugins(
        gateway=True, mode=GatewayMode.SEED, libipsec=False
    )
    assert "forecast" not in conns.charon_plugins(
        gateway=False, mode=GatewayMode.REFERENCE_PLUGIN, libipsec=False
    )


def test_libipsec_comes_before_kernel_netlink() -> None:
    plugins = conns.charon_plugins(gateway=False, mode=GatewayMode.SEED, libipsec=True)
    assert plugins.index("kernel-libipsec") < plugins.index("kernel-netlink")


def test_no_broadcast_clients_get_their_own_narrower_gateway_conn() -> None:
    all_conns = conns.gateway_conn(
        wan_addr="192.168.0.1",
        lan_net="10.1.0.0/16",
        lan_broadcast="10.1.255.255",
        mode=GatewayMode.FORECAST_BPF,
        if_id=7,
        no_broadcast=frozenset({"c2"}),
    )
    assert set(all_conns) == {"rw", "rw-c2"}
    narrow = all_conns["rw-c2"]
    assert narrow["remote"]["id"] == "c2@forecast.lab"
    child = narrow["children"][conns.GATEWAY_CHILD_NO_BROADCAST]
    assert child["remote_ts"] == ["dynamic", "224.0.0.0/4"]
    assert child["if_id_in"] == "7" and child["mark_in"] == "%unique"
    assert "id" not in all_conns["rw"]["remote"]  # everyone else


def test_client_names_the_broadcast_unless_told_not_to() -> None:
    with_b = conns.client_conn(
        name="c1", gateway_addr="192.168.0.1", lan_net="10.1.0.0/16", lan_broadcast="10.1.255.255"
    )
    without = conns.client_conn(
        name="c2", gateway_addr="192.168.0.1", lan_net="10.1.0.0/16", lan_broadcast=None
    )
    assert with_b["gw"]["children"]["gw"]["local_ts"] == [
        "dynamic",
        "224.0.0.0/4",
        "10.1.255.255",
    ]
    assert without["gw"]["children"]["gw"]["local_ts"] == ["dynamic", "224.0.0.0/4"]
    assert without["gw"]["local"]["id"] == "c2@forecast.lab"


def test_a_host_with_many_identities_has_one_connection_each_and_one_reqid() -> None:
    out = conns.client_conn(
        name="c4",
        gateway_addr="192.168.0.1",
        lan_net="10.1.0.0/16",
        lan_broadcast="10.1.255.255",
        identities=3,
    )
    assert sorted(out) == ["gw-1", "gw-2", "gw-3"]
    assert [out[f"gw-{k}"]["local"]["id"] for k in (1, 2, 3)] == [
        "c4-1@forecast.lab",
        "c4-2@forecast.lab",
        "c4-3@forecast.lab",
    ]
    # One inbound multicast policy serves them all: its template's reqid must fit each SA.
    reqids = {c["children"]["gw"]["reqid"] for c in out.values()}
    assert reqids == {str(conns.SHARED_REQID)}
    assert all(c["vips"] == ["0.0.0.0"] for c in out.values())
    single = conns.client_conn(
        name="c1", gateway_addr="192.168.0.1", lan_net="10.1.0.0/16", lan_broadcast=None
    )
    assert list(single) == ["gw"] and "reqid" not in single["gw"]["children"]["gw"]
