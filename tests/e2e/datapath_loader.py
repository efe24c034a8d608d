"""Stand-in node agent for the restart test: load, program and attach the datapath
of every node given as JSON in argv[1], print "ready", then sleep until killed.

Invariant: it only touches the namespaces and pin directories named in its input.
"""

from __future__ import annotations

import json
import sys
import time

from services.node import maps as M
from services.node.datapath import Datapath, MapSizes


def main() -> None:
    spec = json.loads(sys.argv[1])
    keep = []
    for node in spec["nodes"]:
        dp = Datapath(spec["cluster"], node["name"], node["netns"], pin_root=spec["pin_root"],
                      map_sizes=MapSizes(**spec["map_sizes"]))
        dp.load()
        entries = [M.endpoint_entry(e["ifindex"], e["ep_id"], e["identity"], e["ip"])
                   for e in node["endpoints"]]
        entries += [M.ipcache_entry(c["cidr"], c["identity"]) for c in spec["ipcache"]]
        M.apply(dp.maps, entries)
        for e in node["endpoints"]:
            dp.attach(e["ifname"])
        keep.append(dp)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
