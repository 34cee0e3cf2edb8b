#!/usr/bin/env python3
"""Derive an apt source for <codename>-backports from the machine's own <codename> entry.

The backports suite is served by the same mirror as the release suite, so its URIs and keyring
are copied from the existing configuration; no registry host is named in the repository.
Usage: apt_backports.py CODENAME TARGET [APT_ETC]   (exit 1 with a reason when nothing fits)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def find_release_source(codename: str, apt_etc: Path) -> dict[str, str] | None:
    """The first enabled deb source for exactly `codename`: deb822 files first, then .list."""
    for path in sorted((apt_etc / "sources.list.d").glob("*.sources")):
        for fields in _deb822_stanzas(path.read_text()):
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if (
                codename in fields.get("suites", "").split()
                and "deb" in fields.get("types", "").split()
            ):
                return fields
    one_line = [apt_etc / "sources.list", *sorted((apt_etc / "sources.list.d").glob("*.list"))]
    pattern = re.compile(
        r"^\s*deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+"
        + re.escape(codename)
        + r"\s+(?P<components>.+)$"
    )
    for path in one_line:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = pattern.match(line)
            if m:
                fields = {"uris": m["uri"], "components": m["components"].strip()}
                signed = re.search(r"signed-by=(\S+)", m["opts"] or "")
                if signed:
                    fields["signed-by"] = signed.group(1)
                return fields
    return None


def render(codename: str, source: dict[str, str]) -> str:
    lines = [
        "Types: deb",
        f"URIs: {source['uris']}",
        f"Suites: {codename}-backports",
        "Components: main",
    ]
    if "signed-by" in source:
        lines.append(f"Signed-By: {source['signed-by']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    codename, target = argv[0], Path(argv[1])
    apt_etc = Path(argv[2]) if len(argv) == 3 else Path("/etc/apt")
    source = find_release_source(codename, apt_etc)
    if source is None:
        print(
            f"apt_backports: no enabled deb source for suite {codename} under {apt_etc} to "
            f"derive {codename}-backports from",
            file=sys.stderr,
        )
        return 1
    target.write_text(render(codename, source))
    print(f"apt_backports: wrote {target} from the machine's {codename} source", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
