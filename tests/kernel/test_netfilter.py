"""Our MARK rules against real iptables and real nftables in a namespace, the same tests for
both back ends: accepted, first in mangle, replaced whole, changed by difference, all or
nothing, marking real packets, removed without a trace, and nobody else's rules touched."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from forecast import config, desired, netfilter, rules_iptables
from forecast.desired import MarkRule, RuleMatch
from forecast.sa import SaTable
from forecast_lab import netns
from tests import hostile_names

BACKENDS = ("nftables", "iptables")
GW = IPv4Network("192.168.0.1/32")
ESP = RuleMatch(IPv4Network("192.168.0.11/32"), GW, "esp", spi=1061112765)
NATT = RuleMatch(IPv4Network("192.168.0.12/32"), GW, "udp", sport=4500, dport=4500)


def _vip(last: int) -> RuleMatch:
    return RuleMatch(dst=IPv4Network(f"10.1.0.{last}/32"))


def _vip6(last: int) -> RuleMatch:
    return RuleMatch(dst=IPv6Network(f"fd00:1::{last:x}/128"))


def _rule(chain: str, match: RuleMatch, mark: int) -> MarkRule:
    return MarkRule(chain, match, mark, f"forecast-bpf test {mark}")


def _signatures(rules: list[MarkRule]) -> Counter[tuple[str, str, int]]:
    return Counter(map(netfilter.signature, rules))


def _iptables_save(ns: str) -> str:
    """Both families' mangle tables: the iptables back end writes IPv6 rules with ip6tables."""
    return "".join(
        netns.run([tool, "-t", "mangle"], netns=ns).stdout
        for tool in ("iptables-save", "ip6tables-save")
    )


def _nft_ruleset(ns: str) -> str:
    return netns.run(["nft", "list", "ruleset"], netns=ns).stdout


def _operator_rules(ns: str) -> str:
    """Someone else's rules in both back ends, to be left alone; their nft table's listing."""
    netns.run(
        [
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
        ],
        netns=ns,
    )
    netns.run(["nft", "add", "table", "inet", "operator"], netns=ns)
    netns.run(
        [
            "nft",
            "add chain inet operator pre { type filter hook prerouting priority mangle; }",
        ],
        netns=ns,
    )
    netns.run(["nft", "add rule inet operator pre tcp dport 22 counter accept"], netns=ns)
    return _operator_table(ns)


def _operator_table(ns: str) -> str:
    return netns.run(["nft", "list", "table", "inet", "operator"], netns=ns).stdout


@pytest.fixture(params=BACKENDS)
def rules(request: pytest.FixtureRequest, nsname: str) -> Iterator[netfilter.RuleSet]:
    ruleset = netfilter.choose(str(request.param), nsname)
    yield ruleset
    ruleset.remove()


def test_auto_follows_what_the_host_uses(nsname: str) -> None:
    variant = rules_iptables.variant(nsname)
    assert netfilter.resolve("auto", nsname) == ("iptables" if variant == "legacy" else "nftables")
    with pytest.raises(netfilter.NetfilterError, match="'ipfw' is not one of"):
        netfilter.resolve("ipfw", nsname)


def test_apply_replace_remove(rules: netfilter.RuleSet, nsname: str) -> None:
    theirs = _operator_rules(nsname)
    want = [
        _rule("PREROUTING", ESP, 2),
        _rule("PREROUTING", NATT, 3),
        _rule("PREROUTING", _vip(129), 2),
        _rule("OUTPUT", _vip(129), 2),
        # a dual-stack client's IPv6 virtual IP
        _rule("PREROUTING", _vip6(0x81), 2),
        _rule("OUTPUT", _vip6(0x81), 2),
    ]
    rules.apply(want)
    assert rules.hooked() and rules.present()
    assert rules.signatures() == _signatures(want)
    current = rules.current()
    assert len(current) == 6
    if rules.name == "iptables":
        pre = [ln for ln in _iptables_save(nsname).splitlines() if ln.startswith("-A PREROUTING")]
        assert pre[0] == "-A PREROUTING -j FORECAST-PRE"  # first: marks before anything else
        assert any("--espspi 1061112765" in r and "0x2/0xffffffff" in r for r in current)
        v6 = netns.run(["ip6tables-save", "-t", "mangle"], netns=nsname).stdout
        assert "-A FORECAST-PRE -d fd00:1::81/128" in v6 and "-A OUTPUT -j FORECAST-OUT" in v6
        assert "fd00" not in netns.run(["iptables-save", "-t", "mangle"], netns=nsname).stdout
    else:
        # Before iptables' mangle (-150) and any other mangle chain.
        assert "type filter hook prerouting priority mangle - 1;" in _nft_ruleset(nsname)
        assert any("esp spi 1061112765 meta mark set 0x00000002" in r for r in current)
        assert any("udp sport 4500 udp dport 4500 meta mark set 0x00000003" in r for r in current)
        assert any("ip6 daddr fd00:1::81 meta mark set 0x00000002" in r for r in current)

    # A second whole apply replaces the contents and does not hook twice.
    rules.apply([_rule("PREROUTING", _vip(130), 3)])
    current = rules.current()
    assert len(current) == 1 and "10.1.0.130" in current[0]
    # one jump per family (iptables and ip6tables)
    assert _iptables_save(nsname).count("-j FORECAST-PRE") == 2 * (rules.name == "iptables")
    assert _nft_ruleset(nsname).count("table inet forecast_bpf") == (rules.name == "nftables")

    rules.remove()
    assert not rules.present() and rules.current() == []
    assert "FORECAST" not in _iptables_save(nsname)
    assert "forecast_bpf" not in _nft_ruleset(nsname)
    assert "--dport 22 -j ACCEPT" in _iptables_save(nsname)
    assert _operator_table(nsname) == theirs
    rules.remove()  # idempotent


def test_a_rejected_rule_changes_nothing(rules: netfilter.RuleSet) -> None:
    rules.apply([_rule("PREROUTING", _vip(129), 2)])
    bad_port = RuleMatch(IPv4Network("192.168.0.13/32"), GW, "udp", sport=-1, dport=4500)
    with pytest.raises(netfilter.NetfilterError, match=r"iptables-restore|nft"):
        rules.apply([_rule("PREROUTING", _vip(130), 3), _rule("PREROUTING", bad_port, 4)])
    current = rules.current()
    assert len(current) == 1 and "10.1.0.129" in current[0]  # the commit was all or nothing
    # The same within a difference.
    held = [_rule("PREROUTING", _vip(129), 2)]
    with pytest.raises(netfilter.NetfilterError):
        rules.apply([*held, _rule("OUTPUT", _vip(131), 5), _rule("OUTPUT", bad_port, 6)], held)
    assert rules.signatures() == _signatures(held)


def test_a_delta_touches_only_what_changed(rules: netfilter.RuleSet, nsname: str) -> None:
    old = [
        _rule("PREROUTING", ESP, 2),
        _rule("PREROUTING", _vip(129), 2),
        _rule("OUTPUT", _vip(129), 2),
    ]
    rules.apply(old)
    handles_before = _nft_handles(nsname)
    # Rekey: a new SPI for the same SA; another SA arrives.
    rekeyed = _rule("PREROUTING", RuleMatch(ESP.src, ESP.dst, "esp", spi=1061112766), 2)
    new = [rekeyed, old[1], old[2], _rule("OUTPUT", _vip(130), 3)]
    if rules.name == "iptables":
        delta = rules_iptables.render_delta(old, new)
        assert delta is not None
        body = [line for line in delta.splitlines() if line.startswith(("-A", "-D"))]
        assert [line[:2] for line in body] == ["-A", "-A", "-D"]  # additions before the removal
        assert rules_iptables.render_delta(new, list(reversed(new))) is None  # order is no change
    rules.apply(new, known=old)
    current = rules.current()
    assert len(current) == 4
    assert any("1061112766" in r for r in current)
    assert not any("1061112765" in r for r in current)
    assert rules.signatures() == _signatures(new)
    if rules.name == "nftables":
        # The untouched rules are the same rule objects (handles): nothing was rewritten.
        after = _nft_handles(nsname)
        kept = {k: v for k, v in handles_before.items() if "1061112765" not in k}
        assert all(after.get(k) == v for k, v in kept.items()), (handles_before, after)
    rules.apply(list(reversed(new)), known=new)  # order alone: nothing sent
    assert rules.signatures() == _signatures(new)
    # The same rule twice (two SAs to one address for a moment) is held, and removed, twice.
    twice = [*new, old[1]]
    rules.apply(twice, known=new)
    assert rules.signatures() == _signatures(twice)
    rules.apply(new, known=twice)
    assert rules.signatures() == _signatures(new)


def _nft_handles(ns: str) -> dict[str, int]:
    proc = netns.run(["nft", "-j", "list", "table", "inet", "forecast_bpf"], netns=ns, check=False)
    if proc.returncode != 0:
        return {}
    items = json.loads(proc.stdout)["nftables"]
    return {
        json.dumps(i["rule"]["expr"], sort_keys=True): i["rule"]["handle"]
        for i in items
        if "rule" in i
    }


def test_signatures_see_someone_elses_edit(rules: netfilter.RuleSet, nsname: str) -> None:
    applied = [_rule("PREROUTING", _vip(129), 2)]
    rules.apply(applied)
    assert rules.signatures() == _signatures(applied) and rules.holds(_signatures(applied))
    if rules.name == "iptables":
        netns.run(["iptables", "-t", "mangle", "-A", "FORECAST-PRE", "-j", "ACCEPT"], netns=nsname)
    else:
        netns.run(["nft", "add rule inet forecast_bpf prerouting accept"], netns=nsname)
    assert rules.signatures() != _signatures(applied)
    assert not rules.holds(_signatures(applied))
    rules.apply(applied)  # a whole write repairs it
    assert rules.signatures() == _signatures(applied) and rules.holds(_signatures(applied))
    # A hook that lost our chain is seen too.
    if rules.name == "iptables":
        netns.run(["iptables", "-t", "mangle", "-D", "OUTPUT", "-j", "FORECAST-OUT"], netns=nsname)
    else:
        netns.run(["nft", "delete chain inet forecast_bpf output"], netns=nsname)
    assert not rules.hooked() and not rules.holds(_signatures(applied))
    rules.apply(applied)
    assert rules.hooked() and rules.holds(_signatures(applied))


def test_marks_reach_real_packets(rules: netfilter.RuleSet, nsname: str) -> None:
    """What the gateway itself sends to a client's address carries the client's mark: counted
    after routing by a witness table of our own making, for either back end."""
    netns.add_veth("lan0", nsname, "lan0p", nsname)
    netns.run(["ip", "addr", "add", "10.1.0.1/24", "dev", "lan0"], netns=nsname)
    for dev in ("lan0", "lan0p"):
        netns.run(["ip", "link", "set", dev, "up"], netns=nsname)
    netns.run(
        ["ip", "neigh", "add", "10.1.0.129", "lladdr", "02:00:00:00:01:29", "dev", "lan0"],
        netns=nsname,
    )
    netns.run(["nft", "add", "table", "ip", "witness"], netns=nsname)
    netns.run(
        ["nft", "add chain ip witness post { type filter hook postrouting priority 300; }"],
        netns=nsname,
    )
    for mark in (0, 7):
        netns.run(
            ["nft", f"add rule ip witness post ip daddr 10.1.0.129 meta mark {mark} counter"],
            netns=nsname,
        )
    rules.apply([_rule("OUTPUT", _vip(129), 7)])
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(5): s.sendto(b'x', ('10.1.0.129', 5353))"
    )
    netns.run([sys.executable, "-c", send], netns=nsname)
    listing = netns.run(["nft", "list", "table", "ip", "witness"], netns=nsname).stdout
    assert "meta mark 0x00000007 counter packets 5 " in listing, listing
    assert "meta mark 0x00000000 counter packets 0 " in listing, listing


def test_switching_back_ends_leaves_nothing_behind(nsname: str) -> None:
    theirs = _operator_rules(nsname)
    want = [_rule("PREROUTING", _vip(129), 2), _rule("OUTPUT", _vip(129), 2)]
    first = netfilter.choose("iptables", nsname)
    first.apply(want)
    second = netfilter.choose("nftables", nsname)
    second.apply(want)
    (other,) = netfilter.others(second, nsname)
    assert other.name == "iptables" and other.present()
    other.remove()
    assert "FORECAST" not in _iptables_save(nsname) and second.signatures() == _signatures(want)
    first.apply(want)
    assert sorted(netfilter.remove_all(nsname)) == [
        f"MARK rules ({first.detail})",
        f"MARK rules ({second.detail})",
    ]
    assert "FORECAST" not in _iptables_save(nsname)
    assert "forecast_bpf" not in _nft_ruleset(nsname)
    assert _operator_table(nsname) == theirs
    assert netfilter.remove_all(nsname) == []


def test_hostile_names_reach_either_back_end_as_one_harmless_comment(
    rules: netfilter.RuleSet, nsname: str
) -> None:
    """The real path: a child-updown with quotes, newlines and escapes in its names, through
    the SA table and the desired state, into real iptables-restore or nft
    (tests/hostile_names.py)."""
    table = SaTable()
    (change,) = table.apply("child-updown", hostile_names.payload(), 1000.0)
    cfg = config.parse({"xfrm": {"if_id": hostile_names.IF_ID}})
    want = desired.compute([change.child], cfg, IPv4Address("10.1.255.255"), {})
    rules.apply(want.rules)
    assert len(rules.current()) == len(want.rules) == 3  # inbound ESP, VIP in both hooks
    assert rules.signatures() == _signatures(want.rules)
    # Nothing but our rules was added anywhere: no "-A INPUT -j DROP", no "accept".
    appended = [ln for ln in _iptables_save(nsname).splitlines() if ln.startswith("-A ")]
    assert all(
        ln.startswith(
            (
                "-A FORECAST-",
                "-A PREROUTING -j FORECAST-PRE",
                "-A OUTPUT -j FORECAST-OUT",
                "-A POSTROUTING -j FORECAST-POST",
            )
        )
        for ln in appended
    ), appended
    tables = {ln for ln in _nft_ruleset(nsname).splitlines() if ln.startswith("table ")}
    assert tables <= {"table ip mangle {", "table ip6 mangle {", "table inet forecast_bpf {"}, (
        tables
    )
    rules.remove()
    assert "FORECAST" not in _iptables_save(nsname)
    assert "forecast_bpf" not in _nft_ruleset(nsname)
