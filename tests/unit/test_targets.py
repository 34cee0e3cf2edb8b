"""Target list order (forecast.targets.arrange) and the netfilter delta: pure, no kernel."""

from __future__ import annotations

import random
from ipaddress import IPv4Network

import pytest

from forecast import rules_iptables
from forecast.desired import MarkRule, RuleMatch
from forecast.targets import arrange

pytestmark = pytest.mark.unit


def test_a_removal_moves_only_the_last_entry() -> None:
    assert arrange([1, 2, 3, 4, 5], [1, 2, 4, 5]) == [1, 2, 5, 4]
    assert arrange([1, 2, 3], [1, 2]) == [1, 2]  # the last one goes: nothing moves


def test_additions_are_appended_lowest_first() -> None:
    assert arrange([7, 3], [3, 7, 9, 1]) == [7, 3, 1, 9]
    assert arrange([], [5, 2, 8]) == [2, 5, 8]


def test_any_change_gives_exactly_the_wanted_set_and_moves_little() -> None:
    rng = random.Random(7)
    current = list(range(1000))
    rng.shuffle(current)
    for _ in range(200):
        wanted = set(current) - set(rng.sample(current, rng.randint(0, 20)))
        wanted |= set(rng.sample(range(1000, 2000), rng.randint(0, 20)))
        out = arrange(current, wanted)
        assert sorted(out) == sorted(wanted) and len(out) == len(set(out))
        stayed = set(current) & wanted
        moved = sum(1 for i, s in enumerate(out) if s in stayed and current[i] != s)
        assert moved <= len(set(current) - wanted)  # at most one move per removal
        current = out


def _rule(chain: str, dst: str, mark: int) -> MarkRule:
    return MarkRule(chain, RuleMatch(dst=IPv4Network(dst)), mark, f"forecast-bpf t #{mark}")


def test_delta_adds_before_it_removes_and_ignores_order() -> None:
    a, b, c = (_rule("PREROUTING", f"10.0.0.{i}/32", i) for i in (1, 2, 3))
    assert rules_iptables.render_delta([a, b], [b, a]) is None
    delta = rules_iptables.render_delta([a, b], [b, c])
    assert delta is not None
    lines = delta.splitlines()
    assert lines[0] == "*mangle" and lines[-1] == "COMMIT"
    assert lines[1].startswith("-A FORECAST-PRE -d 10.0.0.3/32")
    assert lines[2].startswith("-D FORECAST-PRE -d 10.0.0.1/32")
    assert len(lines) == 4


def test_delta_counts_duplicates() -> None:
    a = _rule("OUTPUT", "10.0.0.1/32", 1)
    delta = rules_iptables.render_delta([a, a], [a])
    assert delta is not None and delta.count("-D FORECAST-OUT") == 1
