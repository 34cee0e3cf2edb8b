"""`forecast-bpf run | check | status`."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO

from forecast import check, config, status
from forecast.bpf_build import BuildError
from forecast.config import ConfigError
from forecast.datapath import DatapathError
from forecast.links import LinkError
from forecast.netfilter import NetfilterError
from forecast.vici_source import ViciUnavailable

SETUP_ERRORS = (BuildError, LinkError, NetfilterError, DatapathError, OSError)


def _fail(msg: str, code: int = 2) -> int:
    print(f"forecast-bpf: error: {msg}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace) -> config.Config:
    return config.load(Path(args.config))


def _single_instance(path: Path) -> IO[str] | str:
    """Hold an exclusive lock for the daemon's lifetime; a second daemon would share the pinned
    maps and replace the first one's filters. Returns the open lock file, or why not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        return f"another forecast-bpf daemon is running (pid {holder}, lock {path})"
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def run(args: argparse.Namespace) -> int:
    from forecast.daemon import Daemon

    try:
        cfg = _config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="forecast-bpf: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    lock = _single_instance(cfg.state_file.with_suffix(".lock"))
    if isinstance(lock, str):
        return _fail(lock)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon = Daemon(cfg)
    try:
        daemon.setup()
    except SETUP_ERRORS as exc:
        return _fail(f"set-up failed, nothing left behind: {exc}", 1)
    try:
        logging.getLogger("forecast-bpf").info("running; VICI socket %s", cfg.vici_socket)
        daemon.serve(stop)
    finally:
        daemon.teardown()
        logging.getLogger("forecast-bpf").info("stopped; everything removed")
    return 0


def run_check(args: argparse.Namespace) -> int:
    try:
        reports = check.run(_config(args))
    except ConfigError as exc:
        return _fail(str(exc))
    except ViciUnavailable as exc:
        return _fail(f"cannot read strongSwan's SAs: {exc}")
    if not reports:
        print("no CHILD_SA is up: nothing to check")
        return 0
    bad = 0
    for r in reports:
        if r.problems:
            bad += 1
            print(f"MISSING  {r.label}")
            for p in r.problems:
                print(f"         - {p}")
        else:
            print(f"OK       {r.label}")
    print(f"{len(reports) - bad} ready, {bad} need changes")
    return 1 if bad else 0


def run_status(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        if args.watch:
            return status.watch(cfg.state_file, args.interval, sys.stdout)
        snap = status.read(cfg.state_file)
    except ConfigError as exc:
        return _fail(str(exc))
    except status.NotRunning as exc:
        print(str(exc), file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(snap.doc, indent=2))
    else:
        print(status.render_table(snap))
    return 0
