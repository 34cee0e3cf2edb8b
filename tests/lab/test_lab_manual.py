"""`lab up` / `lab exec` / `lab shell` / `lab down` from the host, as an operator uses them: the
lab stays up between commands (in a detached VM where this kernel cannot run it), and the shell
is driven in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

from forecast_lab import runner

CLI = [sys.executable, "-m", "forecast", "lab"]


def _tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def _wait_for_screen(session: str, text: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-t", session, "-p")
        if text in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared on the terminal:\n{screen}")


def test_up_exec_shell_down() -> None:
    up = subprocess.run([*CLI, "up", "--clients", "2"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    prefix = up.stdout.split()[1]
    state = json.loads(runner.state_path(prefix).read_text())
    session = f"fclab-test-{secrets.token_hex(3)}"
    try:
        ran = subprocess.run(
            [*CLI, "exec", "--lab", prefix, "sh", "-c", "ip -br addr show eth1; exit 4"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 4 and "10.1.0.1/16" in ran.stdout, ran.stdout + ran.stderr

        _tmux(
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "160",
            "-y",
            "40",
            f"{' '.join(CLI)} shell {prefix}; sleep 60",
        )
        time.sleep(2)
        _tmux("send-keys", "-t", session, "Enter")
        _tmux(
            "send-keys",
            "-t",
            session,
            "echo clients=$FORECAST_LAB_CLIENTS; ip netns identify",
            "Enter",
        )
        screen = _wait_for_screen(session, "clients=c1 c2")
        assert f"{prefix}-gw" in _wait_for_screen(session, f"{prefix}-gw"), screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
        down = subprocess.run([*CLI, "down", prefix], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not runner.state_path(prefix).exists()
    if "vm" in state:
        assert not os.path.exists(f"/proc/{state['vm']['pid']}"), "the lab VM outlived `down`"
        assert not os.path.exists(state["vm"]["base"])
