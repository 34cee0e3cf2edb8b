"""Links, routes and group memberships the daemon owns, through pyroute2.

- The XFRM interface: every copy for an SA is redirected to it (docs/design.md). An interface
  the daemon creates carries the alias "forecast-bpf", so a restarted daemon adopts it and a
  clean exit removes only what is ours; an operator's own interface is used, never deleted.
- Routes: charon installs none for children with an if_id, so each SA's unicast remote
  selector (the client's virtual IP) is routed through the XFRM interface, under our own route
  protocol number, or unicast to clients would not be encrypted.
- Groups: joined on the LAN interface so IGMP-snooping switches deliver them.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from forecast import netlink

ALIAS = "forecast-bpf"
RTPROT_FORECAST = 252  # unassigned in iproute2's rt_protos: marks our routes
IFF_BROADCAST = 0x2
IFF_LOOPBACK = 0x8


class LinkError(RuntimeError):
    """A link, route or membership could not be set up; the message names it."""


@dataclass(frozen=True)
class LanInterface:
    name: str
    index: int
    mac: bytes
    address: IPv4Address
    broadcast: IPv4Address | None


def _attrs(msg: Any) -> dict[str, Any]:
    return dict(msg["attrs"])


def find_lan(
    name: str | None, *, exclude: Iterable[str] = (), netns: str | None = None
) -> LanInterface:
    """The configured LAN interface, or the first with an IPv4 broadcast (as the plugin)."""
    with netlink.handle(netns) as ipr:
        links = {m["index"]: m for m in ipr.get_links()}
        addrs = [a for a in ipr.get_addr(family=socket.AF_INET)]
    skip = set(exclude)
    candidates = []
    for link in sorted(links.values(), key=lambda m: m["index"]):
        attrs = _attrs(link)
        ifname = attrs.get("IFLA_IFNAME")
        if ifname in skip or (name and ifname != name):
            continue
        if link["flags"] & IFF_LOOPBACK or not link["flags"] & IFF_BROADCAST:
            continue
        for a in addrs:
            if a["index"] != link["index"]:
                continue
            a_attrs = _attrs(a)
            bcast = a_attrs.get("IFA_BROADCAST")
            if bcast or name:
                mac = bytes.fromhex(
                    str(attrs.get("IFLA_ADDRESS", "00:00:00:00:00:00")).replace(":", "")
                )
                candidates.append(
                    LanInterface(
                        str(ifname),
                        int(link["index"]),
                        mac,
                        IPv4Address(a_attrs["IFA_ADDRESS"]),
                        IPv4Address(bcast) if bcast else None,
                    )
                )
                break
        if candidates:
            break
    if not candidates:
        if name:
            raise LinkError(f"LAN interface {name}: not found, or no IPv4 address on it")
        raise LinkError("no interface with an IPv4 broadcast address: set `interface`")
    return candidates[0]


def tx_errors(index: int, netns: str | None = None) -> int:
    """A device's TX errors. On the XFRM interface these are copies the data path handed over
    that did not leave: no policy or state matched, or a queue after encryption was full."""
    with netlink.handle(netns) as ipr:
        links = ipr.get_links(index)
    stats = links[0].get_attr("IFLA_STATS64") if links else None
    return int(stats["tx_errors"]) if stats else 0


def default_route_device(netns: str | None = None) -> str:
    with netlink.handle(netns) as ipr:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = dict(route["attrs"]).get("RTA_OIF")
            if oif:
                return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))
    raise LinkError("no IPv4 default route to bind the XFRM interface to: set xfrm.dev")


@dataclass
class XfrmInterface:
    name: str
    index: int
    created: bool  # ours to delete on exit (created now, or adopted by alias)


def ensure_xfrm(name: str, if_id: int, dev: str, netns: str | None = None) -> XfrmInterface:
    with netlink.handle(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            link = ipr.get_links(found[0])[0]
            info = (
                dict(link.get_attr("IFLA_LINKINFO")["attrs"])
                if link.get_attr("IFLA_LINKINFO")
                else {}
            )
            kind = info.get("IFLA_INFO_KIND")
            data = info.get("IFLA_INFO_DATA")
            have_id = data.get_attr("IFLA_XFRM_IF_ID") if data is not None else None
            if kind != "xfrm":
                raise LinkError(
                    f"{name} exists and is a {kind or 'non-xfrm'} device: choose another xfrm.name"
                )
            if have_id != if_id:
                raise LinkError(f"{name} exists with if_id {have_id}, config says {if_id}")
            _quiet_ipv6(name)  # an interface made by a version that turned IPv6 off
            ipr.link("set", index=found[0], state="up")
            return XfrmInterface(name, found[0], link.get_attr("IFLA_IFALIAS") == ALIAS)
        lower = ipr.link_lookup(ifname=dev)
        if not lower:
            raise LinkError(f"xfrm.dev {dev}: no such interface")
        try:
            ipr.link("add", ifname=name, kind="xfrm", xfrm_link=lower[0], xfrm_if_id=if_id)
        except NetlinkError as exc:
            raise LinkError(
                f"cannot create XFRM interface {name} (if_id {if_id}) on {dev}: "
                f"{exc.args[1] if len(exc.args) > 1 else exc}"
            ) from None
        index = ipr.link_lookup(ifname=name)[0]
        _quiet_ipv6(name)
        ipr.link("set", index=index, ifalias=ALIAS, state="up")
        return XfrmInterface(name, index, True)


def _quiet_ipv6(name: str) -> None:
    """IPv6 on, for copies to IPv6 groups and routes to IPv6 virtual IPs, but no address of its
    own: no link-local address means no DAD, router solicitation or MLD report, chatter that
    has no policy and would count as TX errors, which are how lost copies show. The interface
    still gets its multicast route (ff00::/8), which an IPv6 copy is routed by. A kernel
    without IPv6 has neither file: IPv4 goes on."""
    conf = Path(f"/proc/sys/net/ipv6/conf/{name}")
    with contextlib.suppress(OSError):
        (conf / "addr_gen_mode").write_text("1")  # IN6_ADDR_GEN_MODE_NONE
        (conf / "disable_ipv6").write_text("0")


def lookup_xfrm(name: str, netns: str | None = None) -> XfrmInterface | None:
    """The interface by that name; `created` tells whether it is ours (by its alias)."""
    with netlink.handle(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        return XfrmInterface(name, found[0], link.get_attr("IFLA_IFALIAS") == ALIAS)


def remove_xfrm(xfrm: XfrmInterface, netns: str | None = None) -> None:
    if not xfrm.created:
        return
    with netlink.handle(netns) as ipr:
        try:
            ipr.link("del", index=xfrm.index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


Network = IPv4Network | IPv6Network


def our_routes(netns: str | None = None) -> set[Network]:
    return set(_our_routes_by_oif(netns))


def _our_routes_by_oif(netns: str | None = None) -> dict[Network, int]:
    with netlink.handle(netns) as ipr:
        routes = [
            *ipr.get_routes(family=socket.AF_INET, proto=RTPROT_FORECAST),
            *ipr.get_routes(family=socket.AF_INET6, proto=RTPROT_FORECAST),
        ]
    return {
        ip_network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"): int(r.get_attr("RTA_OIF") or 0)
        for r in routes
        if r["proto"] == RTPROT_FORECAST
    }


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
BATCH_ROUTES = 32  # more routes than this at once (a start, a storm): one `ip -batch`


def _routes_in_batch(
    replace: list[Network], delete: list[Network], xfrm_index: int, netns: str | None
) -> None:
    """Many routes in one process: pyroute2 costs about 1-2 ms per route, `ip -batch` a few
    microseconds (1,000 routes at a start or a stop: 2 s against 10 ms). A route to delete that
    is already gone is not an error."""
    lines = []
    if replace:
        with netlink.handle(netns) as ipr:
            links = ipr.get_links(xfrm_index)
        if not links:
            raise LinkError(f"no device with index {xfrm_index} for our routes")
        dev = links[0].get_attr("IFLA_IFNAME")
        lines += [f"route replace {net} dev {dev} proto {RTPROT_FORECAST}" for net in replace]
    lines += [f"route del {net} proto {RTPROT_FORECAST}" for net in delete]
    argv = ["ip", *(["-n", netns] if netns else []), "-force", "-batch", "-"]
    proc = subprocess.run(
        argv, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
    )
    errors = [
        line
        for line in proc.stderr.splitlines()
        if line.strip()
        and not line.startswith("Command failed")
        and not any(gone in line for gone in ("No such process", "FIB table does not exist"))
    ]
    if proc.returncode != 0 and errors:
        raise LinkError(f"ip -batch (our routes): {'; '.join(errors[:3])}")


def sync_routes(
    wanted: Iterable[Network],
    xfrm_index: int,
    netns: str | None = None,
    *,
    known: set[Network] | None = None,
) -> tuple[set[Network], set[Network]]:
    """Make our routes exactly `wanted` (all through the XFRM interface); (added, removed).
    `known`: the routes in place, when certain; else the kernel's are read, and a route of ours
    through another device is rewritten. Either way only what differs is written: at thousands
    of SAs, one netlink call per route and event would cost seconds."""
    want = set(wanted)
    if known is None:
        kernel = _our_routes_by_oif(netns)
        have = set(kernel)
        write = {net for net in want if kernel.get(net) != xfrm_index}
    else:
        have = set(known)
        write = want - have
    gone = have - want
    if len(write) + len(gone) > BATCH_ROUTES:
        _routes_in_batch(sorted(write, key=str), sorted(gone, key=str), xfrm_index, netns)
        return want - have, gone
    with netlink.handle(netns) as ipr:
        for net in sorted(write, key=str):
            ipr.route(
                "replace",
                family=_AF[net.version],
                dst=str(net.network_address),
                dst_len=net.prefixlen,
                oif=xfrm_index,
                proto=RTPROT_FORECAST,
            )
        for net in sorted(have - want, key=str):
            try:
                ipr.route(
                    "del",
                    family=_AF[net.version],
                    dst=str(net.network_address),
                    dst_len=net.prefixlen,
                    proto=RTPROT_FORECAST,
                )
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise
    return want - have, have - want


Group = IPv4Address | IPv6Address


class GroupMemberships:
    """Memberships of one address family on the LAN interface (IP_ADD_MEMBERSHIP, or
    IPV6_JOIN_GROUP: an MLD report), held by one socket: closing it leaves every group, so a
    snooping switch keeps sending them to the gateway only while forecast-bpf runs. `sock`
    adopts the socket a previous daemon held (`held`: the groups it joined), so a restart never
    leaves and rejoins."""

    def __init__(
        self,
        lan: LanInterface,
        groups: Iterable[Group],
        *,
        family: int = 4,
        sock: socket.socket | None = None,
        held: Iterable[Group] = (),
    ) -> None:
        self.lan = lan
        self.family = family
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        self.sock = sock or socket.socket(af, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.groups: list[Group] = list(held) if sock is not None else []
        try:
            self.set(groups)
        except LinkError:
            self.sock.close()
            raise

    def _option(self, group: Group, join: bool) -> tuple[int, int, bytes]:
        if self.family == 4:
            mreqn = struct.pack("4s4si", group.packed, self.lan.address.packed, self.lan.index)
            return (
                socket.IPPROTO_IP,
                socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP,
                mreqn,
            )
        mreq = struct.pack("16si", group.packed, self.lan.index)
        return (
            socket.IPPROTO_IPV6,
            socket.IPV6_JOIN_GROUP if join else socket.IPV6_LEAVE_GROUP,
            mreq,
        )

    def set(self, groups: Iterable[Group]) -> tuple[list[Group], list[Group]]:
        """Join what is new, leave what is gone; (joined, left)."""
        want = list(groups)
        joined = [g for g in want if g not in self.groups]
        left = [g for g in self.groups if g not in want]
        for group in joined:
            try:
                self.sock.setsockopt(*self._option(group, True))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # already held by the adopted socket
                    raise LinkError(
                        f"cannot join {group} on {self.lan.name}: {exc.strerror}"
                    ) from None
        for group in left:
            with contextlib.suppress(OSError):  # not held: nothing to leave
                self.sock.setsockopt(*self._option(group, False))
        self.groups = want
        return joined, left

    def close(self) -> None:
        self.sock.close()
