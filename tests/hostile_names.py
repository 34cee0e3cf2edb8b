"""A recorded child-updown (charon 5.9.8) with hostile names and identities put in: what a
misconfigured or malicious peer or configuration could make charon report. Shared by the unit
tier (parsing, rules, status, metrics) and the kernel tier (real iptables-restore)."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.conftest import FIXTURES

EVENT = FIXTURES / "vici-5.9.8" / "gw" / "002-child-updown.json"
IF_ID = 42

# Each would break something if it reached it raw: a quote ends the rule comment inside an
# iptables-restore line (then "-j ACCEPT" is a rule of its own), a newline starts a new line
# in a log or the restore input, an escape sequence repaints the operator's terminal, a bidi
# override reverses what the table shows, bytes that are not UTF-8 fail a naive decode.
IKE_NAME = b'rw" -j ACCEPT\n-A INPUT -j DROP\n#'
CHILD_NAME = b"kid;\x1b[2J\x1b[31mred\r\xe2\x80\xaeevil\x00"
REMOTE_ID = b"C=XX, CN=\xff\xfe\"'; rm -rf / \n" + b"x" * 5000


def _as_vici(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k.encode() if isinstance(k, str) else k): _as_vici(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_vici(v) for v in value]
    return value.encode() if isinstance(value, str) else value


def payload() -> dict[bytes, Any]:
    """child-updown (up) for one CHILD_SA with the hostile names, marked and with our if_id."""
    recorded = json.loads(EVENT.read_text())["payload"]
    ike = copy.deepcopy(recorded["rw"])
    ike["remote-id"] = REMOTE_ID
    (child,) = ike["child-sas"].values()
    child["name"] = CHILD_NAME
    child["if-id-in"] = child["if-id-out"] = f"{IF_ID:x}"
    ike["child-sas"] = {"hostile-2": child}
    out: dict[bytes, Any] = _as_vici({"up": "yes"})
    out[IKE_NAME] = _as_vici(ike)
    return out
