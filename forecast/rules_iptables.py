"""The iptables back end: MARK rules in forecast-bpf's own mangle chains, applied atomically.

Every change is one `iptables-restore --noflush` transaction, so a rekey's new SPI rule is in
together with the old one's removal, and other writers' rules are never touched. When the
chains' contents are known (the daemon applied them) only the difference is sent: an SA event
costs a few `-A`/`-D` lines, not a rewrite of thousands of rules. Otherwise (a start, drift) the
chains are declared, which flushes them, and refilled in the same commit.
The variant is whichever the host's `iptables` is (nf_tables or legacy), said in the log.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from forecast.desired import MarkRule, RuleMatch
from forecast.nf_exec import NetfilterError, Signature
from forecast.nf_exec import run as _run

CHAINS = {"PREROUTING": "FORECAST-PRE", "OUTPUT": "FORECAST-OUT"}
HOOK_OF = {chain: hook for hook, chain in CHAINS.items()}
RESTORE, SAVE, IPTABLES = "iptables-restore", "iptables-save", "iptables"


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


def render(rules: Iterable[MarkRule]) -> str:
    """The whole transaction: both chains declared (so flushed) and refilled."""
    lines = ["*mangle", *(f":{chain} - [0:0]" for chain in CHAINS.values())]
    lines += [render_rule(r) for r in rules]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


class IptablesRules:
    """Our chains in one network namespace (None: the caller's)."""

    name = "iptables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.variant = variant(netns)
        self.detail = f"iptables ({self.variant}), chains {', '.join(CHAINS.values())}"

    def _jump_present(self, hook: str) -> bool:
        argv = [IPTABLES, "-w", "-t", "mangle", "-C", hook, "-j", CHAINS[hook]]
        return _run(argv, self.netns, check=False).returncode == 0

    def present(self) -> bool:
        """Is anything of ours (a chain or a jump to one) in the mangle table?"""
        text = _run([SAVE, "-t", "mangle"], self.netns).stdout
        return any(chain in text for chain in CHAINS.values())

    def hooked(self) -> bool:
        """Are both our chains jumped to from their hooks?"""
        return all(self._jump_present(hook) for hook in CHAINS)

    def apply(self, rules: Iterable[MarkRule], known: Sequence[MarkRule] | None = None) -> None:
        """Make our chains hold `rules` in one commit; hook them in at the top once.
        `known`: what the chains hold now, when certain; then only the difference is sent."""
        rules = list(rules)
        # The jumps are checked at start and at every resync (_read_back), not per event: each
        # check is a process that reads the whole ruleset.
        if known is not None:
            delta = render_delta(known, rules)
            if delta is not None:
                _run([RESTORE, "-w", "--noflush"], self.netns, delta)
            return
        _run([RESTORE, "-w", "--noflush"], self.netns, render(rules))
        for hook, chain in CHAINS.items():
            if not self._jump_present(hook):
                # First in the hook, as the plugin's rules: the mark must be set before any
                # other rule looks at the packet.
                _run(
                    [IPTABLES, "-w", "-t", "mangle", "-I", hook, "1", "-j", chain],
                    self.netns,
                )

    def current(self) -> list[str]:
        """Our chains' rules as iptables-save prints them (for status and tests)."""
        out = _run([SAVE, "-t", "mangle"], self.netns).stdout
        return [
            line
            for line in out.splitlines()
            if any(line.startswith(f"-A {c} ") for c in CHAINS.values())
        ]

    def signatures(self) -> Counter[Signature]:
        """Our chains' rules as (hook, comment, mark), to compare with what was applied."""
        out: Counter[Signature] = Counter()
        for line in self.current():
            m = _SAVED.match(line)
            # A line of another shape in our chains is someone else's: counted as such.
            out[
                (HOOK_OF[m[1]], m[2] if m[2] is not None else m[3], int(m[4], 16))
                if m and m[1] in HOOK_OF
                else ("?", line, 0)
            ] += 1
        return out

    def holds(self, expected: Counter[Signature]) -> bool:
        """Exactly these rules, in chains jumped to from their hooks."""
        return self.signatures() == expected and self.hooked()

    def remove(self) -> None:
        """Unhook and delete our chains; nothing of ours is left, nothing else is touched."""
        for hook, chain in CHAINS.items():
            while self._jump_present(hook):
                _run(
                    [IPTABLES, "-w", "-t", "mangle", "-D", hook, "-j", chain],
                    self.netns,
                )
        text = _run([SAVE, "-t", "mangle"], self.netns).stdout
        present = [c for c in CHAINS.values() if f":{c} " in text]
        if present:
            _run(
                [RESTORE, "-w", "--noflush"],
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
