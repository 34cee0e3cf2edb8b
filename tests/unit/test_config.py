from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from forecast import config
from forecast.config import ConfigError


def test_defaults_follow_the_plugin() -> None:
    cfg = config.parse({})
    assert [str(g) for g in cfg.groups] == list(config.DEFAULT_GROUPS)
    assert cfg.interface is None and cfg.reinject == frozenset()
    assert cfg.xfrm.if_id == 42 and cfg.metrics_address.startswith("127.0.0.1:")


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(
        "interface: eth1\n"
        "groups: 239.255.255.250, 224.0.0.251\n"
        "reinject: [rw]\n"
        "xfrm: {name: fc0, if_id: 7, dev: eth0}\n"
        "vici_socket: /run/x.vici\n"
        "metrics_address: '[::1]:9100'\n"
        "log_level: debug\n"
        "metrics_per_sa: false\n"
    )
    cfg = config.load(path)
    assert cfg.metrics_per_sa is False
    assert cfg.interface == "eth1"
    assert cfg.groups == (IPv4Address("239.255.255.250"), IPv4Address("224.0.0.251"))
    assert cfg.reinject == {"rw"}
    assert (cfg.xfrm.name, cfg.xfrm.if_id, cfg.xfrm.dev) == ("fc0", 7, "eth0")
    assert cfg.vici_socket == Path("/run/x.vici") and cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("intreface: eth1\n", "unknown key 'intreface'"),
        ("groups: [10.0.0.1]\n", "groups: 10.0.0.1 is not a multicast address"),
        ("groups: [239.1.1.1, 239.1.1.1]\n", "groups: 239.1.1.1 is listed twice"),
        ("groups: [nonsense]\n", "groups: 'nonsense' is not an IPv4 address"),
        ("groups: []\n", "groups: expected a list"),
        ("groups: [ff02::fb]\n", "groups: ff02::fb is not an IPv4 address"),
        ("groups6: [224.0.0.251]\n", "groups6: 224.0.0.251 is not an IPv6 address"),
        ("groups6: [fe80::1]\n", "groups6: fe80::1 is not a multicast address (ff00::/8)"),
        ("groups6: [ff02::fb, ff02::fb]\n", "groups6: ff02::fb is listed twice"),
        ("groups6: ff02::fb\n", None),
        ("client_groups: {to_lan: [ff02::fb, 10.0.0.5]}\n", "10.0.0.5 is not a multicast"),
        ("xfrm: {if_id: 0}\n", "xfrm.if_id: must be 1..4294967295"),
        ("xfrm: {if_id: yes}\n", "xfrm.if_id: expected a number"),
        ("xfrm: {mtu: 1400}\n", "xfrm: unknown key 'mtu'"),
        ("interface: this-name-is-far-too-long\n", "interface: 'this-name-is-far-too-long'"),
        ("metrics_address: 9100\n", "metrics_address: expected HOST:PORT"),
        ("metrics_address: 'localhost:99999'\n", "metrics_address: port '99999'"),
        ("log_level: verbose\n", "log_level: 'verbose' is not one of"),
        ("metrics_per_sa: no-thanks\n", "metrics_per_sa: expected true or false"),
        ("vici_socket: charon.vici\n", "vici_socket: expected an absolute path"),
        ("reinject: [1, 2]\n", "reinject: expected a list of CHILD_SA config names"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("groups: [\n", "not valid YAML"),
        ("client_groups: any\n", "client_groups: expected a mapping"),
        ("client_groups: {to_wan: any}\n", "client_groups: unknown key 'to_wan'"),
        ("client_groups: {to_lan: [10.0.0.5]}\n", "client_groups.to_lan"),
        ("client_groups: {to_clients: everything}\n", "client_groups.to_clients"),
        ("storm_guard: {per_client: 5}\n", "storm_guard (or off): unknown key 'per_client'"),
        ("storm_guard: {per_sa: {rate: -1}}\n", "storm_guard.per_sa.rate: expected a whole"),
        ("storm_guard: {lan: {rate: 10, burst: 0}}\n", "storm_guard.lan.burst: expected a whole"),
        ("storm_guard: {lan: {rate: fast}}\n", "storm_guard.lan.rate: expected a whole"),
        ("storm_guard: {lan: {rate: 1, bucket: 2}}\n", "storm_guard.lan (or 0/off): unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    if message is None:  # a comma-separated string is a list, as for `groups`
        assert config.load(path).groups6 == (IPv6Address("ff02::fb"),)
        return
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert message in str(exc.value)
    assert str(exc.value).startswith(str(path))
    assert "\n" not in str(exc.value)


def test_too_many_groups() -> None:
    groups = [f"239.0.0.{i}" for i in range(1, 18)]
    with pytest.raises(ConfigError, match="17 IPv4 groups, at most 16"):
        config.parse({"groups": groups})
    with pytest.raises(ConfigError, match="17 IPv6 groups, at most 16"):
        config.parse({"groups6": [f"ff02::{i:x}" for i in range(1, 18)]})
    # 16 of each family fit: the data path holds them apart
    both = config.parse({"groups": groups[:16], "groups6": [f"ff02::{i:x}" for i in range(1, 17)]})
    assert len(both.groups) == len(both.groups6) == 16


def test_ipv6_groups_default_to_discovery_and_can_be_turned_off() -> None:
    cfg = config.parse({})
    assert [str(g) for g in cfg.groups6] == ["ff02::fb", "ff02::1:3", "ff02::c"]
    assert "ff02::1" not in map(str, cfg.groups6)  # all-nodes carries router advertisements
    off = config.parse({"groups6": []})
    assert off.groups6 == ()
    assert config.lan_groups(off) == off.groups
    mixed = config.parse({"client_groups": {"to_lan": ["ff02::fb", "239.255.255.250"]}})
    assert mixed.client_groups is not None
    assert mixed.client_groups.to_lan == (IPv6Address("ff02::fb"), IPv4Address("239.255.255.250"))


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.yaml")


def test_clients_send_only_the_lan_groups_unless_widened() -> None:
    cfg = config.parse({"groups": ["239.255.255.250"]})
    assert cfg.client_groups is None
    clients = config.client_groups_for(cfg)
    # both families' LAN groups, the IPv6 ones by default
    assert (
        clients.to_lan
        == clients.to_clients
        == (
            IPv4Address("239.255.255.250"),
            *(IPv6Address(g) for g in config.DEFAULT_GROUPS6),
        )
    )
    wide = config.parse(
        {"client_groups": {"to_lan": "any", "to_clients": ["224.0.0.251"]}, "groups": ["239.1.1.1"]}
    )
    assert wide.client_groups == config.ClientGroups(None, (IPv4Address("224.0.0.251"),))
    none = config.parse({"client_groups": {"to_clients": []}})
    assert none.client_groups is not None and none.client_groups.to_clients == ()
    # unnamed direction: the LAN groups, both families
    assert none.client_groups.to_lan == (*none.groups, *none.groups6)


def test_group_union_must_fit_the_data_path() -> None:
    many = [f"239.0.1.{i}" for i in range(1, 10)]
    with pytest.raises(
        ConfigError, match=r"name 18 different IPv4 groups together; .* at most 16 per family"
    ):
        config.parse(
            {"client_groups": {"to_lan": many}, "groups": [f"239.0.0.{i}" for i in range(1, 10)]}
        )


def test_storm_guard_defaults_and_off() -> None:
    cfg = config.parse({})
    assert cfg.storm_guard.per_sa == config.RateLimit(100, 200)
    assert cfg.storm_guard.lan == config.RateLimit(1000, 2000)
    off = config.parse({"storm_guard": False})  # YAML's bare `off`
    assert not off.storm_guard.per_sa.enabled and not off.storm_guard.lan.enabled
    some = config.parse({"storm_guard": {"per_sa": {"rate": 5}, "lan": 0}})
    assert some.storm_guard.per_sa == config.RateLimit(5, 10)  # burst: two seconds' worth
    assert some.storm_guard.lan == config.RateLimit(0, 0)


def test_storm_guard_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("storm_guard:\n  per_sa: {rate: 20, burst: 3}\n  lan: off\n")
    cfg = config.load(path)
    assert cfg.storm_guard == config.StormGuard(config.RateLimit(20, 3), config.RateLimit(0, 0))


def test_mark_only_sas_takes_local_out_or_ignore() -> None:
    assert config.parse({}).mark_only_sas == "local-out"
    assert config.parse({"mark_only_sas": "ignore"}).mark_only_sas == "ignore"
    with pytest.raises(config.ConfigError, match="mark_only_sas"):
        config.parse({"mark_only_sas": "xfrm"})
