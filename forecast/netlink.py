"""The one way to open a netlink handle (pyroute2), in a network namespace or not."""

from __future__ import annotations

from pyroute2 import IPRoute


def handle(netns: str | None) -> IPRoute:
    # flags=0: never create a namespace that does not exist (pyroute2's default would).
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()
