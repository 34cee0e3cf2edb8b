"""Our MARK chains against real iptables in a namespace: accepted, hooked first, replaced whole,
removed without a trace, and nobody else's rules touched."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

import pytest

from forecast import config, desired, netfilter
from forecast.desired import MarkRule
from forecast.lab import netns
from forecast.sa import SaTable
from tests import hostile_names


def _save(ns: str) -> str:
    return netns.run(["iptables-save", "-t", "mangle"], netns=ns).stdout


def _rule(chain: str, match: tuple[str, ...], mark: int) -> MarkRule:
    return MarkRule(chain, match, mark, f"forecast-bpf test {mark}")


ESP = (
    "-s",
    "192.168.0.11/32",
    "-d",
    "192.168.0.1/32",
    "-p",
    "esp",
    "-m",
    "esp",
    "--espspi",
    "1061112765",
)
NATT = (
    "-s",
    "192.168.0.12/32",
    "-d",
    "192.168.0.1/32",
    "-p",
    "udp",
    "-m",
    "udp",
    "--sport",
    "4500",
    "--dport",
    "4500",
)


def test_apply_replace_remove(nsname: str) -> None:
    operator_rule = [
        "iptables",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    ]
    netns.run(operator_rule, netns=nsname)
    rules = netfilter.Rules(nsname)
    assert rules.backend.variant in ("nf_tables", "legacy")

    rules.apply(
        [
            _rule("PREROUTING", ESP, 2),
            _rule("PREROUTING", NATT, 3),
            _rule("PREROUTING", ("-d", "10.1.0.129/32"), 2),
            _rule("OUTPUT", ("-d", "10.1.0.129/32"), 2),
        ]
    )
    text = _save(nsname)
    pre = [line for line in text.splitlines() if line.startswith("-A PREROUTING")]
    assert pre[0] == "-A PREROUTING -j FORECAST-PRE"  # first: marks before anything else
    assert "--dport 22 -j ACCEPT" in pre[1]
    assert len(rules.current()) == 4
    assert any("--espspi 1061112765" in r and "0x2/0xffffffff" in r for r in rules.current())

    # A second apply replaces the chain contents and does not hook twice.
    rules.apply([_rule("PREROUTING", ("-d", "10.1.0.130/32"), 3)])
    current = rules.current()
    assert len(current) == 1 and "10.1.0.130/32" in current[0]
    assert _save(nsname).count("-j FORECAST-PRE") == 1

    rules.remove()
    text = _save(nsname)
    assert "FORECAST" not in text
    assert "--dport 22 -j ACCEPT" in text
    rules.remove()  # idempotent


def test_a_bad_rule_changes_nothing(nsname: str) -> None:
    rules = netfilter.Rules(nsname)
    rules.apply([_rule("PREROUTING", ("-d", "10.1.0.129/32"), 2)])
    with pytest.raises(netfilter.NetfilterError, match="iptables-restore"):
        rules.apply(
            [
                _rule("PREROUTING", ("-d", "10.1.0.130/32"), 3),
                _rule("PREROUTING", ("--no-such-option",), 4),
            ]
        )
    current = rules.current()
    assert len(current) == 1 and "10.1.0.129/32" in current[0]  # the commit was all or nothing
    rules.remove()


def test_a_delta_touches_only_what_changed(nsname: str) -> None:
    rules = netfilter.Rules(nsname)
    old = [
        _rule("PREROUTING", ESP, 2),
        _rule("PREROUTING", ("-d", "10.1.0.129/32"), 2),
        _rule("OUTPUT", ("-d", "10.1.0.129/32"), 2),
    ]
    rules.apply(old)
    # Rekey: a new SPI for the same SA; another SA arrives. The delta names three lines.
    rekeyed = _rule("PREROUTING", (*ESP[:-1], "1061112766"), 2)
    new = [rekeyed, old[1], old[2], _rule("OUTPUT", ("-d", "10.1.0.130/32"), 3)]
    delta = netfilter.render_delta(old, new)
    assert delta is not None
    body = [line for line in delta.splitlines() if line.startswith(("-A", "-D"))]
    assert [line[:2] for line in body] == ["-A", "-A", "-D"]  # additions before the removal
    rules.apply(new, known=old)
    current = rules.current()
    assert len(current) == 4
    assert any("--espspi 1061112766" in r for r in current)
    assert not any("--espspi 1061112765" in r for r in current)
    assert rules.signatures() == Counter(map(netfilter.signature, new))
    assert netfilter.render_delta(new, list(reversed(new))) is None  # order alone is no change
    rules.remove()


def test_signatures_see_someone_elses_edit(nsname: str) -> None:
    rules = netfilter.Rules(nsname)
    applied = [_rule("PREROUTING", ("-d", "10.1.0.129/32"), 2)]
    rules.apply(applied)
    assert rules.signatures() == Counter(map(netfilter.signature, applied))
    netns.run(["iptables", "-t", "mangle", "-A", "FORECAST-PRE", "-j", "ACCEPT"], netns=nsname)
    assert rules.signatures() != Counter(map(netfilter.signature, applied))
    rules.remove()


def test_hostile_names_reach_iptables_as_one_harmless_comment(nsname: str) -> None:
    """The real path: a child-updown with quotes, newlines and escapes in its names, through
    the SA table and the desired state, into real iptables-restore (tests/hostile_names.py)."""
    table = SaTable()
    (change,) = table.apply("child-updown", hostile_names.payload(), 1000.0)
    cfg = config.parse({"xfrm": {"if_id": hostile_names.IF_ID}})
    want = desired.compute([change.child], cfg, IPv4Address("10.1.255.255"), {})
    rules = netfilter.Rules(nsname)
    rules.apply(want.rules)
    text = _save(nsname)
    ours = [ln for ln in text.splitlines() if ln.startswith("-A FORECAST-")]
    assert len(ours) == len(want.rules) == 3  # inbound ESP, VIP in PREROUTING and OUTPUT
    # Nothing but our rules was appended anywhere: no "-A INPUT -j DROP", no "-j ACCEPT".
    appended = [ln for ln in text.splitlines() if ln.startswith("-A ")]
    assert all(
        ln.startswith(
            ("-A FORECAST-", "-A PREROUTING -j FORECAST-PRE", "-A OUTPUT -j FORECAST-OUT")
        )
        for ln in appended
    ), appended
    assert all(ln.endswith("/0xffffffff") for ln in ours)
    assert rules.signatures() == Counter(map(netfilter.signature, want.rules))
    rules.remove()
    assert "FORECAST" not in _save(nsname)
