"""strongSwan's forecast plugin in the lab with real ESP: the reference forecast-bpf's semantics
follow and its benchmarks compare against (`make test-reference`, and before `make bench`).
These test strongSwan, not forecast-bpf, so `make test` does not run them; the lab scenarios
that test forecast-bpf check the same things of it."""

from __future__ import annotations

from tests.lab.conftest import LabRunner

COUNT = 20  # checks.DEFAULT_COUNT packets per sender


def test_reference_plugin_forwards_exactly_once(lab: LabRunner) -> None:
    run = lab.script("reference.py", "--reference-plugin", "--clients", "2")
    assert run.rc == 0, run.output
    # Two clients with real ESP: ping VIP <-> LAN host both ways, gateway SA counters rise.
    # (The seed's policies carry marks, so forwarded unicast needs MARK rules: the plugin's.)
    unicast = run.result("unicast")["detail"]
    for client in ("c1", "c2"):
        assert unicast[client]["ping_to_lan"] and unicast[client]["ping_from_lan"], unicast
    sas = [v for k, v in unicast.items() if k.startswith("sa")]
    assert len(sas) == 2
    # 3 pings each way per client: at least 6 ESP packets in and out of every SA.
    assert all(sa["esp_in"] >= 6 and sa["esp_out"] >= 6 for sa in sas), sas
    mc = run.result("LAN -> 239.255.255.250")["detail"]
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    for client in ("c1", "c2"):
        assert mc[client]["received"] == mc[client]["distinct"] == COUNT
        assert bc[client]["received"] == bc[client]["distinct"] == COUNT
    c1 = run.result("c1 -> 239.255.255.250")["detail"]
    assert c1["c2"]["received"] == c1["c2"]["distinct"] == COUNT
    assert c1["lan"]["received"] == c1["lan"]["distinct"] == COUNT
    assert c1["c1"]["received"] == 0  # never echoed to the origin


def test_reference_plugin_sends_broadcast_only_where_negotiated(lab: LabRunner) -> None:
    run = lab.script(
        "broadcast_narrowing.py",
        "--reference-plugin",
        "--clients",
        "2",
        "--no-broadcast",
        "c2",
        script_args=("c2",),
    )
    assert run.rc == 0, run.output
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    assert bc["c1"]["received"] == COUNT and bc["c2"]["received"] == 0
    mc = run.result("LAN -> 239.255.255.250")["detail"]
    assert mc["c1"]["received"] == mc["c2"]["received"] == COUNT


def test_seed_gateway_without_a_forwarder_forwards_nothing(lab: LabRunner) -> None:
    # The same topology without the plugin: the scenario must fail, or the reference test above
    # could pass on something other than the plugin.
    run = lab.script("reference.py", "--clients", "2", script_args=("lan-multicast-only",))
    assert run.rc == 1, run.output
    mc = run.result("LAN -> 239.255.255.250")
    assert not mc["ok"]
    assert all(v["received"] == 0 for v in mc["detail"].values())


def test_reference_plugin_on_kernel_6_12(lab_612: LabRunner) -> None:
    run = lab_612.script("reference.py", "--reference-plugin", "--clients", "2")
    assert run.rc == 0, run.output
    assert len(run.results) == 4 and all(r["ok"] for r in run.results)
