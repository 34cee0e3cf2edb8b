from __future__ import annotations

from ipaddress import IPv4Address
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
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert message in str(exc.value)
    assert str(exc.value).startswith(str(path))
    assert "\n" not in str(exc.value)


def test_too_many_groups() -> None:
    groups = [f"239.0.0.{i}" for i in range(1, 18)]
    with pytest.raises(ConfigError, match="17 groups, at most 16"):
        config.parse({"groups": groups})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.yaml")
