"""Kernel tier: root and network namespaces on this machine's own kernel.

Cannot run → every test errors with the reason (never a skip)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from forecast_lab import netns
from tests.kernel.daemon_fixture import running  # noqa: F401  (a fixture, used by name)
from tests.kernel.veth_gateway import gateway  # noqa: F401  (a fixture, used by name)

NEEDED_TOOLS = ("ip", "iptables", "ethtool", "/usr/lib/ipsec/charon")


@pytest.fixture(scope="session", autouse=True)
def kernel_tier_can_run() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "kernel tier needs root (network namespaces, charon): run as root", pytrace=False
        )
    missing = [t for t in NEEDED_TOOLS if not shutil.which(t) and not os.path.exists(t)]
    if missing:
        pytest.fail(f"kernel tier is missing {missing}: run `make setup`", pytrace=False)


@pytest.fixture(scope="session")
def run_prefix() -> Iterator[str]:
    """One prefix per test run; anything left with it is removed and reported at the end."""
    prefix = netns.unique_prefix("fct")
    yield prefix
    left = netns.list_with_prefix(prefix)
    for name in left:
        netns.delete(name)
    assert not left, f"tests left namespaces behind: {left}"


@pytest.fixture
def nsname(run_prefix: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, removed even when the test fails."""
    name = f"{run_prefix}-{abs(hash(request.node.nodeid)) % 100000:05d}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)
