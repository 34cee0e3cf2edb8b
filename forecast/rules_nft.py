"""The nftables back end: MARK rules in forecast-bpf's own table, `inet forecast_bpf`.

Each change is one `nft -j -f` transaction, JSON on stdin (nftables commits a batch atomically:
packets see the old rules or the new, never half). A full write replaces the whole table in one
batch; an SA event adds and deletes single rules by handle, additions first. Handles come from
nft's echo of what it added. Nothing else is ever touched: other tables (iptables-nft's
included) are other writers', and removing ours is one `delete table`.

Chains: `prerouting` (filter) and `output` (type route: a mark set there reroutes the packet, as
iptables' mangle OUTPUT does), both at priority mangle - 1, so our marks are set before any
other mangle rule looks at the packet, as the plugin's rules inserted first in mangle are;
`postrouting` (filter) holds the local-output path's guards (desired.MarkRule).
The input is JSON, so no name ever passes through nft's parser as syntax.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from forecast.desired import MarkRule, RuleMatch
from forecast.nf_exec import NetfilterError, Signature
from forecast.nf_exec import run as _run

FAMILY, TABLE = "inet", "forecast_bpf"
PRIORITY = -151  # mangle - 1
CHAINS = {"PREROUTING": "prerouting", "OUTPUT": "output", "POSTROUTING": "postrouting"}
HOOK_OF = {chain: hook for hook, chain in CHAINS.items()}
CHAIN_TYPE = {"prerouting": "filter", "output": "route", "postrouting": "filter"}
# A guard (desired.MarkRule): multicast/broadcast leaving without IPsec, with the mark, dropped.
GUARD_MATCH: list[dict[str, Any]] = [
    {"match": {"op": "==", "left": {"rt": {"key": "ipsec"}}, "right": False}},
    {
        "match": {
            "op": "==",
            "left": {"fib": {"result": "type", "flags": ["daddr"]}},
            "right": {"set": ["broadcast", "multicast"]},
        }
    },
]
NFT = "nft"
# nft reads `-f -` from /dev/stdin, which a minimal /dev (an initramfs, a container) may lack.
STDIN = "/proc/self/fd/0"


def _address(net: IPv4Network | IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _eq(protocol: str, field: str, right: Any) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": protocol, "field": field}},
            "right": right,
        }
    }


def render_match(m: RuleMatch) -> list[dict[str, Any]]:
    expr: list[dict[str, Any]] = []
    # The table is `inet`: the address match names the family (and so matches only it).
    if m.src is not None:
        expr.append(_eq("ip" if m.src.version == 4 else "ip6", "saddr", _address(m.src)))
    if m.dst is not None:
        expr.append(_eq("ip" if m.dst.version == 4 else "ip6", "daddr", _address(m.dst)))
    if m.proto == "esp":
        expr.append(_eq("esp", "spi", m.spi))
    elif m.proto == "udp":
        expr += [_eq("udp", "sport", m.sport), _eq("udp", "dport", m.dport)]
    elif m.proto is not None:
        raise NetfilterError(f"no nftables spelling for protocol {m.proto!r}")
    return expr


def _rule_object(rule: MarkRule) -> dict[str, Any]:
    if rule.action == "drop":
        expr = [
            {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": rule.mark}},
            *GUARD_MATCH,
            {"counter": None},  # what a guard dropped shows in `nft list`
            {"drop": None},
        ]
    else:
        expr = [
            *render_match(rule.match),
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": rule.mark}},
        ]
    return {
        "family": FAMILY,
        "table": TABLE,
        "chain": CHAINS[rule.chain],
        "comment": rule.comment,
        "expr": expr,
    }


def _chain_object(name: str) -> dict[str, Any]:
    return {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": CHAIN_TYPE[name],
        "hook": name,
        "prio": PRIORITY,
        "policy": "accept",
    }


def render(rules: Iterable[MarkRule]) -> list[dict[str, Any]]:
    """The whole table, replacing whatever is there (the add before the delete makes the
    delete succeed when there is none)."""
    table = {"family": FAMILY, "name": TABLE}
    return [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        *({"add": {"chain": _chain_object(name)}} for name in CHAINS.values()),
        *({"add": {"rule": _rule_object(r)}} for r in rules),
    ]


def _guard_signature(rule: dict[str, Any]) -> Signature | None:
    """(hook, comment, mark) of a listed guard rule, None for any other rule."""
    expr = rule.get("expr") or []
    hook = HOOK_OF.get(rule.get("chain", ""))
    if len(expr) != 5 or hook is None or "comment" not in rule or expr[-1] != {"drop": None}:
        return None
    first = expr[0].get("match") if isinstance(expr[0], dict) else None
    if (
        not isinstance(first, dict)
        or first.get("left") != {"meta": {"key": "mark"}}
        or not isinstance(first.get("right"), int)
        or expr[1:3] != GUARD_MATCH
    ):
        return None
    return (hook, str(rule["comment"]), int(first["right"]))


def _signature_of(rule: dict[str, Any]) -> Signature:
    """(hook, comment, mark) of a listed rule; a rule of another shape is someone else's."""
    guard = _guard_signature(rule)
    if guard is not None:
        return guard
    expr = rule.get("expr") or []
    last = expr[-1].get("mangle") if expr and isinstance(expr[-1], dict) else None
    hook = HOOK_OF.get(rule.get("chain", ""))
    if (
        hook is None
        or not isinstance(last, dict)
        or last.get("key") != {"meta": {"key": "mark"}}
        or not isinstance(last.get("value"), int)
        or "comment" not in rule
    ):
        return ("?", json.dumps(rule, sort_keys=True), 0)
    return (hook, str(rule["comment"]), int(last["value"]))


def _signatures_in(listing: list[dict[str, Any]]) -> Counter[Signature]:
    return Counter(_signature_of(item["rule"]) for item in listing if "rule" in item)


def _hooked_in(listing: list[dict[str, Any]]) -> bool:
    chains = {item["chain"]["name"]: item["chain"] for item in listing if "chain" in item}
    return all(
        name in chains
        and {k: chains[name].get(k) for k in ("type", "hook", "prio")}
        == {k: _chain_object(name)[k] for k in ("type", "hook", "prio")}
        for name in CHAINS.values()
    )


class NftRules:
    """Our table in one network namespace (None: the caller's)."""

    name = "nftables"
    detail = f"nftables, table {FAMILY} {TABLE}"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._run([NFT, "--version"])
        # handle of every rule we added and still hold, per rule (a rule may be there twice)
        self._handles: dict[MarkRule, list[int]] = {}

    def _run(self, argv: list[str], batch: list[dict[str, Any]] | None = None) -> str:
        text = json.dumps({"nftables": batch}) if batch is not None else None
        return _run(argv, self.netns, text).stdout

    def _listing(self) -> list[dict[str, Any]] | None:
        proc = _run([NFT, "-j", "list", "table", FAMILY, TABLE], self.netns, check=False)
        if proc.returncode != 0:
            return None  # no such table
        try:
            items = json.loads(proc.stdout)["nftables"]
        except (ValueError, KeyError, TypeError) as exc:
            raise NetfilterError(f"nft -j list table {FAMILY} {TABLE}: {exc}") from None
        return [item for item in items if isinstance(item, dict)]

    def _commit(self, batch: list[dict[str, Any]], added: Sequence[MarkRule]) -> None:
        if not added:
            # The echo makes nft read our whole table first (about 170 ms at 12,000 rules):
            # asked for only when there are handles to learn.
            self._run([NFT, "-j", "-f", STDIN], batch)
            return
        out = self._run([NFT, "-j", "-e", "-a", "-f", STDIN], batch)
        echoed = [
            item["add"]["rule"]
            for item in (json.loads(out)["nftables"] if out.strip() else [])
            if "rule" in item.get("add", {})
        ]
        if len(echoed) != len(added):
            raise NetfilterError(f"nft echoed {len(echoed)} rules for {len(added)} added")
        for rule, obj in zip(added, echoed, strict=True):
            if _signature_of(obj) != (rule.chain, rule.comment, rule.mark):
                raise NetfilterError(f"nft echoed {obj!r} for {rule!r}")
            self._handles.setdefault(rule, []).append(int(obj["handle"]))

    def present(self) -> bool:
        # The table names only: listing the table itself costs a parse of every rule.
        out = _run([NFT, "list", "tables", FAMILY], self.netns, check=False).stdout
        return f"table {FAMILY} {TABLE}" in out.splitlines()

    def hooked(self) -> bool:
        """Are both our chains there, on their hooks, at our priority?"""
        return _hooked_in(self._listing() or [])

    def apply(self, rules: Iterable[MarkRule], known: Sequence[MarkRule] | None = None) -> None:
        """Make our table hold `rules` in one transaction. `known`: what it holds now, when
        certain; then only the difference is sent."""
        rules = list(rules)
        if known is not None:
            before, after = Counter(known), Counter(rules)
            added, gone = list((after - before).elements()), list((before - after).elements())
            handles = {r: list(self._handles.get(r, [])) for r in set(gone)}
            if all(len(handles[r]) >= n for r, n in Counter(gone).items()):
                if not added and not gone:
                    return
                deletions = []
                for r in gone:
                    handle = handles[r].pop()
                    deletions.append(
                        {
                            "delete": {
                                "rule": {
                                    "family": FAMILY,
                                    "table": TABLE,
                                    "chain": CHAINS[r.chain],
                                    "handle": handle,
                                }
                            }
                        }
                    )
                self._commit(
                    [*({"add": {"rule": _rule_object(r)}} for r in added), *deletions], added
                )
                for r in set(gone):
                    self._handles[r] = handles[r]
                    if not handles[r]:
                        del self._handles[r]
                return
            # A rule we hold without its handle (another process wrote it): write it all.
        self._handles = {}
        self._commit(render(rules), rules)

    def current(self) -> list[str]:
        """Our table's rules as `nft list` prints them, chain first (for status and tests)."""
        proc = _run([NFT, "list", "table", FAMILY, TABLE], self.netns, check=False)
        out, chain = [], ""
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            words = line.split()
            if words[:1] == ["chain"]:
                chain = words[1]
            elif words and not line.strip().startswith(("type ", "}", "table ")):
                out.append(f"{chain} {line.strip()}")
        return out

    def signatures(self) -> Counter[Signature]:
        """Our table's rules as (hook, comment, mark), to compare with what was applied."""
        return _signatures_in(self._listing() or [])

    def holds(self, expected: Counter[Signature]) -> bool:
        """Exactly these rules, in chains on their hooks: one listing for both questions (at
        thousands of rules, reading the table is most of the daemon's resync)."""
        listing = self._listing() or []
        return _signatures_in(listing) == expected and _hooked_in(listing)

    def remove(self) -> None:
        """Delete our table: every rule and chain of ours at once, nothing else touched."""
        if self.present():
            self._run([NFT, "delete", "table", FAMILY, TABLE])
        self._handles = {}
