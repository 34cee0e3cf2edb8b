"""MARK rules in forecast-bpf's own mangle chains, applied atomically.

Our chains are replaced whole in one `iptables-restore --noflush` transaction per change (a
declared user chain is flushed and refilled in the same commit), so a rekey's new SPI rule is
in before, or together with, the old one's removal, and other writers' rules are never touched.
The back end is whichever the host's `iptables` is (nf_tables or legacy), said in the log.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from forecast.desired import MarkRule

CHAINS = {"PREROUTING": "FORECAST-PRE", "OUTPUT": "FORECAST-OUT"}


class NetfilterError(RuntimeError):
    """An iptables command failed; the message carries its stderr."""


@dataclass(frozen=True)
class Backend:
    restore: str
    save: str
    iptables: str
    variant: str  # "nf_tables" or "legacy"


def detect(netns: str | None = None) -> Backend:
    out = _run(["iptables", "-V"], netns).stdout
    m = re.search(r"\((nf_tables|legacy)\)", out)
    variant = m.group(1) if m else "legacy"
    return Backend("iptables-restore", "iptables-save", "iptables", variant)


def _run(
    argv: list[str], netns: str | None, input_text: str | None = None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full = [*(["ip", "netns", "exec", netns] if netns else []), *argv]
    proc = subprocess.run(
        full, input=input_text, capture_output=True, text=True, timeout=30, check=False
    )
    if check and proc.returncode != 0:
        raise NetfilterError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def render_rule(rule: MarkRule) -> str:
    return (
        f"-A {CHAINS[rule.chain]} {' '.join(rule.match)} -m comment --comment "
        f'"{rule.comment}" -j MARK --set-xmark {rule.mark:#x}/0xffffffff'
    )


def render(rules: Iterable[MarkRule]) -> str:
    """The whole transaction: both chains declared (so flushed) and refilled."""
    lines = ["*mangle", *(f":{chain} - [0:0]" for chain in CHAINS.values())]
    lines += [render_rule(r) for r in rules]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


class Rules:
    """Our chains in one network namespace (None: the caller's)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.backend = detect(netns)

    def _jump_present(self, hook: str) -> bool:
        argv = [self.backend.iptables, "-w", "-t", "mangle", "-C", hook, "-j", CHAINS[hook]]
        return _run(argv, self.netns, check=False).returncode == 0

    def present(self) -> bool:
        """Is anything of ours (a chain or a jump to one) in the mangle table?"""
        text = _run([self.backend.save, "-t", "mangle"], self.netns).stdout
        return any(chain in text for chain in CHAINS.values())

    def hooked(self) -> bool:
        """Are both our chains jumped to from their hooks?"""
        return all(self._jump_present(hook) for hook in CHAINS)

    def apply(self, rules: Iterable[MarkRule]) -> None:
        """Replace our chains' contents in one commit; hook them in at the top once."""
        _run([self.backend.restore, "-w", "--noflush"], self.netns, render(rules))
        for hook, chain in CHAINS.items():
            if not self._jump_present(hook):
                # First in the hook, as the plugin's rules: the mark must be set before any
                # other rule looks at the packet.
                _run(
                    [self.backend.iptables, "-w", "-t", "mangle", "-I", hook, "1", "-j", chain],
                    self.netns,
                )

    def current(self) -> list[str]:
        """Our chains' rules as iptables-save prints them (for status and tests)."""
        out = _run([self.backend.save, "-t", "mangle"], self.netns).stdout
        return [
            line
            for line in out.splitlines()
            if any(line.startswith(f"-A {c} ") for c in CHAINS.values())
        ]

    def remove(self) -> None:
        """Unhook and delete our chains; nothing of ours is left, nothing else is touched."""
        for hook, chain in CHAINS.items():
            while self._jump_present(hook):
                _run(
                    [self.backend.iptables, "-w", "-t", "mangle", "-D", hook, "-j", chain],
                    self.netns,
                )
        text = _run([self.backend.save, "-t", "mangle"], self.netns).stdout
        present = [c for c in CHAINS.values() if f":{c} " in text]
        if present:
            _run(
                [self.backend.restore, "-w", "--noflush"],
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
