"""The iptables back end: MARK rules in forecast-bpf's own mangle chains, applied atomically.

Every change is one `iptables-restore --noflush` transaction, so a rekey's new SPI rule is in
together with the old one's removal, and other writers' rules are never touched. When the
chains' contents are known (the daemon applied them) only the difference is sent: an SA event
costs a few `-A`/`-D` lines, not a rewrite of thousands of rules. Otherwise (a start, drift) the
chains are declared, which flushes them, and refilled in the same commit.
The variant is whichever the host's `iptables` is (nf_tables or legacy), said in the log.
Rules for IPv6 addresses (clients' IPv6 virtual IPs) go to the same chains in ip6tables' mangle
table, with ip6tables-restore: each family is one transaction of its own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from forecast.desired import MarkRule, RuleMatch
from forecast.nf_exec import NetfilterError, Signature
from forecast.nf_exec import run as _run

CHAINS = {"PREROUTING": "FORECAST-PRE", "OUTPUT": "FORECAST-OUT", "POSTROUTING": "FORECAST-POST"}
# A guard (desired.MarkRule): multicast/broadcast with the mark, leaving without IPsec, dropped.
GUARD_MATCH = "-m policy --dir out --pol none -m addrtype --dst-type BROADCAST,MULTICAST"
HOOK_OF = {chain: hook for hook, chain in CHAINS.items()}
RESTORE, SAVE, IPTABLES = "iptables-restore", "iptables-save", "iptables"


@dataclass(frozen=True)
class Tools:
    """One family's commands."""

    version: int
    iptables: str
    save: str
    restore: str


FAMILIES = (
    Tools(4, IPTABLES, SAVE, RESTORE),
    Tools(6, "ip6tables", "ip6tables-save", "ip6tables-restore"),
)


def family_of(rule: MarkRule) -> int:
    """Which table a rule goes to: the family of its addresses (every rule of ours has one)."""
    net = rule.match.dst or rule.match.src
    return net.version if net is not None else 4


def variant(netns: str | None = None) -> str:
    """What the host's `iptables` writes to: nf_tables or legacy."""
    m = re.search(r"\((nf_tables|legacy)\)", _run([IPTABLES, "-V"], netns).stdout)
    return m.group(1) if m else "legacy"


def render_match(m: RuleMatch) -> str:
    words: list[str] = []
    if m.src is not None:
        words += ["-s", str(m.src)]
    if m.dst is not None:
        words += ["-d", str(m.dst)]
    if m.proto == "esp":
        words += ["-p", "esp", "-m", "esp", "--espspi", str(m.spi)]
    elif m.proto == "udp":
        words += ["-p", "udp", "-m", "udp", "--sport", str(m.sport), "--dport", str(m.dport)]
    elif m.proto is not None:
        raise NetfilterError(f"no iptables spelling for protocol {m.proto!r}")
    return " ".join(words)


def render_rule(rule: MarkRule) -> str:
    if rule.action == "drop":
        return (
            f"-A {CHAINS[rule.chain]} -m mark --mark {rule.mark:#x} {GUARD_MATCH} -m comment "
            f'--comment "{rule.comment}" -j DROP'
        )
    return (
        f"-A {CHAINS[rule.chain]} {render_match(rule.match)} -m comment --comment "
        f'"{rule.comment}" -j MARK --set-xmark {rule.mark:#x}/0xffffffff'
    )


def render_delta(old: Sequence[MarkRule], new: Sequence[MarkRule]) -> str | None:
    """The transaction that turns chains holding `old` into `new`; None when equal. Additions
    come first: within the commit nothing is ever without its rule."""
    before, after = Counter(old), Counter(new)
    added, gone = after - before, before - after
    if not added and not gone:
        return None
    lines = ["*mangle"]
    lines += [render_rule(r) for r in added.elements()]
    lines += ["-D" + render_rule(r)[2:] for r in gone.elements()]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


_SAVED = re.compile(
    r"^-A (\S+) .*--comment (?:\"([^\"]*)\"|(\S+)) -j MARK --set-xmark (0x[0-9a-f]+)/0xffffffff$"
)
_SAVED_GUARD = re.compile(
    rf"^-A (\S+) -m mark --mark (0x[0-9a-f]+) {GUARD_MATCH} -m comment --comment "
    r"(?:\"([^\"]*)\"|(\S+)) -j DROP$"
)


def render(rules: Iterable[MarkRule]) -> str:
    """The whole transaction: both chains declared (so flushed) and refilled."""
    lines = ["*mangle", *(f":{chain} - [0:0]" for chain in CHAINS.values())]
    lines += [render_rule(r) for r in rules]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


class IptablesRules:
    """Our chains in one network namespace (None: the caller's), in iptables' and ip6tables'
    mangle tables."""

    name = "iptables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.variant = variant(netns)
        self.detail = f"iptables ({self.variant}), chains {', '.join(CHAINS.values())}"

    def _jump_present(self, tools: Tools, hook: str) -> bool:
        argv = [tools.iptables, "-w", "-t", "mangle", "-C", hook, "-j", CHAINS[hook]]
        return _run(argv, self.netns, check=False).returncode == 0

    def _saved(self, tools: Tools) -> str:
        return _run([tools.save, "-t", "mangle"], self.netns).stdout

    def present(self) -> bool:
        """Is anything of ours (a chain or a jump to one) in either mangle table?"""
        saved = [self._saved(tools) for tools in FAMILIES]  # one listing per family
        return any(chain in text for text in saved for chain in CHAINS.values())

    def hooked(self) -> bool:
        """Are our chains jumped to from their hooks, in both families?"""
        return all(self._jump_present(tools, hook) for tools in FAMILIES for hook in CHAINS)

    def apply(self, rules: Iterable[MarkRule], known: Sequence[MarkRule] | None = None) -> None:
        """Make our chains hold `rules`, one commit per family; hook them in at the top once.
        `known`: what the chains hold now, when certain; then only the difference is sent."""
        rules = list(rules)
        for tools in FAMILIES:
            mine = [r for r in rules if family_of(r) == tools.version]
            # The jumps are checked at start and at every resync (_read_back), not per event:
            # each check is a process that reads the whole ruleset.
            if known is not None:
                delta = render_delta([r for r in known if family_of(r) == tools.version], mine)
                if delta is not None:
                    _run([tools.restore, "-w", "--noflush"], self.netns, delta)
                continue
            _run([tools.restore, "-w", "--noflush"], self.netns, render(mine))
            for hook, chain in CHAINS.items():
                if not self._jump_present(tools, hook):
                    # First in the hook, as the plugin's rules: the mark must be set before any
                    # other rule looks at the packet.
                    _run(
                        [tools.iptables, "-w", "-t", "mangle", "-I", hook, "1", "-j", chain],
                        self.netns,
                    )

    def current(self) -> list[str]:
        """Our chains' rules as iptables-save and ip6tables-save print them (status, tests)."""
        return [
            line
            for tools in FAMILIES
            for line in self._saved(tools).splitlines()
            if any(line.startswith(f"-A {c} ") for c in CHAINS.values())
        ]

    def signatures(self) -> Counter[Signature]:
        """Our chains' rules as (hook, comment, mark), to compare with what was applied."""
        out: Counter[Signature] = Counter()
        for line in self.current():
            m, g = _SAVED.match(line), _SAVED_GUARD.match(line)
            # A line of another shape in our chains is someone else's: counted as such.
            if m and m[1] in HOOK_OF:
                out[(HOOK_OF[m[1]], m[2] if m[2] is not None else m[3], int(m[4], 16))] += 1
            elif g and g[1] in HOOK_OF:
                out[(HOOK_OF[g[1]], g[3] if g[3] is not None else g[4], int(g[2], 16))] += 1
            else:
                out[("?", line, 0)] += 1
        return out

    def holds(self, expected: Counter[Signature]) -> bool:
        """Exactly these rules, in chains jumped to from their hooks."""
        return self.signatures() == expected and self.hooked()

    def remove(self) -> None:
        """Unhook and delete our chains; nothing of ours is left, nothing else is touched."""
        for tools in FAMILIES:
            for hook, chain in CHAINS.items():
                while self._jump_present(tools, hook):
                    _run(
                        [tools.iptables, "-w", "-t", "mangle", "-D", hook, "-j", chain],
                        self.netns,
                    )
            text = self._saved(tools)
            present = [c for c in CHAINS.values() if f":{c} " in text]
            if present:
                _run(
                    [tools.restore, "-w", "--noflush"],
                    self.netns,
                    "\n".join(
                        [
                            "*mangle",
                            *(f":{c} - [0:0]" for c in present),
                            *(f"-X {c}" for c in present),
                            "COMMIT",
                            "",
                        ]
                    ),
                )
