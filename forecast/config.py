"""YAML configuration → a typed, validated Config. Every error names the key and the problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address
from pathlib import Path
from typing import Any

import yaml

from forecast import layout

DEFAULT_PATH = Path("/etc/forecast-bpf/forecast-bpf.yaml")
# The plugin's default: host multicasts, IGMP, mDNS, LLMNR, SSDP/WS-Discovery.
DEFAULT_GROUPS = ("224.0.0.1", "224.0.0.22", "224.0.0.251", "224.0.0.252", "239.255.255.250")
LOG_LEVELS = ("debug", "info", "warning", "error")
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
class Config:
    interface: str | None = None  # None: first interface with an IPv4 broadcast
    groups: tuple[IPv4Address, ...] = tuple(IPv4Address(g) for g in DEFAULT_GROUPS)
    reinject: frozenset[str] = frozenset()
    xfrm: XfrmConfig = field(default_factory=XfrmConfig)
    vici_socket: Path = Path("/var/run/charon.vici")
    metrics_address: str = "127.0.0.1:9719"
    # Per-SA series (6 per SA: packets and bytes, 3 directions); per-connection sums always.
    metrics_per_sa: bool = True
    log_level: str = "info"
    pin_dir: Path = Path("/sys/fs/bpf/forecast-bpf")
    # What `status` reads besides the pinned maps: which SA each slot holds.
    state_file: Path = Path("/run/forecast-bpf/state.json")


KEYS = {
    "interface",
    "groups",
    "reinject",
    "xfrm",
    "vici_socket",
    "metrics_address",
    "metrics_per_sa",
    "log_level",
    "pin_dir",
    "state_file",
}
XFRM_KEYS = {"name", "if_id", "dev"}


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


def _groups(where: str, value: Any) -> tuple[IPv4Address, ...]:
    if isinstance(value, str):
        value = [g.strip() for g in value.split(",") if g.strip()]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a list of IPv4 multicast addresses")
    out = []
    for item in value:
        try:
            addr = IPv4Address(str(item))
        except AddressValueError:
            raise ConfigError(f"{where}: {item!r} is not an IPv4 address") from None
        if not addr.is_multicast:
            raise ConfigError(f"{where}: {addr} is not a multicast address (224.0.0.0/4)")
        if addr in out:
            raise ConfigError(f"{where}: {addr} is listed twice")
        out.append(addr)
    if len(out) > layout.FC_MAX_GROUPS:
        raise ConfigError(f"{where}: {len(out)} groups, at most {layout.FC_MAX_GROUPS}")
    return tuple(out)


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


def _path(where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: expected an absolute path, got {value!r}")
    return Path(value)


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
    kw: dict[str, Any] = {}
    if "interface" in data:
        kw["interface"] = _ifname(f"{source}: interface", data["interface"])
    if "groups" in data:
        kw["groups"] = _groups(f"{source}: groups", data["groups"])
    if "reinject" in data:
        kw["reinject"] = _names(f"{source}: reinject", data["reinject"])
    if "xfrm" in data:
        x = data["xfrm"]
        if not isinstance(x, dict):
            raise ConfigError(f"{source}: xfrm: expected a mapping (name, if_id, dev)")
        bad = sorted(set(map(str, x)) - XFRM_KEYS)
        if bad:
            raise ConfigError(
                f"{source}: xfrm: unknown key {bad[0]!r} (known: {', '.join(sorted(XFRM_KEYS))})"
            )
        base = XfrmConfig()
        kw["xfrm"] = XfrmConfig(
            name=_ifname(f"{source}: xfrm.name", x["name"]) if "name" in x else base.name,
            if_id=_if_id(f"{source}: xfrm.if_id", x["if_id"]) if "if_id" in x else base.if_id,
            dev=_ifname(f"{source}: xfrm.dev", x["dev"]) if x.get("dev") is not None else None,
        )
    if "vici_socket" in data:
        kw["vici_socket"] = _path(f"{source}: vici_socket", data["vici_socket"])
    if "metrics_address" in data:
        kw["metrics_address"] = _address_port(f"{source}: metrics_address", data["metrics_address"])
    if "metrics_per_sa" in data:
        if not isinstance(data["metrics_per_sa"], bool):
            raise ConfigError(
                f"{source}: metrics_per_sa: expected true or false, got {data['metrics_per_sa']!r}"
            )
        kw["metrics_per_sa"] = data["metrics_per_sa"]
    if "log_level" in data:
        level = data["log_level"]
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"{source}: log_level: {level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        kw["log_level"] = level
    if "pin_dir" in data:
        kw["pin_dir"] = _path(f"{source}: pin_dir", data["pin_dir"])
    if "state_file" in data:
        kw["state_file"] = _path(f"{source}: state_file", data["state_file"])
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
