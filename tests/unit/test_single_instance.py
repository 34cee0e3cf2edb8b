from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path


def test_a_second_daemon_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_file: {tmp_path}/state.json\n")
    with (tmp_path / "state.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "forecast", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert f"another forecast-bpf daemon is running (pid {os.getpid()}" in proc.stderr
