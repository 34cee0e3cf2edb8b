"""Lab script: unicast VIP <-> LAN host over ESP, with the gateway's SA counters."""

import json
import os
import sys

from forecast.lab import checks
from forecast.lab.topology import Topology

result = checks.unicast(Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"]))
print("RESULT " + json.dumps(result.as_dict()), flush=True)
sys.exit(0 if result.ok else 1)
