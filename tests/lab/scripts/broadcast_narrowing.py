"""Lab script: the LAN broadcast goes only to SAs that negotiated it; multicast to everyone.

Run with --no-broadcast c2: c2's gateway child lacks the broadcast TS."""

import json
import os
import sys

from forecast_lab import checks
from forecast_lab.topology import Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
names = {c.name for c in topo.clients}
narrowed = set(sys.argv[1:])
results = [
    checks.lan_to_clients(topo, topo.lan_broadcast, names - narrowed),
    checks.lan_to_clients(topo, checks.SSDP_GROUP, names),
]
for r in results:
    print("RESULT " + json.dumps(r.as_dict()), flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
