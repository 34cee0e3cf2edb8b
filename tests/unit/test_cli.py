from __future__ import annotations

import pytest

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
