"""Attach and detach TC programs with pyroute2: clsact qdisc, direct-action bpf filter.

Filters carry an explicit priority: a delete must name the same one or it fails (datapath.md),
and an explicit one lets the daemon find and replace its own filters after a restart.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
DEFAULT_PRIO = 0xFC  # "fc": unlikely to clash with an operator's own filters


def _ipr(netns: str | None) -> IPRoute:
    # flags=0: never create a namespace that does not exist (the default would).
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def attach(
    ifindex: int,
    fd: int,
    name: str,
    *,
    netns: str | None = None,
    parent: str = INGRESS,
    prio: int = DEFAULT_PRIO,
) -> None:
    with _ipr(netns) as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        detach(ifindex, netns=netns, parent=parent, prio=prio, ipr=ipr)  # replace our own
        ipr.tc(
            "add-filter",
            "bpf",
            ifindex,
            ":1",
            fd=fd,
            name=name,
            parent=parent,
            classid=1,
            direct_action=True,
            prio=prio,
        )


def detach(
    ifindex: int,
    *,
    netns: str | None = None,
    parent: str = INGRESS,
    prio: int = DEFAULT_PRIO,
    ipr: Any = None,
) -> bool:
    """Remove our filter; True if there was one. A gone device counts as detached."""
    own = ipr is None
    ipr = ipr or _ipr(netns)
    try:
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=parent, prio=prio)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise
    finally:
        if own:
            ipr.close()


def bpf_filters(
    ifindex: int, *, netns: str | None = None, parent: str = INGRESS
) -> list[tuple[int, str]]:
    """(priority, program name) of every bpf filter on the hook."""
    with _ipr(netns) as ipr:
        try:
            msgs = ipr.get_filters(ifindex, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT):
                return []
            raise
        out = []
        for msg in msgs:
            if msg.get_attr("TCA_KIND") != "bpf":
                continue
            opts = msg.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts else None
            if name:
                out.append((msg["info"] >> 16, name))
        return out
