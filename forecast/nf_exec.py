"""Running a netfilter tool (iptables-restore, nft), in a network namespace or not."""

from __future__ import annotations

import shutil
import subprocess

from forecast import command
from forecast.command import CommandError

# (hook, comment, mark): what identifies a rule of ours whatever the back end's spelling; drift
# is found by comparing these with what was applied.
Signature = tuple[str, str, int]


class NetfilterError(RuntimeError):
    """A netfilter command failed; the message carries its stderr."""


def run(
    argv: list[str], netns: str | None, input_text: str | None = None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """forecast.command.run, its failures as NetfilterError (what the daemon handles)."""
    try:
        return command.run(argv, netns=netns, check=check, timeout=30, input_text=input_text)
    except CommandError as exc:
        raise NetfilterError(str(exc)) from None


def installed(tool: str) -> bool:
    return shutil.which(tool) is not None
