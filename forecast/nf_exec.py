"""Running a netfilter tool (iptables-restore, nft), in a network namespace or not."""

from __future__ import annotations

import shutil
import subprocess

# (hook, comment, mark): what identifies a rule of ours whatever the back end's spelling; drift
# is found by comparing these with what was applied.
Signature = tuple[str, str, int]


class NetfilterError(RuntimeError):
    """A netfilter command failed; the message carries its stderr."""


def run(
    argv: list[str], netns: str | None, input_text: str | None = None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full = [*(["ip", "netns", "exec", netns] if netns else []), *argv]
    try:
        proc = subprocess.run(
            full, input=input_text, capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise NetfilterError(f"{argv[0]}: not installed") from None
    if check and proc.returncode != 0:
        raise NetfilterError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def installed(tool: str) -> bool:
    return shutil.which(tool) is not None
