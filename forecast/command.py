"""Running a command, in a network namespace or not: the one runner of the daemon's tools
(nft, iptables-restore) and of the lab's."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


class CommandError(RuntimeError):
    """A command failed or is missing; the message names it and carries its stderr."""


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    timeout: float = 60,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (inside `netns` when given). check: a non-zero exit raises CommandError."""
    full = [*(["ip", "netns", "exec", netns] if netns else []), *argv]
    try:
        proc = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input_text, check=False
        )
    except FileNotFoundError:
        raise CommandError(f"{full[0]}: not installed") from None
    if check and proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise CommandError(f"{' '.join(full)} exited {proc.returncode}: {why}")
    return proc
