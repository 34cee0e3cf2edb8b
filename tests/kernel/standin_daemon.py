"""Runs the real Daemon with a veth standing in for the XFRM interface (this kernel has none).

Test helper only: everything but the interface's creation is the product's own code path.
Usage (inside the gateway's namespace): standin_daemon.py CONFIG STANDIN_IFNAME
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from forecast import config, links
from forecast.daemon import Daemon


def main() -> int:
    cfg = config.load(Path(sys.argv[1]))
    standin = sys.argv[2]
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="forecast-bpf: %(levelname)s %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon = Daemon(cfg, xfrm=links.XfrmInterface(standin, socket.if_nametoindex(standin), False))
    daemon.setup()
    try:
        daemon.serve(stop)
    finally:
        daemon.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
