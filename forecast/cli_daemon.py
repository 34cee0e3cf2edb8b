"""`forecast-bpf run | stop | check | status`."""

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

from forecast import __version__, check, config, status, systemd
from forecast.bpf_build import BuildError
from forecast.config import ConfigError
from forecast.datapath import DatapathError
from forecast.links import LinkError, XfrmInterface
from forecast.netfilter import NetfilterError
from forecast.vici_source import ViciUnavailable

SETUP_ERRORS = (BuildError, LinkError, NetfilterError, DatapathError, OSError)


def _fail(msg: str, code: int = 2) -> int:
    print(f"forecast-bpf: error: {msg}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace) -> config.Config:
    return config.load(Path(args.config))


def _need_root(command: str) -> str | None:
    if os.geteuid() != 0:
        return (
            f"`{command}` needs root (it loads BPF programs, changes links, routes and "
            "netfilter rules): run it as root or through systemd"
        )
    return None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="forecast-bpf: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # debug is for forecast-bpf's own lines: pyroute2 would log every netlink message.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def _single_instance(path: Path) -> IO[str] | str:
    """Hold an exclusive lock for the daemon's lifetime; a second daemon would share the pinned
    maps and replace the first one's filters. Returns the open lock file, or why not."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
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


def _privileged(args: argparse.Namespace, command: str) -> tuple[config.Config, IO[str]] | str:
    """Root, a valid config, logging set up, and the daemon lock held; or why not."""
    if why := _need_root(command):
        return why
    try:
        cfg = _config(args)
    except ConfigError as exc:
        return str(exc)
    _logging(cfg.log_level)
    lock = _single_instance(cfg.state_file.with_suffix(".lock"))
    if isinstance(lock, str):
        return lock if command == "run" else f"{lock}: stop that daemon instead"
    return cfg, lock


def run(args: argparse.Namespace, *, xfrm: XfrmInterface | None = None) -> int:
    """The daemon until a signal; xfrm: a given interface instead of our own (tests)."""
    from forecast.daemon import Daemon, ExitMode

    ready = _privileged(args, "run")
    if isinstance(ready, str):
        return _fail(ready)
    cfg, _lock = ready
    log = logging.getLogger("forecast-bpf")
    log.info("forecast-bpf %s from %s", __version__, Path(__file__).parent)
    daemon = Daemon(cfg, xfrm=xfrm, config_path=Path(args.config))
    stop = threading.Event()
    asked: set[int] = set()

    def on_signal(signum: int, _frame: object) -> None:
        asked.add(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    try:
        daemon.setup()
    except SETUP_ERRORS as exc:
        return _fail(f"set-up failed: {exc}", 1)
    mode = ExitMode.STOP
    try:
        log.info("running; VICI socket %s", cfg.vici_socket)
        daemon.serve(stop)
        # SIGUSR2: hand over on purpose. SIGTERM under systemd: hand over when systemd is
        # restarting us (restart, package upgrade), remove everything when it is stopping us.
        if signal.SIGUSR2 in asked or (signal.SIGTERM in asked and systemd.stop_is_a_restart()):
            mode = ExitMode.HANDOVER
    finally:
        daemon.teardown(mode)
        if mode is ExitMode.HANDOVER:
            log.info("stopped for a restart; the data path keeps forwarding")
        else:
            log.info("stopped; everything removed")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """Remove a data path that no daemon runs (left by a hand-over or a crash)."""
    from forecast.daemon import remove_left_datapath

    ready = _privileged(args, "stop")
    if isinstance(ready, str):
        return _fail(ready)
    cfg, _lock = ready
    removed = remove_left_datapath(cfg)
    cfg.state_file.with_suffix(".lock").unlink(missing_ok=True)
    print(f"removed: {', '.join(removed)}" if removed else "nothing left to remove")
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
            print(f"OK       {r.label} (path: {r.path})")
        for note in r.notes:
            print(f"         note: {note}")
    print(f"{len(reports) - bad} ready, {bad} need changes")
    return 1 if bad else 0


def run_status(args: argparse.Namespace) -> int:
    view = status.View(sort=args.sort, top=args.top, match=args.match)
    try:
        cfg = _config(args)
        if args.watch:
            return status.watch(cfg.state_file, args.interval, sys.stdout, view=view)
        snap = status.read(cfg.state_file)
    except ConfigError as exc:
        return _fail(str(exc))
    except status.NotRunning as exc:
        if args.json:
            # Scripts read stdout alone: the same schema, saying nothing runs and why.
            print(json.dumps(status.not_running_doc(str(exc)), indent=2))
        print(str(exc), file=sys.stderr)
        return 3
    if args.json:
        # Complete whatever the terminal: every SA, unless --match/--top/--sort ask otherwise.
        doc = dict(snap.doc)
        if (args.match, args.top, args.sort) != (None, None, "slot"):
            doc["sas"] = status.select(snap.sas, view)
            doc["selection"] = {
                "match": args.match,
                "sort": args.sort,
                "top": args.top,
                "of": len(snap.sas),
            }
        print(json.dumps(doc, indent=2))
    else:
        print(status.render_table(snap, view=status.terminal_view(view, full_height=False)))
    # 1: the daemon is down but its data path still forwards (a crash, or between restarts).
    return 0 if snap.doc["daemon"]["running"] else 1
