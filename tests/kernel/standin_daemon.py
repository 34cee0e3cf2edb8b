"""`forecast-bpf run` with a veth standing in for the XFRM interface (this kernel has none).

Test helper only: everything but the interface's creation is the product's own code path (the
CLI's signals, lock, logging, set-up, exit modes).
Usage (inside the gateway's namespace): standin_daemon.py CONFIG STANDIN_IFNAME
"""

from __future__ import annotations

import socket
import sys

from forecast import cli, cli_daemon, links


def main() -> int:
    config, standin = sys.argv[1], sys.argv[2]
    args = cli.build_parser().parse_args(["run", "--config", config])
    xfrm = links.XfrmInterface(standin, socket.if_nametoindex(standin), False)
    return cli_daemon.run(args, xfrm=xfrm)


if __name__ == "__main__":
    sys.exit(main())
