"""The SA table: which CHILD_SAs exist, derived from strongSwan's VICI messages. Pure, no I/O.

A `list-sas` snapshot fills it; `child-updown`, `child-rekey`, `ike-updown` and `ike-rekey`
events patch it (quirks of charon 5.9.8: docs/design.md, The lab). Every method returns what
changed, so the daemon can log one line per SA added, rekeyed or removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any

Network = IPv4Network | IPv6Network

# A rekeyed child still carries traffic for a moment after the new one is installed; its
# inbound-ESP rule stays this long (the plugin removes it at once and may lose packets).
REKEY_GRACE_S = 10.0


class PayloadError(ValueError):
    """A VICI message is missing a key or has a value of the wrong shape; names which."""


# Names and identities come from peers and configuration we do not control; past this length
# they are cut (an IKE identity is rarely longer than a mail address or a DN).
MAX_TEXT = 256


def _s(value: Any) -> str:
    """A VICI value as text; bytes that are not UTF-8 become \\xNN escapes, never an error."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """Names and identities as every later consumer may show them: control and format
    characters (newlines, escape sequences, bidi overrides) escaped, length bounded. Applied once,
    where a VICI message is parsed, so no log line, status table, metric label or rule sees the
    raw text."""
    out = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _get(msg: Mapping[Any, Any], key: str) -> Any:
    if key in msg:
        return msg[key]
    bkey = key.encode()
    if bkey in msg:
        return msg[bkey]
    return None


def _need(msg: Mapping[Any, Any], key: str, where: str) -> str:
    value = _get(msg, key)
    if value is None or isinstance(value, list | dict):
        raise PayloadError(f"{where}: missing or non-scalar '{key}'")
    return _s(value)


def _hex(msg: Mapping[Any, Any], key: str, where: str, default: int | None = None) -> int:
    value = _get(msg, key)
    if value is None:
        if default is None:
            raise PayloadError(f"{where}: missing '{key}'")
        return default
    try:
        return int(_s(value), 16)
    except ValueError:
        raise PayloadError(f"{where}: '{key}' is not hexadecimal: {_s(value)!r}") from None


def _port(msg: Mapping[Any, Any], key: str, where: str) -> int:
    """An IKE port (500 when absent); one out of range would be wrapped by iptables into
    another port's rule."""
    if _get(msg, key) is None:
        return 500
    port = _int(msg, key, where)
    if not 0 < port < 65536:
        raise PayloadError(f"{where}: '{key}' {port} is not a port (1..65535)")
    return port


def _int(msg: Mapping[Any, Any], key: str, where: str) -> int:
    text = _need(msg, key, where)
    try:
        return int(text)
    except ValueError:
        raise PayloadError(f"{where}: '{key}' is not a number: {text!r}") from None


def _networks(msg: Mapping[Any, Any], key: str, where: str) -> tuple[Network, ...]:
    value = _get(msg, key) or []
    if not isinstance(value, list):
        raise PayloadError(f"{where}: '{key}' is not a list")
    out: list[Network] = []
    for item in value:
        text = _s(item)
        try:
            out.append(ip_network(text, strict=False))
        except ValueError:
            raise PayloadError(f"{where}: '{key}' holds {text!r}, not an IP prefix") from None
    return tuple(out)


def _address(msg: Mapping[Any, Any], key: str, where: str) -> IPv4Address | None:
    value = _get(msg, key)
    if value is None:
        return None
    try:
        return IPv4Address(_s(value))
    except AddressValueError:
        return None  # IPv6 peer: not ours to mark


@dataclass(frozen=True)
class ChildSa:
    """One installed CHILD_SA as the gateway sees it."""

    ike_name: str
    ike_id: int
    child_name: str
    unique_id: int
    reqid: int
    state: str
    mark_in: int
    mark_out: int
    if_id_in: int
    if_id_out: int
    spi_in: int
    spi_out: int
    encap: bool
    local_host: IPv4Address | None
    remote_host: IPv4Address | None
    local_port: int
    remote_port: int
    remote_id: str
    remote_vips: tuple[IPv4Address | IPv6Address, ...]  # either family
    local_ts: tuple[Network, ...]  # either family
    remote_ts: tuple[Network, ...]
    # When set: rekeyed, kept until this monotonic time for its in-flight packets.
    retire_at: float | None = None

    def __hash__(self) -> int:
        # Computed once: desired.py caches per child, and hashing every field (selectors,
        # addresses) at every event costs more than the work it saves at thousands of SAs.
        # A subset of the fields keeps "equal children hash equal".
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.unique_id, self.spi_in, self.spi_out, self.mark_in, self.retire_at))
            object.__setattr__(self, "_hash", cached)
        return int(cached)

    @property
    def marked(self) -> bool:
        """Handled by forecast-bpf, as by the plugin: both marks set (`mark = %unique`)."""
        return self.mark_in != 0 and self.mark_out != 0

    @property
    def label(self) -> str:
        return (
            f"{self.ike_name}/{self.child_name} #{self.unique_id} ({self.remote_id}, "
            f"mark {self.mark_in:#x}, spi-in {self.spi_in:08x})"
        )


def parse_child(ike_name: str, ike: Mapping[Any, Any], child: Mapping[Any, Any]) -> ChildSa:
    ike_name = printable(ike_name)
    where = f"IKE_SA {ike_name}"
    name = printable(_need(child, "name", where))
    where = f"CHILD_SA {ike_name}/{name}"
    vips = []
    for v in _get(ike, "remote-vips") or []:
        try:
            vips.append(ip_address(_s(v)))
        except ValueError:
            continue  # not an address: shown as nothing rather than refusing the SA
    return ChildSa(
        ike_name=ike_name,
        ike_id=_int(ike, "uniqueid", f"IKE_SA {ike_name}"),
        child_name=name,
        unique_id=_int(child, "uniqueid", where),
        reqid=_int(child, "reqid", where),
        state=_need(child, "state", where),
        mark_in=_hex(child, "mark-in", where, 0),
        mark_out=_hex(child, "mark-out", where, 0),
        if_id_in=_hex(child, "if-id-in", where, 0),
        if_id_out=_hex(child, "if-id-out", where, 0),
        spi_in=_hex(child, "spi-in", where),
        spi_out=_hex(child, "spi-out", where),
        encap=_s(_get(child, "encap") or "no") == "yes",
        local_host=_address(ike, "local-host", where),
        remote_host=_address(ike, "remote-host", where),
        local_port=_port(ike, "local-port", where),
        remote_port=_port(ike, "remote-port", where),
        remote_id=printable(_s(_get(ike, "remote-id") or "")),
        remote_vips=tuple(vips),
        local_ts=_networks(child, "local-ts", where),
        remote_ts=_networks(child, "remote-ts", where),
    )


def _ike_sections(payload: Mapping[Any, Any]) -> Iterable[tuple[str, Mapping[Any, Any]]]:
    for key, value in payload.items():
        if isinstance(value, Mapping):
            yield printable(_s(key)), value


def _children(ike_name: str, ike: Mapping[Any, Any]) -> list[ChildSa]:
    sas = _get(ike, "child-sas") or {}
    if not isinstance(sas, Mapping):
        raise PayloadError(f"IKE_SA {ike_name}: 'child-sas' is not a section")
    return [parse_child(ike_name, ike, c) for c in sas.values() if isinstance(c, Mapping)]


@dataclass(frozen=True)
class Change:
    kind: str  # "added", "removed", "rekeyed", "retired", "moved" (new IKE endpoints)
    child: ChildSa
    old: ChildSa | None = None

    def line(self) -> str:
        if self.kind == "moved" and self.old is not None:
            return f"SA moved: {self.child.label}, {_endpoint(self.old)} -> {_endpoint(self.child)}"
        if self.kind == "rekeyed" and self.old is not None:
            return (
                f"SA rekeyed: {self.child.label}, was #{self.old.unique_id} "
                f"spi-in {self.old.spi_in:08x}"
            )
        return f"SA {self.kind}: {self.child.label}"


def _endpoint(child: ChildSa) -> str:
    encap = " (UDP-encapsulated)" if child.encap else ""
    return f"{child.remote_host}:{child.remote_port}{encap}"


def _same_endpoints(a: ChildSa, b: ChildSa) -> bool:
    return (a.local_host, a.local_port, a.remote_host, a.remote_port, a.encap) == (
        b.local_host,
        b.local_port,
        b.remote_host,
        b.remote_port,
        b.encap,
    )


class SaTable:
    """Installed CHILD_SAs by unique id, including rekeyed ones in their grace period."""

    def __init__(self) -> None:
        self.children: dict[int, ChildSa] = {}

    def __len__(self) -> int:
        return len(self.children)

    def active(self) -> list[ChildSa]:
        return sorted(
            (c for c in self.children.values() if c.retire_at is None), key=lambda c: c.unique_id
        )

    def all(self) -> list[ChildSa]:
        return sorted(self.children.values(), key=lambda c: c.unique_id)

    def _add(self, child: ChildSa, changes: list[Change]) -> None:
        if child.unique_id not in self.children:
            changes.append(Change("added", child))
        self.children[child.unique_id] = child

    def _remove(self, unique_id: int, changes: list[Change]) -> None:
        old = self.children.pop(unique_id, None)
        if old is not None and old.retire_at is None:
            changes.append(Change("removed", old))

    def load_snapshot(self, list_sas: Iterable[Mapping[Any, Any]]) -> list[Change]:
        """Replace the table with a `list-sas` answer (one message per IKE_SA)."""
        seen: dict[int, ChildSa] = {}
        for msg in list_sas:
            for ike_name, ike in _ike_sections(msg):
                for child in _children(ike_name, ike):
                    if child.state == "INSTALLED":
                        seen[child.unique_id] = child
        changes: list[Change] = []
        for uid in list(self.children):
            if uid not in seen and self.children[uid].retire_at is None:
                self._remove(uid, changes)
        for child in seen.values():
            held = self.children.get(child.unique_id)
            if held is not None and held.retire_at is None and not _same_endpoints(held, child):
                changes.append(Change("moved", child, held))  # an ike-update we did not see
            self._add(child, changes)
        return changes

    def apply(self, event: str, payload: Mapping[Any, Any], now: float) -> list[Change]:
        changes: list[Change] = []
        up = _s(_get(payload, "up") or "") == "yes"  # down events carry no "up" at all
        if event == "child-updown":
            for ike_name, ike in _ike_sections(payload):
                for child in _children(ike_name, ike):
                    if up and child.state == "INSTALLED":
                        self._add(child, changes)
                    elif not up:
                        self._remove(child.unique_id, changes)
        elif event == "child-rekey":
            for ike_name, ike in _ike_sections(payload):
                sas = _get(ike, "child-sas") or {}
                for pair in sas.values():
                    old_msg, new_msg = _get(pair, "old"), _get(pair, "new")
                    if not isinstance(old_msg, Mapping) or not isinstance(new_msg, Mapping):
                        raise PayloadError(f"IKE_SA {ike_name}: child-rekey without old/new")
                    old = parse_child(ike_name, ike, old_msg)
                    new = parse_child(ike_name, ike, new_msg)
                    previous = self.children.get(old.unique_id, old)
                    self.children[old.unique_id] = replace(previous, retire_at=now + REKEY_GRACE_S)
                    self.children[new.unique_id] = new
                    changes.append(Change("rekeyed", new, old))
        elif event == "ike-updown":
            if not up:
                for _ike_name, ike in _ike_sections(payload):
                    ike_id = _int(ike, "uniqueid", "ike-updown")
                    for uid, child in list(self.children.items()):
                        if child.ike_id == ike_id:
                            self._remove(uid, changes)
        elif event == "ike-rekey":
            for ike_name, pair in _ike_sections(payload):
                old_msg, new_msg = _get(pair, "old"), _get(pair, "new")
                if not isinstance(old_msg, Mapping) or not isinstance(new_msg, Mapping):
                    raise PayloadError(f"IKE_SA {ike_name}: ike-rekey without old/new")
                old_id = _int(old_msg, "uniqueid", "ike-rekey old")
                new_id = _int(new_msg, "uniqueid", "ike-rekey new")
                for uid, child in list(self.children.items()):
                    if child.ike_id == old_id:
                        self.children[uid] = replace(child, ike_id=new_id)
        elif event == "ike-update":
            self._move(payload, changes)
        else:
            raise PayloadError(f"unexpected VICI event {event!r}")
        return changes

    def _move(self, payload: Mapping[Any, Any], changes: list[Change]) -> None:
        """The IKE_SA's endpoints changed (a NAT mapping, MOBIKE): charon gives the new ones at
        the top and the IKE_SA, still with its old ones, in a section. Its children's kernel SAs
        follow; so must their inbound rules, which match the peer's address and port. Whether
        ESP is now UDP-encapsulated is the IKE_SA's NAT condition, as the plugin reads it: the
        children's own `encap` is updated only after this event."""
        where = "ike-update"
        local = _address(payload, "local-host", where)
        remote = _address(payload, "remote-host", where)
        if _get(payload, "remote-host") is None or _get(payload, "local-host") is None:
            raise PayloadError(f"{where}: missing 'local-host' or 'remote-host'")
        local_port = _port(payload, "local-port", where)
        remote_port = _port(payload, "remote-port", where)
        for ike_name, ike in _ike_sections(payload):
            ike_id = _int(ike, "uniqueid", f"{where} IKE_SA {ike_name}")
            encap = _s(_get(ike, "nat-any") or "no") == "yes"
            for uid, child in list(self.children.items()):
                if child.ike_id != ike_id:
                    continue
                moved = replace(
                    child,
                    local_host=local,
                    remote_host=remote,
                    local_port=local_port,
                    remote_port=remote_port,
                    encap=encap,
                )
                if not _same_endpoints(child, moved):
                    self.children[uid] = moved
                    if child.retire_at is None:
                        changes.append(Change("moved", moved, child))

    def expire(self, now: float) -> list[Change]:
        """Drop rekeyed children whose grace period is over."""
        changes = []
        for uid, child in list(self.children.items()):
            if child.retire_at is not None and child.retire_at <= now:
                del self.children[uid]
                changes.append(Change("retired", child))
        return changes
