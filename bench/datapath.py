"""Datapath benchmark on sandbox namespaces: traffic overhead, map updates, load time.

Builds one throw-away cluster ``b<4 hex>`` (namespaces ``ciliary-b<hex>-...``, pins under
``/sys/fs/bpf/ciliary/b<hex>``): node-1 with pod-a (client) and pod-b, node-2 with pod-c
(cross-node pair, direct routing over the underlay bridge). Nothing is created in the root
namespace and no packet is addressed outside these namespaces. Everything is removed at
the end, also on error or Ctrl-C. The harness (namespaces, echo servers, clients, cleanup)
is bench/sandbox.py, shared with bench/servicelb.py.

Measures, in one run:
1. TCP connection rate (socket + connect + one request/response + close, one client thread,
   2,000 connections or 10 s, whichever first) and request latency p50/p99 (5,000 round
   trips of 32 bytes on one persistent connection), pod-a → pod-b
   (same node) and pod-a → pod-c (cross node), in the configurations
     a   baseline: the same namespaces, no program attached
     b   datapath attached, endpoints + ipcache in the maps, no policy
     c   b + ingress policy enforced on the server with an allow entry for the client
     d   b + the server reached through a service VIP (lb maps → DNAT / reverse NAT)
     a2  baseline again after detaching (drift check)
   with ratios against a; median of 5 rounds of a,b,c,d,a2. All threads are pinned to one
   CPU (``--no-pin`` to disable) and the cyclic GC is off during timed loops.
2. Map update throughput: 10,000 ipcache /32 entries and 10,000 policy entries written with
   ``BccMapOps.update_batch``, one ``update`` per entry, and through the ``Reconciler``
   (``set_desired`` + ``reconcile``); entries/s, ratios against one-by-one.
3. Program load time (compile + verify) and attach time with Cilium-default map sizes and
   with the small maps the e2e tests use.

Usage: .venv/bin/python bench/datapath.py [--quick]
Writes bench/results/datapath.json and prints aligned tables. Needs root and bcc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import output  # noqa: E402
from services.node import layouts as L  # noqa: E402
from services.node import maps as M  # noqa: E402
from services.node import netns as N  # noqa: E402
from services.node.reconciler import Reconciler  # noqa: E402

RESULTS = REPO / "bench" / "results" / "datapath.json"
PIN_ROOT = S.PIN_ROOT
# The e2e tests' small maps (tests/e2e/podnet.py SMALL_MAPS); same layouts as the defaults.
SMALL_MAPS = dict(ipcache=4096, lxc=1024, policy=1024, ct=65536, lb=1024, metrics=256,
                  events_pages=64)

NODES = {"node-1": ("172.31.7.1/24", "10.200.1.0/24"), "node-2": ("172.31.7.2/24", "10.200.2.0/24")}
# name, node, ip, identity, endpoint id
PODS = (("pod-a", "node-1", "10.200.1.10", 1001, 11),
        ("pod-b", "node-1", "10.200.1.11", 1002, 12),
        ("pod-c", "node-2", "10.200.2.10", 1003, 21),
        ("pod-x", "node-1", "10.200.1.99", 1009, 19))  # spare veth for load/attach timing
PAIRS = (("same-node", "pod-b"), ("cross-node", "pod-c"))
CLIENT = "pod-a"
PORT = 8080  # direct pod-to-pod traffic
# Service backends listen on a port of their own: a post-DNAT tuple then never equals the
# tuple of an earlier direct connection that is still in conntrack (see the
# vip_after_direct_same_sport check and docs/datapath.md).
SVC_PORT = 8081
VIPS = {"pod-b": ("10.96.0.10", 80, 1), "pod-c": ("10.96.0.11", 80, 2)}  # vip, port, rev-NAT id
REUSE_VIP = ("10.96.0.12", 80, 3)  # frontend on pod-b:PORT, only for that check
MSG = b"x" * 32  # latency request: echoed, connection stays open
MAP_ENTRIES = 10_000
WARMUP_CONNS = 200
HARD_DEADLINE = 900.0  # seconds for the whole traffic/map/load run


# ---- clients (sandbox.py) ----------------------------------------------------------------


def connection_rate(netns: str, ip: str, port: int, count: int, seconds: float) -> dict[str, Any]:
    """Sequential socket + connect + request/response + close (``sandbox.connections``)."""
    r = S.connections(netns, ip, port, count, seconds)
    return {k: r[k] for k in ("connections", "seconds", "conn_per_s")}


def request_latency(netns: str, ip: str, port: int, count: int, seconds: float) -> dict[str, Any]:
    return S.request_latency(netns, ip, port, count, seconds, MSG)


def probe(netns: str, ip: str, port: int, timeout: float, sport: int = 0) -> bool:
    return S.probe(netns, ip, port, timeout, sport)


# ---- cluster -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.box = S.Sandbox("b")
        self.cluster = self.box.cluster
        self.start = time.monotonic()
        self.nodes: dict[str, N.NodeNet] = {}
        self.pods: dict[str, N.Endpoint] = {}
        self.spec = {name: (node, ip, ident, ep) for name, node, ip, ident, ep in PODS}

    def time_left(self) -> float:
        return HARD_DEADLINE - (time.monotonic() - self.start)

    def check_time(self) -> None:
        if self.time_left() <= 0:
            raise TimeoutError(f"benchmark exceeded {HARD_DEADLINE:.0f}s")

    # -- topology

    def build(self) -> None:
        for name, (ul, _) in NODES.items():
            self.nodes[name] = self.box.node(name, ul)
        for name in NODES:
            for other, (ul, cidr) in NODES.items():
                if other != name:
                    N.route_pod_cidr(self.cluster, name, cidr, ul.split("/")[0])
        for name, node, ip, _, _ in PODS:
            self.pods[name] = self.box.endpoint(node, name, ip)
        for _, server in PAIRS:
            self.box.server(self.pods[server].netns, PORT)
            self.box.server(self.pods[server].netns, SVC_PORT)

    def new_datapath(self, node: str, sizes: dict[str, int] | None, pin_node: str | None = None):
        return self.box.datapath(pin_node or node, self.nodes[node].netns, sizes)

    def endpoint_entry(self, pod: str, **flags: bool) -> M.Entry:
        node, ip, ident, ep_id = self.spec[pod]
        return M.endpoint_entry(self.pods[pod].host_ifindex, ep_id, ident, ip, **flags)

    def cleanup(self) -> list[str]:
        return self.box.cleanup()

    # -- 1. traffic

    def measure_traffic(self, config: str, targets: dict[str, tuple[str, int]],
                        rnd: int) -> list[dict[str, Any]]:
        rows = []
        client = self.pods[CLIENT].netns
        for pair, server in PAIRS:
            self.check_time()
            ip, port = targets[server]
            if not probe(client, ip, port, 2.0):
                raise RuntimeError(f"{config}/{pair}: {ip}:{port} unreachable from {CLIENT}")
            connection_rate(client, ip, port, WARMUP_CONNS, 2.0)  # warm-up, not recorded
            rate = connection_rate(client, ip, port, self.args.conns, self.args.conn_seconds)
            lat = request_latency(client, ip, port, self.args.rtts, self.args.rtt_seconds)
            row = {"config": config, "pair": pair, "round": rnd + 1, "target": f"{ip}:{port}",
                   **rate, **lat}
            rows.append(row)
            print(f"  {config:3} {pair:10} {row['conn_per_s']:>8} conn/s  p50 {row['p50_us']} us"
                  f"  p99 {row['p99_us']} us", flush=True)
        return rows

    def traffic(self) -> dict[str, Any]:
        direct = {server: (self.pods[server].ip, PORT) for _, server in PAIRS}
        vips = {s: VIPS[s][:2] for _, s in PAIRS}
        client_id = self.spec[CLIENT][2]
        load: dict[str, float] = {}
        dps = {}
        local = {node: [p for p, (n, *_r) in self.spec.items() if n == node and p != "pod-x"]
                 for node in NODES}
        for node in NODES:
            dp = self.new_datapath(node, SMALL_MAPS)
            load[node] = round(dp.load(), 3)
            dps[node] = dp
            entries = [self.endpoint_entry(p) for p in local[node]]
            entries += [M.ipcache_entry(f"{ip}/32", ident) for _, (_, ip, ident, _) in self.spec.items()]
            M.apply(dp.maps, entries)
        client_dp = dps[self.spec[CLIENT][0]]
        lb_entries: list[M.Entry] = []
        for backend_id, (_, server) in enumerate(PAIRS, start=1):
            vip, vport, rev = VIPS[server]
            lb_entries += [M.lb_backend_entry(backend_id, self.pods[server].ip, SVC_PORT, "tcp"),
                           M.lb_revnat_entry(rev, vip, vport)]
            lb_entries += M.lb_service_entries(vip, vport, "tcp", rev, [backend_id])

        def attach_all() -> None:
            for node, dp in dps.items():
                for p in local[node]:
                    dp.attach(self.pods[p].host_ifname)

        def detach_all() -> None:
            for node, dp in dps.items():
                for p in local[node]:
                    dp.detach(self.pods[p].host_ifname)

        def set_policy(enforce: bool) -> None:
            for _, server in PAIRS:
                M.apply(dps[self.spec[server][0]].maps,
                        [self.endpoint_entry(server, policy_ingress=enforce)])

        # Prove the policy lookup is on the path: with ingress enforced and no allow
        # entry, a connect must fail (DROP_POLICY, 133). Then add the allow entries,
        # which stay for every round (they are only consulted when the flag is set).
        attach_all()
        drop_before = {n: _metric(dps[n], L.DROP_POLICY, L.DIR_INGRESS) for n in NODES}
        set_policy(True)
        denied = {server: not probe(self.pods[CLIENT].netns, self.pods[server].ip, PORT, 1.0)
                  for _, server in PAIRS}
        drops = {n: _metric(dps[n], L.DROP_POLICY, L.DIR_INGRESS) - drop_before[n] for n in NODES}
        for _, server in PAIRS:
            M.apply(dps[self.spec[server][0]].maps,
                    [M.policy_entry(self.spec[server][2], client_id, PORT, "tcp", "ingress",
                                    rule_ref=7)])
        set_policy(False)

        # A service connection whose post-DNAT tuple equals a direct connection that
        # closed moments ago (same client port, backend port = the direct port).
        vip, vport, rev = REUSE_VIP
        reuse = [M.lb_backend_entry(3, self.pods["pod-b"].ip, PORT, "tcp"),
                 M.lb_revnat_entry(rev, vip, vport)]
        reuse += M.lb_service_entries(vip, vport, "tcp", rev, [3])
        M.apply(client_dp.maps, reuse)
        cns = self.pods[CLIENT].netns
        reuse_check = {
            "direct_from_40999": probe(cns, self.pods["pod-b"].ip, PORT, 1.0, sport=40999),
            "vip_from_40999_after_direct": probe(cns, vip, vport, 1.0, sport=40999),
            "vip_from_40997_fresh_port": probe(cns, vip, vport, 1.0, sport=40997),
        }
        M.remove(client_dp.maps, list(reversed(reuse)))
        detach_all()
        time.sleep(1.0)  # let the failed probes' retransmits die out

        samples: list[dict[str, Any]] = []
        service_ct = 0
        for rnd in range(self.args.rounds):
            print(f" round {rnd + 1}/{self.args.rounds}", flush=True)
            detach_all()
            samples += self.measure_traffic("a", direct, rnd)
            attach_all()
            samples += self.measure_traffic("b", direct, rnd)
            set_policy(True)
            samples += self.measure_traffic("c", direct, rnd)
            set_policy(False)
            M.apply(client_dp.maps, lb_entries)
            samples += self.measure_traffic("d", vips, rnd)
            service_ct = sum(1 for k in client_dp.maps.dump(L.CT) if k.flags & L.CT_KEY_F_SERVICE)
            M.remove(client_dp.maps, list(reversed(lb_entries)))
            detach_all()
            samples += self.measure_traffic("a2", direct, rnd)
        ct_entries = {n: len(dps[n].maps.dump(L.CT)) for n in NODES}
        lost = {n: dps[n].events_lost() for n in NODES}
        forwarded = {n: sum(v.packets for (r, _d), v in dps[n].metrics().items()
                            if r == L.REASON_FORWARDED) for n in NODES}
        drops_all = {n: {f"{r} {L.DROP_REASONS.get(r, '?')} {'ingress' if d == L.DIR_INGRESS else 'egress'}":
                     v.packets for (r, d), v in sorted(dps[n].metrics().items())
                     if r not in (L.REASON_FORWARDED, L.REASON_EVENT_LOST)} for n in NODES}
        for dp in dps.values():
            dp.close()

        rows = []
        for config in ("a", "b", "c", "d", "a2"):
            for pair, _ in PAIRS:
                mine = [x for x in samples if x["config"] == config and x["pair"] == pair]
                row = {"config": config, "pair": pair, "target": mine[0]["target"],
                       "rounds": len(mine),
                       "connections": sum(x["connections"] for x in mine),
                       "round_trips": sum(x["round_trips"] for x in mine)}
                for k in ("conn_per_s", "p50_us", "p99_us", "mean_us"):
                    row[k] = round(statistics.median(x[k] for x in mine), 1)
                rows.append(row)
        base = {r["pair"]: r for r in rows if r["config"] == "a"}
        for r in rows:
            b = base[r["pair"]]
            r["conn_ratio"] = round(r["conn_per_s"] / b["conn_per_s"], 3)
            r["p50_ratio"] = round(r["p50_us"] / b["p50_us"], 3)
            r["p99_ratio"] = round(r["p99_us"] / b["p99_us"], 3)
        return {
            "rows": rows,
            "samples": samples,
            "checks": {
                "policy_denied_without_allow": denied,
                "vip_after_direct_same_sport": reuse_check,
                "drop_policy_133_counted": drops,
                "service_ct_entries_on_client_node": service_ct,
                "ct_entries_after_run": ct_entries,
                "forwarded_packets": forwarded,
                "events_lost": lost,
                "drops_by_reason": drops_all,
            },
            "load_seconds_small_maps": load,
        }

    # -- 2. map updates

    def map_updates(self) -> dict[str, Any]:
        from services.node.datapath import MapSizes

        # default sizes: room for 10k entries in ipcache (512k) and policy (16k)
        dp = self.new_datapath("node-1", None, pin_node="maps")
        dp.load()
        ops = dp.maps
        sizes = MapSizes()
        n = self.args.entries
        sets = {
            L.IPCACHE: [M.ipcache_entry(f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}/32", 100000 + i)
                        for i in range(n)],
            L.POLICY: [M.policy_entry(2000 + i // 1000, 3000 + i, 80 + i % 7, "tcp", "ingress", rule_ref=i)
                       for i in range(n)],
        }
        rows = []
        samples: dict[tuple[str, str], list[float]] = {}
        for _rep in range(self.args.repeat):
            for map_name, entries in sets.items():
                items = [(e.key, e.value) for e in entries]
                methods = ["one-by-one", "update_batch", "reconciler"]
                if map_name == L.IPCACHE:
                    methods.append("kernel batch (raw bcc)")
                for method in methods:
                    self.check_time()
                    _clear(ops, map_name)
                    if method == "one-by-one":
                        t0 = time.perf_counter()
                        for k, v in items:
                            ops.update(map_name, k, v)
                        sec = time.perf_counter() - t0
                    elif method == "update_batch":
                        t0 = time.perf_counter()
                        ops.update_batch(map_name, items)
                        sec = time.perf_counter() - t0
                    elif method == "kernel batch (raw bcc)":
                        # what update_batch would do if it did not skip the LPM trie
                        t = ops._table(map_name)
                        t0 = time.perf_counter()
                        keys = (t.Key * n)(*(t.Key.from_buffer_copy(bytes(k)) for k, _ in items))
                        vals = (t.Leaf * n)(*(t.Leaf.from_buffer_copy(bytes(v)) for _, v in items))
                        t.items_update_batch(keys, vals)
                        sec = time.perf_counter() - t0
                    else:
                        rec = Reconciler(max_entries={L.IPCACHE: sizes.ipcache, L.POLICY: sizes.policy})
                        t0 = time.perf_counter()
                        rec.set_desired("bench", entries)
                        res = rec.reconcile(ops, now=0.0)
                        sec = time.perf_counter() - t0
                        if res.upserted != n or res.failed:
                            raise RuntimeError(f"reconciler: {res}")
                    got = len(ops.dump(map_name))
                    if got != n:
                        raise RuntimeError(f"{map_name}/{method}: {got} entries, expected {n}")
                    samples.setdefault((map_name, method), []).append(sec)
            # deletes, one by one (what delete_batch does), timed once per repeat
            for map_name, entries in sets.items():
                keys = [e.key for e in entries]
                t0 = time.perf_counter()
                ops.delete_batch(map_name, keys)
                samples.setdefault((map_name, "delete_batch (=one-by-one)"), []).append(
                    time.perf_counter() - t0)
        # does the kernel take batch updates on the LPM trie? (update_batch skips it)
        lpm_batch = _try_kernel_batch(dp, sets[L.IPCACHE][:256])
        _clear(ops, L.IPCACHE)
        for (map_name, method), secs in samples.items():
            sec = statistics.median(secs)
            rows.append({"map": map_name, "method": method, "entries": n,
                         "seconds": round(sec, 4), "entries_per_s": round(n / sec)})
        for map_name in sets:
            base = next(r for r in rows if r["map"] == map_name and r["method"] == "one-by-one")
            for r in rows:
                if r["map"] == map_name:
                    r["ratio"] = round(r["entries_per_s"] / base["entries_per_s"], 2)
        for map_name in sets:
            _clear(ops, map_name)
        dp.close()
        return {"rows": rows, "repeat": self.args.repeat,
                "kernel_batch_on_lpm_trie": lpm_batch}

    # -- 3. load time

    def load_times(self) -> dict[str, Any]:
        rows = []
        host_if = self.pods["pod-x"].host_ifname
        for label, sizes in (("small (e2e)", SMALL_MAPS), ("cilium default", None)):
            loads, attaches, reloads = [], [], []
            for _rep in range(self.args.load_repeat):
                self.check_time()
                pin = "load-small" if sizes else "load-default"
                dp = self.new_datapath("node-1", sizes, pin_node=pin)
                t0 = time.perf_counter()
                dp.load()
                t1 = time.perf_counter()
                dp.attach(host_if)
                t2 = time.perf_counter()
                loads.append(t1 - t0)
                attaches.append(t2 - t1)
                dp.close()
                # reload onto the existing pins (what a restarted agent does)
                dp2 = self.new_datapath("node-1", sizes, pin_node=pin)
                t0 = time.perf_counter()
                dp2.load()
                dp2.attach(host_if)
                reloads.append(time.perf_counter() - t0)
                dp2.close()
                dp.detach(host_if)
                dp.unpin()
            rows.append({"maps": label, "sizes": sizes or "MapSizes()",
                         "load_s": round(statistics.median(loads), 3),
                         "attach_ms": round(statistics.median(attaches) * 1000, 1),
                         "total_s": round(statistics.median(loads) + statistics.median(attaches), 3),
                         "reload_on_pins_s": round(statistics.median(reloads), 3),
                         "samples_load_s": [round(x, 3) for x in loads]})
        base = rows[0]
        for r in rows:
            r["ratio"] = round(r["total_s"] / base["total_s"], 2)
        return {"rows": rows, "repeat": self.args.load_repeat}


def _metric(dp, reason: int, direction: int) -> int:
    v = dp.metrics().get((reason, direction))
    return v.packets if v is not None else 0


def _clear(ops: M.BccMapOps, map_name: str) -> None:
    ops.delete_batch(map_name, list(ops.dump(map_name)))


def _try_kernel_batch(dp, entries: list[M.Entry]) -> str:
    t = dp.maps._table(L.IPCACHE)
    keys = (t.Key * len(entries))(*(t.Key.from_buffer_copy(bytes(e.key)) for e in entries))
    vals = (t.Leaf * len(entries))(*(t.Leaf.from_buffer_copy(bytes(e.value)) for e in entries))
    _clear(dp.maps, L.IPCACHE)
    try:
        t.items_update_batch(keys, vals)
    except Exception as e:
        return f"unsupported ({type(e).__name__}: {str(e).strip()[:80]})"
    got = dp.maps.dump(L.IPCACHE)
    ok = len(got) == len(entries) and all(got.get(e.key) == e.value for e in entries)
    return "supported, entries verified" if ok else f"call succeeded but {len(got)}/{len(entries)} entries match"


# ---- output ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", "?")
    except Exception:
        bcc_version = "?"
    return {**S.machine(), "bcc": bcc_version}


def _x(v: float) -> str:
    return f"{v:.2f}x"


def render(res: dict[str, Any]) -> str:
    out = []
    names = {"a": "baseline (no program)", "b": "datapath, no policy", "c": "datapath + ingress policy",
             "d": "datapath + service VIP", "a2": "baseline again (detached)"}
    t = res["traffic"]["rows"]
    rounds = res["params"]["traffic_rounds"]
    out.append(f"Pod-to-pod TCP, median of {rounds} round(s) a,b,c,d,a2 "
               "(ratios vs baseline a of the same pair)")
    out.append(output.table(
        ["config", "pair", "conn/s", "ratio", "p50 us", "ratio", "p99 us", "ratio", "conns", "rtts"],
        [[f"{r['config']} {names[r['config']]}", r["pair"], r["conn_per_s"], _x(r["conn_ratio"]),
          r["p50_us"], _x(r["p50_ratio"]), r["p99_us"], _x(r["p99_ratio"]), r["connections"],
          r["round_trips"]] for r in t]))
    m = res["map_updates"]["rows"]
    out.append("")
    out.append(f"Map updates, {m[0]['entries']} entries (median of {res['map_updates']['repeat']}; "
               "ratio vs one-by-one)")
    out.append(output.table(["map", "method", "seconds", "entries/s", "ratio"],
                            [[r["map"], r["method"], r["seconds"], r["entries_per_s"], _x(r["ratio"])]
                             for r in m]))
    ld = res["load"]["rows"]
    out.append("")
    out.append(f"Program load (median of {res['load']['repeat']}; ratio vs small maps)")
    out.append(output.table(["maps", "compile+verify s", "attach ms", "total s", "ratio",
                             "reload on pins s"],
                            [[r["maps"], r["load_s"], r["attach_ms"], r["total_s"], _x(r["ratio"]),
                              r["reload_on_pins_s"]] for r in ld]))
    ch = res["traffic"]["checks"]
    out.append("")
    out.append("Checks: " + "; ".join(f"{k}={v}" for k, v in ch.items()))
    out.append(f"Kernel batch update on the LPM trie: {res['map_updates']['kernel_batch_on_lpm_trie']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sanity run")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the benchmark's threads to one CPU")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results file (default {RESULTS.relative_to(REPO)}; --quick: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.conns, args.conn_seconds, args.rtts, args.rtt_seconds = 200, 2.0, 500, 2.0
        args.entries, args.repeat, args.rounds, args.load_repeat = 2000, 1, 1, 1
    else:
        args.conns, args.conn_seconds, args.rtts, args.rtt_seconds = 2000, 10.0, 5000, 20.0
        args.entries, args.repeat, args.rounds, args.load_repeat = MAP_ENTRIES, 3, 5, 5
    if os.geteuid() != 0:
        print("needs root (namespaces, bpf)", file=sys.stderr)
        return 2

    S.install_sigterm()
    pinned_cpu = None
    if not args.no_pin:
        pinned_cpu = S.pin_one_cpu()
    bench = Bench(args)
    print(f"cluster {bench.cluster}: namespaces ciliary-{bench.cluster}-*, pins "
          f"{PIN_ROOT}/{bench.cluster}", flush=True)
    res: dict[str, Any] = {
        "command": ".venv/bin/python bench/datapath.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "params": {"connections": args.conns, "connection_seconds": args.conn_seconds,
                   "round_trips": args.rtts, "message_bytes": len(MSG),
                   "map_entries": args.entries, "map_repeat": args.repeat,
                   "load_repeat": args.load_repeat,
                   "traffic_rounds": args.rounds, "pinned_cpu": pinned_cpu,
                   "warmup_connections": WARMUP_CONNS,
                   "small_maps": SMALL_MAPS},
    }
    t_start = time.monotonic()
    try:
        bench.build()
        print("traffic", flush=True)
        res["traffic"] = bench.traffic()
        print("map updates", flush=True)
        res["map_updates"] = bench.map_updates()
        print("program load", flush=True)
        res["load"] = bench.load_times()
    finally:
        problems = bench.cleanup()
        if problems:
            print("cleanup problems: " + "; ".join(problems), file=sys.stderr)
    res["wall_seconds"] = round(time.monotonic() - t_start, 1)
    res["cleanup"] = {"namespaces_left": N.cluster_netns(bench.cluster),
                      "pins_left": Path(PIN_ROOT, bench.cluster).exists()}
    print()
    print(render(res))
    dest = args.output or (None if args.quick else RESULTS)
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {dest}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
