"""Attach and detach TC programs with pyroute2: clsact qdisc, direct-action bpf filter.

Filters carry an explicit priority and handle: a delete must name the same priority or it fails,
and a fixed (priority, handle) lets a restarted daemon find its own filter and replace the
program in it atomically (cls_bpf swaps it under RCU: every packet sees the old program or the
new one, never neither).
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from forecast import netlink

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
HANDLE = ":1"
DEFAULT_PRIO = 0xFC  # "fc": unlikely to clash with an operator's own filters


def ensure_clsact(ifindex: int, ipr: Any) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach(
    ifindex: int,
    fd: int,
    name: str,
    *,
    netns: str | None = None,
    parent: str = INGRESS,
    prio: int = DEFAULT_PRIO,
) -> None:
    """Install our filter, or swap the program in it atomically if it is there."""
    with netlink.handle(netns) as ipr:
        ensure_clsact(ifindex, ipr)
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            HANDLE,
            fd=fd,
            name=name,
            parent=parent,
            classid=1,
            direct_action=True,
            prio=prio,
        )


def detach(
    ifindex: int, *, netns: str | None = None, parent: str = INGRESS, prio: int = DEFAULT_PRIO
) -> bool:
    """Remove our filter; True if there was one. A gone device counts as detached."""
    with netlink.handle(netns) as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=parent, prio=prio)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return False
            raise


def bpf_filters(
    ifindex: int, *, netns: str | None = None, parent: str = INGRESS
) -> list[tuple[int, str]]:
    """(priority, program name) of every bpf filter on the hook."""
    with netlink.handle(netns) as ipr:
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


def our_filter(ifindex: int, *, netns: str | None = None, prio: int = DEFAULT_PRIO) -> str | None:
    """The name of the program in our filter on the ingress hook; None when there is none."""
    names = [name for p, name in bpf_filters(ifindex, netns=netns) if p == prio]
    return names[0] if names else None
