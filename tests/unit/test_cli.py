from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from forecast import cli
from forecast.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "run", "--clients", "0", "x.sh"], "--clients must be 1..100, got 0"),
        (["lab", "run", "--clients", "two", "x.sh"], "--clients takes a number, got 'two'"),
        (["lab", "demo", "--if-id", "0"], "0 is not an if_id"),
        (["lab", "demo", "--kernel", "5.10"], "invalid choice: '5.10'"),
    ],
)
def test_bad_arguments_name_the_problem(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_reference_plugin_switch_and_script_args() -> None:
    args = build_parser().parse_args(
        ["lab", "run", "--reference-plugin", "--clients", "3", "s.py", "--flag", "v"]
    )
    assert args.reference_plugin and args.clients == 3
    assert args.script == "s.py" and args.args == ["--flag", "v"]


def test_short_flags_as_swanctl_and_iproute2_spell_them() -> None:
    args = build_parser().parse_args(
        ["status", "-c", "/x.yaml", "-j", "-w", "-i", "2", "-s", "id", "-t", "5", "-m", "c1"]
    )
    assert (args.config, args.json, args.watch, args.interval) == ("/x.yaml", True, True, 2.0)
    assert (args.sort, args.top, args.match) == ("id", 5, "c1")
    for command in ("run", "stop", "check"):
        assert build_parser().parse_args([command, "-c", "/y.yaml"]).config == "/y.yaml"


@pytest.mark.parametrize("command", ["run", "stop", "check", "status"])
def test_every_command_says_what_it_does_and_its_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes: 0 " in out
    # every exit code the command returns is named (argparse's own 2 included)
    for code in {"run": "012", "stop": "02", "check": "012", "status": "0123"}[command]:
        assert re.search(rf"(^|\s){code} \w", out.split("exit codes:")[1]), (command, code)


def test_status_json_without_a_daemon_is_still_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_file: {tmp_path}/none.json\n")
    assert cli.main(["status", "--json", "-c", str(cfg)]) == 3
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc == {
        "schema": 1,
        "daemon": {
            "running": False,
            "reason": f"forecast-bpf is not running (no {tmp_path}/none.json)",
        },
        "sas": [],
    }
    assert "not running" in err  # people read stderr
    assert cli.main(["status", "-c", str(cfg)]) == 3
    assert capsys.readouterr().out == ""  # the table form prints nothing on stdout


def test_without_the_lab_package_lab_commands_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway's package carries no forecast_lab: `lab …` is an error naming why, never a
    traceback, and the daemon's commands do not need it."""
    for name in [m for m in sys.modules if m == "forecast_lab" or m.startswith("forecast_lab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "forecast_lab", None)  # import raises ImportError
    assert cli.main(["lab", "probe"]) == 2
    assert "the lab is not installed here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["lab", "run", "--clients", "3", "x.sh"])
    assert exc.value.code == 2
    assert "the lab is not installed here" in capsys.readouterr().err
    assert build_parser().parse_args(["status", "-j"]).json
