"""The MARK rules the marked policies need, in one of two back ends.

- `nftables`: forecast-bpf's own table (forecast/rules_nft.py);
- `iptables`: forecast-bpf's own chains in the mangle table (forecast/rules_iptables.py),
  through whichever `iptables` the host has (nf_tables or legacy).

`auto` (the default) follows what the host uses: nftables where `nft` is installed and
`iptables` is not the legacy variant, iptables otherwise. Only one back end holds rules: a
start removes what the other one left (a switch of back end, an upgrade), after ours are in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

from forecast import rules_iptables, rules_nft
from forecast.config import NETFILTER_BACKENDS as BACKENDS
from forecast.desired import MarkRule
from forecast.nf_exec import NetfilterError, Signature, installed

__all__ = ["BACKENDS", "NetfilterError", "RuleSet", "choose", "remove_all", "signature"]


class RuleSet(Protocol):
    name: str  # "nftables" or "iptables"
    detail: str  # for the log: the variant and where our rules live

    def present(self) -> bool: ...
    def hooked(self) -> bool: ...
    def apply(self, rules: Iterable[MarkRule], known: Sequence[MarkRule] | None = None) -> None: ...
    def current(self) -> list[str]: ...
    def signatures(self) -> Counter[Signature]: ...
    def holds(self, expected: Counter[Signature]) -> bool: ...
    def remove(self) -> None: ...


def signature(rule: MarkRule) -> Signature:
    """What identifies a rule of ours in either back end's listing."""
    return (rule.chain, rule.comment, rule.mark)


TOOLS = {"nftables": rules_nft.NFT, "iptables": rules_iptables.IPTABLES}


def resolve(kind: str, netns: str | None = None) -> str:
    """The back end `kind` means on this host: `auto` becomes nftables or iptables."""
    if kind not in BACKENDS:
        raise NetfilterError(f"netfilter back end {kind!r} is not one of {', '.join(BACKENDS)}")
    if kind != "auto":
        return kind
    if not installed(TOOLS["nftables"]):
        return "iptables"
    if installed(TOOLS["iptables"]) and rules_iptables.variant(netns) == "legacy":
        return "iptables"
    return "nftables"


def _make(kind: str, netns: str | None) -> RuleSet:
    if kind == "nftables":
        return rules_nft.NftRules(netns)
    return rules_iptables.IptablesRules(netns)


def choose(kind: str, netns: str | None = None) -> RuleSet:
    return _make(resolve(kind, netns), netns)


def _installed(netns: str | None, but: str = "") -> list[RuleSet]:
    """A rule set of every back end whose tool this host has (but the one named `but`: making
    one runs its tool, a process worth saving at every start)."""
    return [_make(kind, netns) for kind, tool in TOOLS.items() if kind != but and installed(tool)]


def others(chosen: RuleSet, netns: str | None = None) -> list[RuleSet]:
    """The back ends other than `chosen` that this host has, to clear what they hold."""
    return _installed(netns, but=chosen.name)


def holding(netns: str | None = None) -> list[RuleSet]:
    """Every back end on this host that holds rules of ours (to check nothing is left)."""
    return [rules for rules in _installed(netns) if rules.present()]


def remove_all(netns: str | None = None) -> list[str]:
    """Remove our rules from every back end the host has; what was removed, for the log."""
    removed = []
    for rules in holding(netns):
        rules.remove()
        removed.append(f"MARK rules ({rules.detail})")
    return removed
