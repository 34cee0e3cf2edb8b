from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "apt_backports.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apt_backports", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "sources.list.d").mkdir(exist_ok=True)
    return tmp_path


def test_deb822_source_is_copied_with_its_keyring(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        {
            "sources.list.d/debian.sources": (
                "Types: deb\nURIs: http://mirror.example/debian-security\n"
                "Suites: bookworm-security\n"
                "Components: main\n\n"
                "Types: deb\nURIs: http://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\n"
                "Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n"
            )
        },
    )
    mod = _load()
    text = mod.render("bookworm", mod.find_release_source("bookworm", apt))
    assert "URIs: http://mirror.example/debian\n" in text
    assert "Suites: bookworm-backports\n" in text
    assert "Signed-By: /usr/share/keyrings/k.gpg" in text


def test_one_line_format_and_disabled_stanzas(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        {
            "sources.list.d/off.sources": (
                "Enabled: no\nTypes: deb\nURIs: http://off.example/\n"
                "Suites: bookworm\nComponents: main\n"
            ),
            "sources.list": "# deb http://x.example/ bookworm main\n"
            "deb [signed-by=/k.gpg] http://one.example/debian bookworm main contrib\n",
        },
    )
    source = _load().find_release_source("bookworm", apt)
    assert source == {
        "uris": "http://one.example/debian",
        "components": "main contrib",
        "signed-by": "/k.gpg",
    }


def test_no_source_is_a_clear_failure(tmp_path: Path, capsys: object) -> None:
    apt = _apt(tmp_path, {"sources.list": "deb http://x.example/ trixie main\n"})
    mod = _load()
    assert mod.main(["bookworm", str(tmp_path / "out"), str(apt)]) == 1
    assert not (tmp_path / "out").exists()
