"""Names and identities from VICI are data: escaped once where they are parsed, and never able
to reach a rule, a log line, a metric label or the status table raw (tests/hostile_names.py)."""

from __future__ import annotations

import json
import logging
import re
from ipaddress import IPv4Address

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from forecast import config, desired, metrics, rules_iptables, rules_nft, status
from forecast.sa import MAX_TEXT, Change, SaTable, printable
from tests import hostile_names

RULE_SAFE = re.compile(r"^[A-Za-z0-9@.\-_:+=,/# ]+$")


def _child() -> Change:
    table = SaTable()
    changes = table.apply("child-updown", hostile_names.payload(), 1000.0)
    assert [c.kind for c in changes] == ["added"]
    return changes[0]


def _no_control(text: str) -> bool:
    return all(c.isprintable() for c in text)


def test_parsed_names_are_printable_bounded_and_still_recognisable() -> None:
    change = _child()
    child = change.child
    for text in (child.ike_name, child.child_name, child.remote_id):
        assert _no_control(text) and len(text) <= MAX_TEXT
    # Escaped, not dropped: an operator can still tell which connection it was.
    assert child.ike_name == 'rw" -j ACCEPT\\n-A INPUT -j DROP\\n#'
    assert child.child_name == "kid;\\x1b[2J\\x1b[31mred\\r\\u202eevil\\x00"
    assert child.remote_id.startswith("C=XX, CN=\\xff\\xfe\"'; rm -rf / \\n")
    assert child.remote_id.endswith("...")
    line = change.line()
    assert "\n" not in line and _no_control(line)
    assert printable(child.ike_name) == child.ike_name  # applying it twice changes nothing


def test_mark_rules_carry_only_safe_comments_through_iptables_restore_text() -> None:
    child = _child().child
    cfg = config.parse({"xfrm": {"if_id": hostile_names.IF_ID}})
    want = desired.compute([child], cfg, IPv4Address("10.1.255.255"), {})
    assert not want.ignored and want.rules
    for rule in want.rules:
        assert RULE_SAFE.match(rule.comment) and len(rule.comment) < 128, rule.comment
        assert rule.comment.startswith(
            "forecast-bpf rw-jACCEPTn-AINPUT-jDROPn/kidx1b2Jx1b31mredru202eevilx00 #2 C=XX,CN="
        )
    text = rules_iptables.render(want.rules)
    # One line per rule, each a single append to one of our chains: nothing injected.
    lines = text.splitlines()
    appends = [ln for ln in lines if ln.startswith("-A ")]
    assert len(appends) == len(want.rules)
    assert all(ln.split()[1] in rules_iptables.CHAINS.values() for ln in appends)
    assert all(ln.count('"') == 2 for ln in appends)
    # nftables takes JSON: the comment is a string value, below nft's 128 characters.
    batch = json.loads(json.dumps({"nftables": rules_nft.render(want.rules)}))["nftables"]
    comments = [item["add"]["rule"]["comment"] for item in batch if "rule" in item.get("add", {})]
    assert comments == [r.comment for r in want.rules]
    assert all(len(c) < 128 for c in comments)


def test_status_table_and_log_lines_show_escapes_not_control_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    change = _child()
    child = change.child
    sa = {
        "slot": 0,
        "ike": child.ike_name,
        "child": child.child_name,
        "unique_id": 2,
        "remote_id": child.remote_id,
        "virtual_ips": ["10.1.0.129"],
        "mark_in": 2,
        "spi_in": "3f3f4bbd",
        "spi_out": "667dd112",
        "counters": {k: {"packets": 1, "bytes": 1} for k in status.DIRECTION_KEYS.values()},
        "drops": {"storm": 5, "group_to_lan": 0, "group_to_sas": 0, "clone": 0},
    }
    doc = {
        "sas": [sa],
        "totals": {k: {"packets": 1, "bytes": 1} for k in status.DIRECTION_KEYS.values()},
        "drops": {},
        "ignored": {},
        "daemon": {"running": True, "pid": 1, "vici_connected": True, "sync_errors": 0},
    }
    table = status.render_table(status.Snapshot(doc), view=status.View(width=200))
    assert all(_no_control(line) for line in table.splitlines())
    assert "\x1b" not in table and "\r" not in table
    with caplog.at_level(logging.INFO):
        logging.getLogger("forecast-bpf").info("%s", change.line())
    assert len(caplog.records) == 1 and "\n" not in caplog.text.rstrip("\n")


def test_metric_labels_are_escaped_by_the_exposition_format() -> None:
    child = _child().child
    # The exporter's own per-SA labels, the peer's identity (`remote_id`) among them.
    family = CounterMetricFamily("forecast_test", "t", labels=metrics.SA_LABELS)
    family.add_metric([child.ike_name, child.child_name, child.remote_id, f"{child.mark_in:#x}"], 1)

    class One:
        def collect(self) -> list[CounterMetricFamily]:
            return [family]

    registry = CollectorRegistry()
    registry.register(One())
    text = generate_latest(registry).decode()
    sample = [ln for ln in text.splitlines() if ln.startswith("forecast_test_total{")]
    assert len(sample) == 1  # one line: no label value broke out of its quotes
    assert 'ike_name="rw\\" -j ACCEPT\\\\n-A INPUT -j DROP\\\\n#"' in sample[0]
