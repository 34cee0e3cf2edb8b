"""SA table + config → the kernel state forecast-bpf wants. Pure: no I/O, no clock.

Nothing here knows about VICI, and nothing here touches the kernel (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from forecast import layout
from forecast.config import Config
from forecast.datapath import Network, SaEntry
from forecast.sa import ChildSa

MULTICAST = IPv4Network("224.0.0.0/4")
MULTICAST6 = IPv6Network("ff00::/8")
CACHE_SIZE = 2 * layout.FC_MAX_SAS  # two children per slot while a rekey settles
LIMITED_BROADCAST = IPv4Address("255.255.255.255")


@dataclass(frozen=True)
class RuleMatch:
    """What a MARK rule matches, all of the fields that are set; each netfilter back end
    spells it its own way (forecast/rules_iptables.py, forecast/rules_nft.py)."""

    src: Network | None = None  # src and dst, when both set, of one family
    dst: Network | None = None
    proto: str | None = None  # "esp" (with spi) or "udp" (with both ports)
    spi: int | None = None
    sport: int | None = None
    dport: int | None = None


@dataclass(frozen=True)
class MarkRule:
    """One rule of ours: `chain` is the hook. A MARK rule (PREROUTING, OUTPUT) sets `mark` on
    what `match` matches; a guard (POSTROUTING, action "drop") drops multicast and broadcast
    that carry `mark` and leave without IPsec, so a local-output copy whose SA just went is
    never sent in clear."""

    chain: str
    match: RuleMatch
    mark: int
    comment: str
    action: str = "mark"  # or "drop": a guard


@dataclass(frozen=True)
class SlotState:
    slot: int
    entry: SaEntry
    children: tuple[ChildSa, ...]  # newest first; more than one while a rekey settles


@dataclass
class Desired:
    slots: dict[int, SlotState] = field(default_factory=dict)
    rules: list[MarkRule] = field(default_factory=list)
    routes: list[Network] = field(default_factory=list)
    # outbound marks whose copies go through the local output path (each has its guard rule)
    local_out_marks: set[int] = field(default_factory=set)
    # child unique id → why forecast-bpf leaves it alone (logged once, shown by `check`)
    ignored: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # marks that got no slot only because the free ones are still being cleared: the next
    # reconcile (at once) gives them one
    waiting: list[int] = field(default_factory=list)
    # marks of SAs the full table has no slot for (the newest beyond FC_MAX_SAS)
    left_out: list[int] = field(default_factory=list)


def forwards_to(ts: Network, lan_broadcast: IPv4Address | None) -> bool:
    """Can a multicast or broadcast destination fall inside this selector?"""
    if isinstance(ts, IPv6Network):
        return ts.overlaps(MULTICAST6)  # IPv6 has no broadcast
    return (
        ts.overlaps(MULTICAST)
        or LIMITED_BROADCAST in ts
        or (lan_broadcast is not None and lan_broadcast in ts)
    )


def is_multicast(ts: Network) -> bool:
    return ts.subnet_of(MULTICAST6) if isinstance(ts, IPv6Network) else ts.subnet_of(MULTICAST)


# The per-child derivations below are cached: at thousands of SAs an event recomputes the
# desired state of all of them, and all but the changed ones give the same answer.
@lru_cache(maxsize=CACHE_SIZE)
def unicast_selectors(child: ChildSa, lan_broadcast: IPv4Address | None) -> tuple[Network, ...]:
    """Remote selectors that get MARK rules and routes: not multicast, not a broadcast /32,
    never /0 (the plugin shifts by 32 there: undefined; here it would capture everything)."""
    out = []
    for ts in child.remote_ts:
        if ts.prefixlen == 0 or is_multicast(ts):
            continue
        if ts.prefixlen == 32 and ts.network_address in (LIMITED_BROADCAST, lan_broadcast):
            continue
        out.append(ts)
    return tuple(out)


@lru_cache(maxsize=CACHE_SIZE)
def forwarded_selectors(child: ChildSa, lan_broadcast: IPv4Address | None) -> tuple[Network, ...]:
    """Remote selectors a multicast or broadcast copy can be sent into."""
    return tuple(ts for ts in child.remote_ts if forwards_to(ts, lan_broadcast))


PATH_XFRM = "xfrm"  # clones to the XFRM interface (if_id_in = if_id_out = the interface's)
PATH_LOCAL_OUT = "local-out"  # mark-only: the daemon's raw socket with the SA's mark


def is_mark_only(child: ChildSa) -> bool:
    """The plugin's configuration: unique marks and no if_id at all."""
    return child.if_id_in == 0 and child.if_id_out == 0


def path_of(child: ChildSa, cfg: Config) -> str | None:
    """How this child's copies are sent, or None when it is not served (what_is_missing)."""
    if not child.marked:
        return None
    if child.if_id_in == cfg.xfrm.if_id and child.if_id_out == cfg.xfrm.if_id:
        return PATH_XFRM
    if is_mark_only(child) and cfg.mark_only_sas == PATH_LOCAL_OUT:
        return PATH_LOCAL_OUT
    return None


def what_is_missing(child: ChildSa, cfg: Config) -> list[str]:
    """What keeps forecast-bpf from serving this child, each with what to set (the daemon's
    log and `status` give them as why it is ignored, `check` lists them)."""
    missing = []
    if not child.marked:
        missing.append("no unique mark (set mark_in = mark_out = %unique, or mark = %unique)")
    if path_of(child, cfg) is None and (
        child.if_id_in != cfg.xfrm.if_id or child.if_id_out != cfg.xfrm.if_id
    ):
        if is_mark_only(child):
            missing.append(
                f"no if_id and mark_only_sas is {cfg.mark_only_sas!r} (set "
                f"if_id_in = if_id_out = {cfg.xfrm.if_id}, or mark_only_sas: local-out)"
            )
        else:
            missing.append(
                f"if_id in/out {child.if_id_in}/{child.if_id_out}, the XFRM interface has "
                f"{cfg.xfrm.if_id} (set if_id_in = if_id_out = {cfg.xfrm.if_id})"
            )
    return missing


def path_notes(child: ChildSa, cfg: Config) -> list[str]:
    """What an operator should know about a served child's path (`check`)."""
    if path_of(child, cfg) != PATH_LOCAL_OUT:
        return []
    notes = [
        "served by the local output path (mark only, as the plugin): each copy costs the "
        f"daemon a send; if_id_in = if_id_out = {cfg.xfrm.if_id} moves it to the faster "
        "XFRM-interface path"
    ]
    if any(ts.version == 6 and forwards_to(ts, None) for ts in child.remote_ts):
        notes.append(
            "IPv6 multicast is not forwarded on the local output path (set "
            f"if_id_in = if_id_out = {cfg.xfrm.if_id} for IPv6)"
        )
    return notes


def why_ignored(child: ChildSa, cfg: Config) -> str | None:
    return "; ".join(what_is_missing(child, cfg)) or None


def assign_slots(
    marks: list[int], previous: Mapping[int, int], busy: Set[int] = frozenset()
) -> tuple[dict[int, int], list[int]]:
    """Stable slots by inbound mark: an SA keeps its slot (and counters) across rekeys and
    daemon restarts; new marks take the lowest free slot. `busy`: slots the kernel still holds
    for an SA that is going; never reused in the same step, or a packet walking the old list
    could read a slot half-way between two SAs. Returns (mark → slot, left out)."""
    out: dict[int, int] = {}
    for mark in marks:
        if mark in previous and 0 <= previous[mark] < layout.FC_MAX_SAS:
            out[mark] = previous[mark]
    used = set(out.values()) | set(busy)
    free = (s for s in range(layout.FC_MAX_SAS) if s not in used)
    left_out = []
    for mark in marks:
        if mark in out:
            continue
        slot = next(free, None)
        if slot is None:
            left_out.append(mark)
        else:
            out[mark] = slot
    return out, left_out


def _rule_safe(text: str, limit: int) -> str:
    """What of a name may stand in a rule comment: ASCII letters, digits and a few marks.
    A quote or a newline here would end the comment inside an iptables-restore line."""
    return "".join(c for c in text if c.isascii() and (c.isalnum() or c in "@.-_:+=,"))[:limit]


@lru_cache(maxsize=CACHE_SIZE)
def _comment(child: ChildSa) -> str:
    # At most 13 + 32 + 1 + 32 + 12 + 32 characters: below nftables' 128 (iptables: 255).
    ike, name = _rule_safe(child.ike_name, 32), _rule_safe(child.child_name, 32)
    return f"forecast-bpf {ike}/{name} #{child.unique_id} {_rule_safe(child.remote_id, 32)}"


@lru_cache(maxsize=CACHE_SIZE)
def _inbound_rule(child: ChildSa) -> MarkRule | None:
    if child.remote_host is None or child.local_host is None:
        return None
    peer, local = IPv4Network(child.remote_host), IPv4Network(child.local_host)
    if child.encap:
        match = RuleMatch(peer, local, "udp", sport=child.remote_port, dport=child.local_port)
    else:
        match = RuleMatch(peer, local, "esp", spi=child.spi_in)
    return MarkRule("PREROUTING", match, child.mark_in, _comment(child))


@lru_cache(maxsize=CACHE_SIZE)
def _guard_rule(child: ChildSa) -> MarkRule:
    return MarkRule("POSTROUTING", RuleMatch(), child.mark_out, _comment(child), action="drop")


@lru_cache(maxsize=CACHE_SIZE)
def _unicast_rules(child: ChildSa, lan_broadcast: IPv4Address | None) -> tuple[MarkRule, ...]:
    """Traffic to the client's unicast selectors gets its outbound mark, whether forwarded
    (PREROUTING) or from the gateway itself (OUTPUT)."""
    return tuple(
        MarkRule(hook, RuleMatch(dst=ts), child.mark_out, _comment(child))
        for ts in unicast_selectors(child, lan_broadcast)
        for hook in ("PREROUTING", "OUTPUT")
    )


def compute(
    children: list[ChildSa],
    cfg: Config,
    lan_broadcast: IPv4Address | None,
    previous_slots: Mapping[int, int],
    busy_slots: Set[int] = frozenset(),
) -> Desired:
    desired = Desired()
    by_mark: dict[int, list[ChildSa]] = {}
    for child in children:
        reason = why_ignored(child, cfg)
        if reason:
            desired.ignored[child.unique_id] = reason
        else:
            by_mark.setdefault(child.mark_in, []).append(child)
    slots, left_out = assign_slots(sorted(by_mark), previous_slots, busy_slots)
    if len(by_mark) > layout.FC_MAX_SAS:
        desired.left_out = left_out
        for mark in left_out:
            desired.warnings.append(
                f"SA table full ({layout.FC_MAX_SAS} SAs): mark {mark:#x} gets no forwarding"
            )
    else:
        desired.waiting = left_out
    # a MARK rule once per (hook, match); a guard once per mark
    seen_rules: set[tuple[str, RuleMatch, int]] = set()
    routed: set[Network] = set()

    def add_rule(rule: MarkRule | None) -> None:
        if rule is None:
            return
        key = (rule.chain, rule.match, rule.mark if rule.action == "drop" else 0)
        if key not in seen_rules:
            seen_rules.add(key)
            desired.rules.append(rule)

    for mark in sorted(by_mark):
        # Newest first: a settled child before the one it replaced.
        group = sorted(by_mark[mark], key=lambda c: (c.retire_at is not None, -c.unique_id))
        current = group[0]
        local_out = path_of(current, cfg) == PATH_LOCAL_OUT
        for child in group:
            add_rule(_inbound_rule(child))
        if local_out:
            # Before the slot is listed, and removed only after the last copy with this mark
            # (forecast/local_out.py): a copy whose SA just went is dropped, not sent in clear.
            add_rule(_guard_rule(current))
            desired.local_out_marks.add(current.mark_out)
        if current.retire_at is None:
            for rule in _unicast_rules(current, lan_broadcast):
                add_rule(rule)
            # charon routes a mark-only child's selectors itself (it has no if_id)
            for ts in () if local_out else unicast_selectors(current, lan_broadcast):
                if ts not in routed:
                    routed.add(ts)
                    desired.routes.append(ts)
        if mark not in slots:
            continue
        selectors: list[Network] = []
        # the local output path sends IPv4 only
        for version in (4,) if local_out else (4, 6):
            mine = [
                ts for ts in forwarded_selectors(current, lan_broadcast) if ts.version == version
            ]
            if len(mine) > layout.FC_MAX_TS:
                desired.warnings.append(
                    f"{current.label}: {len(mine)} IPv{version} multicast/broadcast "
                    f"selectors, only the first {layout.FC_MAX_TS} forwarded"
                )
            selectors += mine[: layout.FC_MAX_TS]
        entry = SaEntry(
            mark_out=current.mark_out,
            mark_in=current.mark_in,
            selectors=tuple(selectors),
            reinject=current.child_name in cfg.reinject,
            local_out=local_out,
        )
        desired.slots[slots[mark]] = SlotState(slots[mark], entry, tuple(group))
    _one_copy_per_peer(desired)
    return desired


def _one_copy_per_peer(desired: Desired) -> None:
    """A reauthentication (make-before-break) or a client reconnecting before its old IKE_SA
    is gone holds two SAs to the same peer and addresses for a moment, each with its own mark:
    copies to both would reach the client twice. Only the newest gets copies; the older keeps
    its slot, so what it still decrypts is forwarded and counted until it goes."""
    newest: dict[tuple[str, tuple[Network, ...]], tuple[int, int]] = {}
    for slot, state in desired.slots.items():
        child = state.children[0]
        key = (child.remote_id, child.remote_ts)
        if key not in newest or child.unique_id > newest[key][0]:
            newest[key] = (child.unique_id, slot)
    keep = {slot for _uid, slot in newest.values()}
    for slot, state in list(desired.slots.items()):
        if slot not in keep:
            desired.slots[slot] = replace(state, entry=replace(state.entry, copies=False))
