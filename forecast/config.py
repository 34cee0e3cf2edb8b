"""YAML configuration → a typed, validated Config. Every error names the key and the problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import yaml

from forecast import layout

DEFAULT_PATH = Path("/etc/forecast-bpf/forecast-bpf.yaml")
# The plugin's default: host multicasts, IGMP, mDNS, LLMNR, SSDP/WS-Discovery.
DEFAULT_GROUPS = ("224.0.0.1", "224.0.0.22", "224.0.0.251", "224.0.0.252", "239.255.255.250")
# The same discovery over IPv6 (which the plugin does not forward): mDNS, LLMNR,
# SSDP/WS-Discovery. Not ff02::1: all-nodes carries the LAN router's advertisements, which
# must not configure a client's tunnel.
DEFAULT_GROUPS6 = ("ff02::fb", "ff02::1:3", "ff02::c")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETFILTER_BACKENDS = ("auto", "nftables", "iptables")
# What to do with a mark-only SA (the plugin's configuration: no if_id): serve it through the
# local output path, or leave it alone.
MARK_ONLY_CHOICES = ("local-out", "ignore")
IFNAMSIZ = 15


class ConfigError(ValueError):
    """One line: where (file and key) and what is wrong."""


@dataclass(frozen=True)
class XfrmConfig:
    name: str = "fcxfrm0"
    if_id: int = 42
    # The WAN device the XFRM interface is bound to (`dev` of `ip link add type xfrm`); None:
    # the device of the default route.
    dev: str | None = None


@dataclass(frozen=True)
class RateLimit:
    """Packets per second and the burst allowed at once; rate 0: no limit."""

    rate: int
    burst: int

    @property
    def enabled(self) -> bool:
        return self.rate > 0


# A client announces itself with a few dozen packets at most (mDNS, LLMNR, SSDP, NetBIOS at
# start-up); a LAN busy with such announcements stays well below a thousand a second.
DEFAULT_PER_SA = RateLimit(rate=100, burst=200)
DEFAULT_LAN = RateLimit(rate=1000, burst=2000)


@dataclass(frozen=True)
class StormGuard:
    per_sa: RateLimit = DEFAULT_PER_SA  # each client's multicast/broadcast, before any copy
    lan: RateLimit = DEFAULT_LAN  # the LAN's, one token per packet however many copies


Group = IPv4Address | IPv6Address


@dataclass(frozen=True)
class ClientGroups:
    """Multicast groups a client's packets are forwarded to, per direction; None: any group
    (the plugin's behaviour). Broadcast always goes both ways."""

    to_lan: tuple[Group, ...] | None  # either family
    to_clients: tuple[Group, ...] | None


@dataclass(frozen=True)
class Config:
    interface: str | None = None  # None: first interface with an IPv4 broadcast
    groups: tuple[IPv4Address, ...] = tuple(IPv4Address(g) for g in DEFAULT_GROUPS)
    groups6: tuple[IPv6Address, ...] = tuple(IPv6Address(g) for g in DEFAULT_GROUPS6)
    reinject: frozenset[str] = frozenset()
    # None: the `groups` and `groups6` lists in both directions (`client_groups_for`)
    client_groups: ClientGroups | None = None
    storm_guard: StormGuard = field(default_factory=StormGuard)
    xfrm: XfrmConfig = field(default_factory=XfrmConfig)
    vici_socket: Path = Path("/var/run/charon.vici")
    metrics_address: str = "127.0.0.1:9719"
    # Per-SA series (6 per SA: packets and bytes, 3 directions); per-connection sums always.
    metrics_per_sa: bool = True
    log_level: str = "info"
    # Where the MARK rules go: "nftables", "iptables" or "auto" (what the host uses).
    netfilter: str = "auto"
    # Mark-only SAs (no if_id): "local-out" (copies from a raw socket with the SA's mark, as the
    # plugin sends them) or "ignore".
    mark_only_sas: str = "local-out"
    pin_dir: Path = Path("/sys/fs/bpf/forecast-bpf")
    # What `status` reads besides the pinned maps: which SA each slot holds.
    state_file: Path = Path("/run/forecast-bpf/state.json")


XFRM_KEYS = {"name", "if_id", "dev"}
CLIENT_GROUP_KEYS = {"to_lan", "to_clients"}
STORM_KEYS = {"per_sa", "lan"}
RATE_KEYS = {"rate", "burst"}
MAX_RATE = 10_000_000  # packets/s; beyond it a limit means nothing on one gateway


def lan_groups(cfg: Config) -> tuple[Group, ...]:
    """The groups forwarded from the LAN to clients, both families."""
    return (*cfg.groups, *cfg.groups6)


def client_groups_for(cfg: Config) -> ClientGroups:
    """What clients may send, per direction: the explicit setting, or the LAN's own groups."""
    return cfg.client_groups or ClientGroups(to_lan=lan_groups(cfg), to_clients=lan_groups(cfg))


def _ifname(where: str, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > IFNAMSIZ
        or "/" in value
        or any(c.isspace() for c in value)
    ):
        raise ConfigError(
            f"{where}: {value!r} is not an interface name (1-{IFNAMSIZ} "
            "characters, no '/' or spaces)"
        )
    return value


FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
MULTICAST_RANGES = {4: "224.0.0.0/4", 6: "ff00::/8"}


def _group_list(where: str, value: Any, families: tuple[int, ...], empty_ok: bool) -> list[Group]:
    if isinstance(value, str):
        value = [g.strip() for g in value.split(",") if g.strip()]
    names = " or ".join(FAMILY_NAMES[f] for f in families)
    if not isinstance(value, list) or (not value and not empty_ok):
        raise ConfigError(f"{where}: expected a list of {names} multicast addresses")
    out: list[Group] = []
    for item in value:
        try:
            addr = ip_address(str(item))
        except ValueError:
            raise ConfigError(f"{where}: {item!r} is not an {names} address") from None
        if addr.version not in families:
            raise ConfigError(f"{where}: {addr} is not an {names} address")
        if not addr.is_multicast:
            raise ConfigError(
                f"{where}: {addr} is not a multicast address ({MULTICAST_RANGES[addr.version]})"
            )
        if addr in out:
            raise ConfigError(f"{where}: {addr} is listed twice")
        out.append(addr)
    for family in families:
        n = sum(1 for a in out if a.version == family)
        if n > layout.FC_MAX_GROUPS:
            raise ConfigError(
                f"{where}: {n} {FAMILY_NAMES[family]} groups, at most {layout.FC_MAX_GROUPS}"
            )
    return out


def _groups(where: str, value: Any) -> tuple[IPv4Address, ...]:
    return tuple(g for g in _group_list(where, value, (4,), False) if isinstance(g, IPv4Address))


def _groups6(where: str, value: Any) -> tuple[IPv6Address, ...]:
    """`groups6: []` turns IPv6 forwarding from the LAN off."""
    return tuple(g for g in _group_list(where, value, (6,), True) if isinstance(g, IPv6Address))


def _mapping(where: str, value: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping ({', '.join(sorted(known))})")
    bad = sorted(set(map(str, value)) - known)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
    return value


def _client_group_list(
    where: str, value: Any, groups: tuple[Group, ...]
) -> tuple[Group, ...] | None:
    if value == "any":
        return None
    if value == "groups":
        return groups
    if isinstance(value, list) and not value:
        return ()  # no multicast at all in this direction; broadcast still goes
    return tuple(_group_list(f"{where} (a list, 'groups' or 'any')", value, (4, 6), False))


def _client_groups(where: str, value: Any, groups: tuple[Group, ...]) -> ClientGroups:
    data = _mapping(where, value, CLIENT_GROUP_KEYS)
    out = ClientGroups(
        to_lan=_client_group_list(f"{where}.to_lan", data.get("to_lan", "groups"), groups),
        to_clients=_client_group_list(
            f"{where}.to_clients", data.get("to_clients", "groups"), groups
        ),
    )
    union = {*groups, *(out.to_lan or ()), *(out.to_clients or ())}
    for family, name in FAMILY_NAMES.items():
        n = sum(1 for g in union if g.version == family)
        if n > layout.FC_MAX_GROUPS:
            raise ConfigError(
                f"{where}: groups, groups6 and client_groups name {n} different {name} groups "
                f"together; the data path holds at most {layout.FC_MAX_GROUPS} per family"
            )
    return out


def _count(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected a whole number {lo}..{hi}, got {value!r}")
    return value


def _rate(where: str, value: Any, default: RateLimit) -> RateLimit:
    if value is False or value == 0 or value == "off":  # YAML reads a bare `off` as false
        return RateLimit(0, 0)
    data = _mapping(f"{where} (or 0/off)", value, RATE_KEYS)
    rate = _count(f"{where}.rate", data.get("rate", default.rate), 0, MAX_RATE)
    # A burst below one packet would refuse everything; by default twice the rate (2 s).
    burst = _count(f"{where}.burst", data.get("burst", max(1, 2 * rate)), 1, 100 * MAX_RATE)
    return RateLimit(rate, burst if rate else 0)


def _storm_guard(where: str, value: Any) -> StormGuard:
    if value is False or value == "off":
        return StormGuard(RateLimit(0, 0), RateLimit(0, 0))
    data = _mapping(f"{where} (or off)", value, STORM_KEYS)
    return StormGuard(
        per_sa=_rate(f"{where}.per_sa", data.get("per_sa", {}), DEFAULT_PER_SA),
        lan=_rate(f"{where}.lan", data.get("lan", {}), DEFAULT_LAN),
    )


def _names(where: str, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = [n.strip() for n in value.split(",") if n.strip()]
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise ConfigError(f"{where}: expected a list of CHILD_SA config names")
    return frozenset(value)


def _if_id(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not 1 <= value <= 0xFFFFFFFF:
        raise ConfigError(
            f"{where}: must be 1..4294967295 (a normal XFRM interface needs a non-zero if_id)"
        )
    return value


def _address_port(where: str, value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: port {port!r} is not 1..65535")
    if not host:
        raise ConfigError(f"{where}: missing host in {value!r}")
    return value


def _one_of(where: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(options)}")
    return str(value)


def _path(where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: expected an absolute path, got {value!r}")
    return Path(value)


def _xfrm(where: str, value: Any) -> XfrmConfig:
    x = _mapping(where, value, XFRM_KEYS)
    base = XfrmConfig()
    return XfrmConfig(
        name=_ifname(f"{where}.name", x["name"]) if "name" in x else base.name,
        if_id=_if_id(f"{where}.if_id", x["if_id"]) if "if_id" in x else base.if_id,
        dev=_ifname(f"{where}.dev", x["dev"]) if x.get("dev") is not None else None,
    )


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


# Every top-level key but client_groups (which reads `groups` and `groups6`): its parser, given
# "<file>: <key>" to name in its errors and the YAML value.
PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "interface": _ifname,
    "groups": _groups,
    "groups6": _groups6,
    "reinject": _names,
    "storm_guard": _storm_guard,
    "xfrm": _xfrm,
    "vici_socket": _path,
    "metrics_address": _address_port,
    "metrics_per_sa": _bool,
    "log_level": lambda where, value: _one_of(where, value, LOG_LEVELS),
    "netfilter": lambda where, value: _one_of(where, value, NETFILTER_BACKENDS),
    "mark_only_sas": lambda where, value: _one_of(where, value, MARK_ONLY_CHOICES),
    "pin_dir": _path,
    "state_file": _path,
}


KEYS = {*PARSERS, "client_groups"}


def parse(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    unknown = sorted(set(map(str, data)) - KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})"
        )
    kw: dict[str, Any] = {
        key: parser(f"{source}: {key}", data[key]) for key, parser in PARSERS.items() if key in data
    }
    if "client_groups" in data:
        both = (*kw.get("groups", Config.groups), *kw.get("groups6", Config.groups6))
        kw["client_groups"] = _client_groups(
            f"{source}: client_groups", data["client_groups"], both
        )
    return Config(**kw)


def load(path: Path) -> Config:
    """Read and validate; a missing default file means all defaults, any other miss an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if path == DEFAULT_PATH:
            return Config()
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse(data, str(path))
