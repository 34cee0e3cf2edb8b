"""Lab script: strongSwan's forecast plugin scenario (checks.reference_scenario)."""

import json
import os
import sys

from forecast_lab import checks
from forecast_lab.topology import Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
if sys.argv[1:] == ["lan-multicast-only"]:
    # The negative control needs one check, not the whole scenario.
    results = [checks.lan_to_clients(topo, checks.SSDP_GROUP, {c.name for c in topo.clients})]
else:
    results = checks.reference_scenario(topo)
for r in results:
    print("RESULT " + json.dumps(r.as_dict()), flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
