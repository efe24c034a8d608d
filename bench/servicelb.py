"""Service load balancing head-to-head: ciliary's eBPF lb maps vs kube-proxy iptables mode.

Builds one throw-away cluster ``k<4 hex>`` (namespaces ``ciliary-k<hex>-...``, pins under
``/sys/fs/bpf/ciliary/k<hex>``) with three identical node namespaces, each with a client pod
and three backend pods (echo servers on 8080):

  cil   ciliary: bpf_lxc attached to the four host veths, N services x 3 backends in the
        lb4 maps; no iptables rule at all in the namespace
  nft   kube-proxy's ruleset (bench/kubeproxy_rules.py) loaded with iptables-nft-restore
  leg   the same ruleset loaded with iptables-legacy-restore

Every iptables rule goes into these node namespaces (the restore runs in a child that
joined the namespace); nothing is created in the root namespace and no packet is addressed
outside the sandbox (cluster IPs of the services that are never probed point at unrouted
10.208.x.x backends, and no packet is ever sent to them). Everything is removed at the end.

For N in 100, 1,000, 5,000, 10,000 services (3 endpoints each; --quick: 100, 1,000):
1. initial load of the N services (ciliary: one batched map write; iptables: full restore);
2. one service change with N services present: the third endpoint of one service is
   replaced (alternating), measured until the kernel holds it —
   ciliary "map": backends + slots + slot 0 written with BccMapOps.update_batch, the old
   backend deleted, then the new slot read back with a map lookup;
   ciliary "reconciler": the node executor's path (Reconciler.set_desired for the service's
   owner with N owners in the table, reconcile, lookup);
   iptables "full": the complete regenerated ruleset with ``iptables-restore --noflush
   --counters`` (what kube-proxy runs on a full sync; stale SEP chain deleted unless in
   large-cluster mode); "partial": kube-proxy's MinimizeIPTablesRestore sync (KUBE-SERVICES
   in full + only the changed service's chains). Ruleset generation time is not included
   (it is Go in kube-proxy; reported separately);
3. connection setup from the client pod to the VIP of the first, middle and last service
   (same three backend pods, a backend port per service and N, 8100 and up): connect() latency
   p50/p99 and sequential connections/s (connect + 32-byte request/response + close), all
   threads pinned to one CPU; rounds interleave the three modes (rotating who goes first)
   and each cell is the median over rounds;
4. memory: ciliary = kernel ``memlock`` of the three lb4 maps (fdinfo; hash maps are
   preallocated, so this is fixed by max_entries = 65,536) plus the payload bytes
   (entries x (key + value)); iptables = /proc/meminfo kernel delta (Slab + VmallocUsed +
   Percpu) around the initial restore into the flushed namespace (machine-wide counters:
   noisy, other processes contribute) and, for legacy, the exact rule blob size the kernel
   reports (IPT_SO_GET_INFO ``size`` of nat + filter), plus the iptables-save text size.
5. at the smallest N, a shared-backend check: the three probed services point at the same
   backends *and port*, and the client's TCP counters (SYN retransmits, resets sent) and the
   backends' changed TCP counters (PAWSTimewait ...) are compared per mode (see
   shared_backend_check and docs/servicelb.md);
6. ciliary through its whole control plane, for N up to --kv-max (run first, before this
   process loads bcc for the sandbox part: see main): a throw-away embedded instance (``ciliary up -d --nodes 1``, own
   data dir, cluster ``k<4 hex>``), the same N services as selector-less Services with one
   manual EndpointSlice each (backends at unrouted 10.208.x.x addresses, never probed, no
   packet sent), loaded with one ``ciliary apply -f`` of a generated multi-document file;
   then --kv-reps times one EndpointSlice change (the third backend replaced) written through
   the store API, timed from the KV write until the new backend is in one of the frontend's
   slots in the node's pinned lb4 maps, read directly from the pins with bpf(2) lookups;
   servicelb's CPU time per change (from /proc); then ``BURSTS`` bursts: one apply changing the
   slices of ``BURST`` services at once, timed until every new backend is in the kernel; the
   RSS (now and peak) of every process of the instance after the load and at the end;
   ``ciliary down`` at the end, also on error. ``--kv-sizes`` picks other N for this part
   (e.g. 50000; the lb maps are raised above Cilium's 65,536 entries when N needs it).

Usage: .venv/bin/python bench/servicelb.py [--quick] [--kv-only] [--kv-max N] [--kv-sizes N,...]
Writes bench/results/servicelb.json and servicelb.png (not with --quick unless --output); a
``supplementary`` block of an earlier run in that file is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import kubeproxy_rules as K  # noqa: E402
import sandbox as S  # noqa: E402

from ciliary import output  # noqa: E402
from services.node import layouts as L  # noqa: E402
from services.node import maps as M  # noqa: E402
from services.node import netns as N  # noqa: E402
from services.node.reconciler import Reconciler  # noqa: E402

RESULTS = REPO / "bench" / "results" / "servicelb.json"
PLOT = REPO / "bench" / "results" / "servicelb.png"
PIN_ROOT = S.PIN_ROOT
LB_MAPS = (L.LB4_SERVICES, L.LB4_BACKENDS, L.LB4_REVERSE_NAT)
# Cilium's default sizes for lb (65,536: room for 10,000 services x (3 slots + slot 0)) and
# conntrack (1M: the benchmark opens ~30,000 connections per N, three entries each, which would
# fill the e2e tests' 65,536-entry LRU map and make it evict); small maps for the rest.
MAP_SIZES = dict(ipcache=4096, lxc=1024, policy=1024, ct=1048576, lb=65536, metrics=256, events_pages=64)
MODES = {  # node name -> (underlay, pod /24 third octet, restore binary or None)
    "cil": ("172.31.9.1/24", 1, None),
    "nft": ("172.31.9.2/24", 2, "/usr/sbin/iptables-nft-restore"),
    "leg": ("172.31.9.3/24", 3, "/usr/sbin/iptables-legacy-restore"),
}
MODE_NAMES = {"cil": "ciliary (eBPF)", "nft": "kube-proxy iptables-nft", "leg": "kube-proxy iptables-legacy"}
BACKENDS = ("b1", "b2", "b3")
VIP_PORT, TARGET_PORT = 80, 8080
# The probed services reach the same three backend pods, each on a port of its own, new for
# every N, so that the traffic numbers of one service are never influenced by conntrack
# entries of another (see shared_backend_check for what happens when they share one).
POSITIONS = ("first", "middle", "last")
MAX_SIZES = 4


def position_port(size_index: int, pos: str) -> int:
    return 8100 + 3 * size_index + POSITIONS.index(pos)


HARD_DEADLINE = 870.0  # seconds; the full run of the sandbox part must stay < 15 min
_libc = ctypes.CDLL(None, use_errno=True)


# ---- kernel helpers ------------------------------------------------------------------------


def kernel_mem_kb() -> int:
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            vals[k] = int(v.split()[0])
    return vals["Slab"] + vals["VmallocUsed"] + vals.get("Percpu", 0)


def memlock(table) -> int:
    with open(f"/proc/self/fdinfo/{table.map_fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def legacy_blob_bytes(netns: str) -> dict[str, int]:
    """IPT_SO_GET_INFO of nat and filter: the kernel's rule blob size and entry count."""

    def get() -> dict[str, int]:
        out = {}
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for table in ("nat", "filter"):
                buf = ctypes.create_string_buffer(84)
                buf.raw = table.encode().ljust(84, b"\0")
                ln = ctypes.c_uint32(84)
                if _libc.getsockopt(s.fileno(), 0, 64, buf, ctypes.byref(ln)) != 0:  # SOL_IP, IPT_SO_GET_INFO
                    raise OSError(ctypes.get_errno(), "IPT_SO_GET_INFO")
                num_entries, size = ctypes.c_uint32.from_buffer_copy(buf.raw, 76).value, \
                    ctypes.c_uint32.from_buffer_copy(buf.raw, 80).value
                out[f"{table}_entries"] = num_entries
                out[f"{table}_bytes"] = size
        finally:
            s.close()
        return out

    return N.run_in_netns(netns, get)


# ---- benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.box = S.Sandbox("k")
        self.cluster = self.box.cluster
        self.tmp = self.box.tmp
        self.start = time.monotonic()
        self.nodes: dict[str, N.NodeNet] = {}
        self.pods: dict[tuple[str, str], N.Endpoint] = {}
        self.dp = None
        self.bpf_source = "?"

    def check_time(self) -> None:
        if time.monotonic() - self.start > self.args.deadline:
            raise TimeoutError(f"benchmark exceeded {self.args.deadline:.0f}s")

    def pod_ip(self, mode: str, pod: str) -> str:
        octet = MODES[mode][1]
        return f"10.200.{octet}.{ {'client': 10, 'b1': 11, 'b2': 12, 'b3': 13}[pod] }"

    def build(self) -> None:
        for mode, (ul, _, _) in MODES.items():
            self.nodes[mode] = self.box.node(mode, ul)
            for pod in ("client", *BACKENDS):
                self.pods[(mode, pod)] = self.box.endpoint(mode, pod, self.pod_ip(mode, pod))
            for b in BACKENDS:
                ports = [TARGET_PORT] + [position_port(k, p) for k in range(MAX_SIZES) for p in POSITIONS]
                for port in ports:
                    self.box.server(self.pods[(mode, b)].netns, port)

    def load_datapath(self) -> float:
        self.dp = self.box.datapath("cil", self.nodes["cil"].netns, MAP_SIZES)
        try:
            sec = self.dp.load()
            self.bpf_source = "working tree"
        except Exception as e:
            # The working tree's bpf/ may be mid-edit; fall back to the committed sources.
            if self.args.bpf_source != "auto":
                raise
            print(f"datapath from the working tree does not load ({str(e)[:120]}); using bpf/ at HEAD",
                  flush=True)
            self.dp.close()
            self.dp.unpin()
            self.bpf_source = self.box.use_bpf_at_head()
            self.dp = self.box.datapath("cil", self.nodes["cil"].netns, MAP_SIZES)
            sec = self.dp.load()
        entries = []
        for i, pod in enumerate(("client", *BACKENDS)):
            ep = self.pods[("cil", pod)]
            self.dp.attach(ep.host_ifname)
            entries.append(M.endpoint_entry(ep.host_ifindex, 100 + i, 1000 + i, ep.ip))
            entries.append(M.ipcache_entry(f"{ep.ip}/32", 1000 + i))
        M.apply(self.dp.maps, entries)
        return sec

    def cleanup(self) -> list[str]:
        return self.box.cleanup()

    # -- services

    def reps(self, n: int) -> int:
        """One-service-change repetitions (fewer at N >= 5,000: a full nft restore takes seconds)."""
        return self.args.update_reps if n <= 1000 else max(2, self.args.update_reps - 2)

    def positions(self, n: int) -> dict[str, int]:
        return {"first": 0, "middle": n // 2, "last": n - 1}

    @staticmethod
    def vip(idx: int) -> str:
        return K.synthetic_services(idx + 1)[idx].cluster_ip

    def churn_index(self, n: int) -> int:
        return n // 2 + 1 if n > 2 else 0

    def services(self, mode: str, n: int, churn_variant: int = 0, shared: bool = False) -> list[K.ServicePort]:
        """The N services; the probed ones (first/middle/last) reach the real backend pods, on
        their own port each (``shared``: all on 8080, to reproduce the shared-tuple bug)."""
        real = [self.pod_ip(mode, b) for b in BACKENDS]
        svcs = K.synthetic_services(n)
        for pos, i in self.positions(n).items():
            port = TARGET_PORT if shared else position_port(self.args.sizes.index(n), pos)
            s = svcs[i]
            svcs[i] = K.ServicePort(s.namespace, s.name, s.cluster_ip, s.port, tuple((ip, port) for ip in real),
                                    s.port_name, s.protocol)
        if churn_variant:
            c = self.churn_index(n)
            s = svcs[c]
            eps = list(s.endpoints)
            eps[2] = (f"10.209.{churn_variant}.{c % 250 + 1}", TARGET_PORT)
            svcs[c] = K.ServicePort(s.namespace, s.name, s.cluster_ip, s.port, tuple(eps), s.port_name, s.protocol)
        return svcs

    @staticmethod
    def lb_entries(svc_index: int, svc: K.ServicePort, backend_ids: list[int]) -> list[M.Entry]:
        out = [M.lb_backend_entry(bid, ip, port, "tcp") for bid, (ip, port) in zip(backend_ids, svc.endpoints, strict=True)]
        out.append(M.lb_revnat_entry(svc_index + 1, svc.cluster_ip, svc.port))
        out += M.lb_service_entries(svc.cluster_ip, svc.port, "tcp", svc_index + 1, backend_ids)
        return out

    # -- ciliary

    def ciliary(self, n: int) -> dict[str, Any]:
        ops = self.dp.maps
        for name in LB_MAPS:  # empty the lb maps (previous N)
            ops.delete_batch(name, list(ops.dump(name)))
        svcs = self.services("cil", n)
        ids = {i: [3 * i + 1, 3 * i + 2, 3 * i + 3] for i in range(n)}
        per_svc = [self.lb_entries(i, s, ids[i]) for i, s in enumerate(svcs)]
        flat = [e for es in per_svc for e in es]
        time.sleep(0.3)
        mem0 = kernel_mem_kb()
        t0 = time.perf_counter()
        M.apply(ops, flat)
        initial = time.perf_counter() - t0
        mem1 = kernel_mem_kb()
        counts = {name: len(ops.dump(name)) for name in LB_MAPS}
        assert counts[L.LB4_SERVICES] == 4 * n and counts[L.LB4_BACKENDS] == 3 * n, counts
        tables = {name: ops._table(name) for name in LB_MAPS}
        payload = sum(cnt * (ctypes.sizeof(L.MAPS[name][0]) + ctypes.sizeof(L.MAPS[name][1]))
                      for name, cnt in counts.items())

        c = self.churn_index(n)
        svc_t = tables[L.LB4_SERVICES]
        slot3 = L.Lb4Key(address=L.ip4(svcs[c].cluster_ip), dport=L.port(VIP_PORT), backend_slot=3,
                         proto=L.IPPROTO_TCP)
        key3 = svc_t.Key.from_buffer_copy(bytes(slot3))
        be_t = tables[L.LB4_BACKENDS]

        def confirm(bid: int) -> None:
            got = svc_t[key3].backend_id
            if got != bid or be_t[be_t.Key(bid)].port == 0:
                raise RuntimeError(f"lookup after update: slot 3 = {got}, expected {bid}")

        # raw map path: new backend id per replacement (as servicelb hands out), old one deleted
        raw = []
        next_id = 3 * n + 1
        cur = list(ids[c])
        for rep in range(self.reps(n)):
            variant = 1 + rep % 2
            new_svc = self.services("cil", n, variant)[c]
            new_ids = cur[:2] + [next_id]
            next_id += 1
            entries = self.lb_entries(c, new_svc, new_ids)
            t0 = time.perf_counter()
            M.apply(ops, entries)
            ops.delete(L.LB4_BACKENDS, L.Lb4BackendKey(backend_id=cur[2]))
            confirm(new_ids[2])
            raw.append(time.perf_counter() - t0)
            cur = new_ids
        # restore the service, then the reconciler path with N owners in the table
        M.apply(ops, per_svc[c])
        ops.delete(L.LB4_BACKENDS, L.Lb4BackendKey(backend_id=cur[2]))
        rec = Reconciler(max_entries={name: MAP_SIZES["lb"] for name in LB_MAPS})
        t0 = time.perf_counter()
        rec.restore(ops, maps=LB_MAPS)
        for i, es in enumerate(per_svc):
            rec.set_desired(f"lb:svc-{i}", es)
        res = rec.reconcile(ops, now=0.0)
        rec_sync = time.perf_counter() - t0
        if res.failed or res.upserted:
            raise RuntimeError(f"reconciler resync after restore wrote {res}")
        recon = []
        cur = list(ids[c])
        for rep in range(self.reps(n)):
            variant = 1 + rep % 2
            new_svc = self.services("cil", n, variant)[c]
            new_ids = cur[:2] + [next_id]
            next_id += 1
            t0 = time.perf_counter()
            rec.set_desired(f"lb:svc-{c}", self.lb_entries(c, new_svc, new_ids))
            r = rec.reconcile(ops, now=float(rep + 1))
            confirm(new_ids[2])
            recon.append(time.perf_counter() - t0)
            if r.failed:
                raise RuntimeError(f"reconcile: {r}")
            cur = new_ids
        rec.set_desired(f"lb:svc-{c}", per_svc[c])
        rec.reconcile(ops, now=1000.0)
        return {
            "initial_load_s": round(initial, 4),
            "update_map_ms": S.ms_stats(raw),
            "update_reconciler_ms": S.ms_stats(recon),
            "reconciler_restore_and_noop_sync_s": round(rec_sync, 3),
            "entries": counts,
            "memory": {"lb_maps_memlock_bytes": sum(memlock(t) for t in tables.values()),
                       "lb_maps_memlock_by_map": {k: memlock(t) for k, t in tables.items()},
                       "payload_bytes": payload,
                       "kernel_mem_delta_kb": mem1 - mem0},
        }

    # -- iptables

    def restore(self, mode: str, text: str, noflush: bool = True) -> float:
        path = os.path.join(self.tmp, f"{mode}.rules")
        with open(path, "w") as f:
            f.write(text)
        argv = [MODES[mode][2]] + (["--noflush", "--counters"] if noflush else [])
        sec, _ = S.run_in(self.nodes[mode].netns, argv, path)
        return sec

    def save(self, mode: str) -> bytes:
        binary = MODES[mode][2].replace("-restore", "-save")
        return S.run_in(self.nodes[mode].netns, [binary], capture=True)[1]

    def iptables(self, mode: str, n: int) -> dict[str, Any]:
        self.restore(mode, K.flush_input(), noflush=False)
        self.restore(mode, K.bootstrap_input())
        svcs = self.services(mode, n)
        t0 = time.perf_counter()
        text = K.restore_input(svcs)
        gen = time.perf_counter() - t0
        time.sleep(0.5)
        mem0 = kernel_mem_kb()
        initial = self.restore(mode, text)
        mem1 = kernel_mem_kb()
        saved = self.save(mode)
        blob = legacy_blob_bytes(self.nodes[mode].netns) if mode == "leg" else None
        large = K.build(svcs).large_cluster_mode

        c = self.churn_index(n)
        full, partial = [], []
        prev = svcs
        # a full nft restore of 10,000 services takes tens of seconds on this VM: one sample each
        reps = self.reps(n) if initial < 3.0 else 1
        for rep in range(reps):
            variant = 1 + rep % 2
            new = self.services(mode, n, variant)
            stale = [] if large else [x for x in K.service_chains(prev[c]) if x not in K.service_chains(new[c])]
            full.append(self.restore(mode, K.restore_input(new, stale_chains=stale)))
            prev = new
        for rep in range(reps):
            variant = 1 + (reps + rep) % 2  # continues the alternation of the full syncs
            new = self.services(mode, n, variant)
            partial.append(self.restore(mode, K.restore_input(new, changed=[new[c].port_name_string])))
            prev = new
        # (the probed services are untouched by the churn, so no restore back is needed)
        cnt = K.counts(text)
        return {
            "initial_load_s": round(initial, 4),
            "generate_s": round(gen, 4),
            "update_full_ms": S.ms_stats(full),
            "update_partial_ms": S.ms_stats(partial),
            "large_cluster_mode": large,
            "rules": {"nat_chains": cnt["nat"]["chains"], "nat_rules": cnt["nat"]["rules"],
                      "filter_rules": cnt["filter"]["rules"], "restore_input_bytes": len(text),
                      "iptables_save_bytes": len(saved)},
            "memory": {"kernel_mem_delta_load_kb": mem1 - mem0,
                       **({"legacy_blob": blob} if blob else {})},
        }

    def flush_memory(self, mode: str) -> int:
        """Kernel memory freed by flushing the ruleset (second estimate; kB)."""
        time.sleep(0.3)
        before = kernel_mem_kb()
        self.restore(mode, K.flush_input(), noflush=False)
        time.sleep(1.0)  # nf_tables frees through RCU
        return before - kernel_mem_kb()

    def shared_backend_check(self, n: int) -> dict[str, Any]:
        """The first/middle/last services all reach the same backends on the same port, and
        the client connects to them one after the other. A new connection whose client port
        was used moments ago towards *another* VIP has, after DNAT, the same tuple as a
        connection the backend has just closed (and holds in TIME_WAIT). Counted per mode:
        the client's SYN retransmits and resets, and the backends' TCP counters that changed
        (PAWSTimewait: the backend's TIME_WAIT rejected the SYN)."""
        out: dict[str, Any] = {}
        ops = self.dp.maps
        shared = {mode: self.services(mode, n, shared=True) for mode in MODES}
        for i in self.positions(n).values():
            M.apply(ops, self.lb_entries(i, shared["cil"][i], [3 * i + 1, 3 * i + 2, 3 * i + 3]))
        for mode in ("nft", "leg"):
            self.restore(mode, K.restore_input(shared[mode]))
        for mode in MODES:
            client = self.pods[(mode, "client")].netns
            before = S.tcp_counters(client)
            srv_before = [S.tcp_counters(self.pods[(mode, b)].netns, every=True) for b in BACKENDS]
            rows = []
            for _rnd in range(2):
                for pos, idx in self.positions(n).items():
                    self.check_time()
                    r = S.connections(client, self.vip(idx), VIP_PORT, 1000, 5.0)
                    rows.append({"pos": pos, "conn_per_s": r["conn_per_s"], "connections": r["connections"],
                                 "connect_p99_us": r["connect_p99_us"]})
            after = S.tcp_counters(client)
            srv_after = [S.tcp_counters(self.pods[(mode, b)].netns, every=True) for b in BACKENDS]
            server = {}
            for b_before, b_after in zip(srv_before, srv_after, strict=True):
                for k, v in b_after.items():
                    if v != b_before.get(k, 0):
                        server[k] = server.get(k, 0) + v - b_before.get(k, 0)
            out[mode] = {"counters": {k: after[k] - before.get(k, 0) for k in after},
                         "backend_counters_changed": dict(sorted(server.items())),
                         "connections": sum(r["connections"] for r in rows),
                         "conn_per_s_median": statistics.median(r["conn_per_s"] for r in rows), "runs": rows}
        # back to the per-position ports
        normal = self.services("cil", n)
        for i in self.positions(n).values():
            M.apply(ops, self.lb_entries(i, normal[i], [3 * i + 1, 3 * i + 2, 3 * i + 3]))
        return out

    def traffic(self, n: int, modes: list[str]) -> dict[str, dict[str, Any]]:
        """Rounds of (position x mode), interleaved so background load hits every mode alike;
        per cell the median over rounds of p50, p99 and conn/s."""
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        order = list(modes)
        for mode in order:  # settle each client once before the timed rounds
            S.connections(self.pods[(mode, "client")].netns, self.vip(0), VIP_PORT, self.args.warmup, 2.0)
        for rnd in range(self.args.rounds):
            for p_i, (pos, idx) in enumerate(self.positions(n).items()):
                vip = self.vip(idx)
                k = (rnd * 3 + p_i) % len(order)  # rotate: no mode is always measured first
                for mode in order[k:] + order[:k]:
                    self.check_time()
                    client = self.pods[(mode, "client")].netns
                    if rnd == 0:
                        if not S.probe(client, vip, VIP_PORT):
                            raise RuntimeError(f"{mode} N={n}: {pos} service {vip}:{VIP_PORT} unreachable")
                    S.connections(client, vip, VIP_PORT, self.args.warmup, 2.0)
                    before = S.tcp_counters(client)
                    row = S.connections(client, vip, VIP_PORT, self.args.conns, self.args.conn_seconds)
                    after = S.tcp_counters(client)
                    row["syn_retrans"] = after["TCPSynRetrans"] - before["TCPSynRetrans"]
                    row["resets_sent"] = after["OutRsts"] - before["OutRsts"]
                    samples.setdefault((mode, pos), []).append(row)
        out: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
        for (mode, pos), rows in samples.items():
            idx = self.positions(n)[pos]
            out[mode][pos] = {"vip": self.vip(idx), "index": idx,
                              "rounds": len(rows), "connections": sum(r["connections"] for r in rows)}
            for k in ("conn_per_s", "connect_p50_us", "connect_p99_us"):
                out[mode][pos][k] = round(statistics.median(r[k] for r in rows), 1)
            out[mode][pos]["syn_retrans"] = sum(r["syn_retrans"] for r in rows)
            out[mode][pos]["resets_sent"] = sum(r["resets_sent"] for r in rows)
            out[mode][pos]["samples"] = rows
        return out


# ---- ciliary through its control plane: KV write -> pinned map -------------------------------

KV_NODE = "node-1"
BURST = 100  # services changed by one apply in the burst measurement
BURSTS = 5


def kv_service_doc(svc: K.ServicePort) -> str:
    """A selector-less Service with its cluster IP requested (one named TCP port)."""
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {svc.name}, namespace: {svc.namespace}}}\n"
            f"spec:\n  clusterIP: {svc.cluster_ip}\n  ports:\n"
            f"  - {{name: {svc.port_name}, port: {svc.port}, protocol: {svc.protocol}}}\n")


def kv_slice_doc(svc: K.ServicePort) -> str:
    """The Service's one manual EndpointSlice (``<name>-1``) listing its endpoints."""
    port = svc.endpoints[0][1]
    eps = "".join(f"- addresses: [{ip}]\n" for ip, _ in svc.endpoints)
    return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc.name}-1\n"
            f"  namespace: {svc.namespace}\n  labels: {{kubernetes.io/service-name: {svc.name}}}\n"
            f"addressType: IPv4\nports:\n- {{name: {svc.port_name}, port: {port}, protocol: {svc.protocol}}}\n"
            f"endpoints:\n{eps}")


def kv_manifests(svcs: list[K.ServicePort]) -> str:
    """One multi-document file: the namespace, then per service its Service and slice."""
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {svcs[0].namespace}}}\n"]
    for svc in svcs:
        docs += [kv_service_doc(svc), kv_slice_doc(svc)]
    return "---\n".join(docs)


async def _kv_churn(inst: S.EmbeddedInstance, svc: K.ServicePort, reps: int,
                    fe: S.KernelFrontend) -> list[tuple[float, float, float]]:
    """``reps`` times: replace one endpoint of ``svc``'s slice through the store API. Per
    change, seconds from just before the write until (a) the KV write was acknowledged,
    (b) the new backend is in one of the frontend's slots in the kernel and (c) servicelb's
    ``services`` row holding it reached a watch beside the benchmark's (NaN when the row was
    not seen before the kernel had it). (c) splits (b) into servicelb's part and the node
    executor's. Restores the original slice at the end (and waits until the kernel has it
    back)."""
    from ciliary.kv import SYNCED
    from ciliary.resources.loader import loads
    from ciliary.schema import names
    from ciliary.schema.servicelb import lb_frontend_key
    from ciliary.store import ResourceStore

    bus = await inst.connect("bench-servicelb", allow_reconnect=False)
    row_seen: dict[str, float] = {}  # backend ip -> perf_counter when a row with it arrived

    async def follow_row() -> None:
        key = lb_frontend_key(svc.cluster_ip, svc.port, "TCP")
        async for entry in bus.watch(names.BUCKET_SERVICES, key):
            if entry is not SYNCED and entry.value:
                now = time.perf_counter()
                for ip in re.findall(rb"\d+\.\d+\.\d+\.\d+", entry.value):
                    row_seen.setdefault(ip.decode(), now)

    watcher = asyncio.create_task(follow_row())
    try:
        store = ResourceStore(bus)
        old_ip = svc.endpoints[2][0]
        out = []
        for rep in range(reps):
            new_svc, new_ip = K.replace_endpoint(svc, rep)
            resources = loads(kv_slice_doc(new_svc), "<bench>")
            row_seen.clear()  # only rows written for this change count
            # the kernel is polled from the moment the write starts: a late acknowledgement
            # does not delay when the kernel is seen holding the change
            in_kernel = asyncio.create_task(fe.wait(lambda addrs, ip=new_ip: ip in addrs, 60, f"backend {new_ip}"))
            t0 = time.perf_counter()
            await store.apply(resources)
            t_ack = time.perf_counter()
            t_seen = await in_kernel
            if new_ip not in row_seen:  # the kernel was polled first: give the watch a moment
                await asyncio.sleep(0.05)
            t_row = row_seen.get(new_ip, float("nan"))
            out.append((t_ack - t0, t_seen - t0, t_row - t0))
            await fe.wait(lambda addrs, ip=old_ip: ip not in addrs, 60, f"removal of {old_ip}", poll=0.005)
            old_ip = new_ip
            await asyncio.sleep(0.2)  # let servicelb and the executor go idle again
        await store.apply(loads(kv_slice_doc(svc), "<bench>"))
        await fe.wait(lambda addrs: svc.endpoints[2][0] in addrs, 60, "the original slice")
        return out
    finally:
        watcher.cancel()
        await bus.close()


async def _kv_bursts(inst: S.EmbeddedInstance, svcs: list[K.ServicePort], size: int,
                     bursts: int) -> list[tuple[float, float]]:
    """``bursts`` times: one ``apply`` that replaces the third endpoint of ``size`` services at
    once. Per burst, seconds from just before the write until (a) the apply returned and (b)
    every one of the new backends is in its frontend's slots in the kernel."""
    from ciliary.resources.loader import loads
    from ciliary.store import ResourceStore

    bus = await inst.connect("bench-servicelb-burst", allow_reconnect=False)
    fes = {svc.name: S.KernelFrontend(inst, KV_NODE, svc.cluster_ip, svc.port) for svc in svcs[:size]}
    try:
        store = ResourceStore(bus)
        out = []
        for burst in range(bursts):
            changed = [K.replace_endpoint(svc, 1000 + burst * size + i) for i, svc in enumerate(svcs[:size])]
            resources = loads("---\n".join(kv_slice_doc(new) for new, _ in changed), "<bench>")
            t0 = time.perf_counter()
            await store.apply(resources)
            t_ack = time.perf_counter()
            t_seen = t_ack
            for (new, ip) in changed:
                t_seen = max(t_seen, await fes[new.name].wait(lambda addrs, ip=ip: ip in addrs, 120,
                                                              f"burst backend {ip}"))
            out.append((t_ack - t0, t_seen - t0))
            await asyncio.sleep(0.5)
        await store.apply(loads("---\n".join(kv_slice_doc(svc) for svc in svcs[:size]), "<bench>"))
        return out
    finally:
        for fe in fes.values():
            fe.close()
        await bus.close()


def process_stats(inst: S.EmbeddedInstance) -> dict[str, dict[str, float]]:
    """RSS now and at peak for every process of the instance."""
    return {name: S.process_memory(pid) for name, pid in sorted(inst.pids().items())}


def service_detail(inst: S.EmbeddedInstance, name: str) -> dict[str, Any]:
    """A service's health detail (``ciliary status -o json``), e.g. servicelb's frontends and
    last_reconcile_ms, or the node executor's last_resync (the first service of that name)."""
    st = json.loads(inst.cli("status", "-o", "json", check=False).stdout or "{}")
    return next((s.get("detail") or {} for s in st.get("services", []) if s.get("name") == name), {})


def gc_details(inst: S.EmbeddedInstance) -> dict[str, Any]:
    """Every service's cyclic-collector pauses (health detail ``gc``), by name/instance."""
    st = json.loads(inst.cli("status", "-o", "json", check=False).stdout or "{}")
    return {f"{s.get('name')}/{s.get('instance', '')}": (s.get("detail") or {}).get("gc")
            for s in st.get("services", []) if (s.get("detail") or {}).get("gc")}


def gc_during(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Collections and pause time per generation between two ``gc_details``."""
    out = {}
    for name, end in after.items():
        start = before.get(name) or {"collections": [0, 0, 0], "pause_ms_total": [0.0, 0.0, 0.0]}
        out[name] = {"collections": [b - a for a, b in zip(start["collections"], end["collections"], strict=True)],
                     "pause_ms": [round(b - a, 3) for a, b in zip(start["pause_ms_total"], end["pause_ms_total"], strict=True)],
                     "longest_pause_ms_ever": end.get("pause_ms_max")}
    return out


def lb_map_size(n: int) -> int:
    """Entries the lb maps need for ``n`` services of 3 backends (0: the default 65,536 fits)."""
    need = 4 * n + 4 * BURST * BURSTS
    if need <= 65536:
        return 0
    size = 65536
    while size < need:
        size *= 2
    return size


def kv_kernel(n: int, reps: int, load_timeout: float) -> dict[str, Any]:
    """ciliary's whole path for N services: a throw-away embedded instance (``ciliary up -d
    --nodes 1``), the N selector-less Services + manual EndpointSlices loaded with one
    ``ciliary apply -f``, then ``reps`` one-endpoint changes timed from the KV write until
    the new backend is in the node's pinned lb4 maps (read directly, no CLI)."""
    svcs = K.synthetic_services(n)
    churned = svcs[n // 2 + 1 if n > 2 else 0]
    # lb4_services holds slot 0 plus 3 slots per service: raise the map above Cilium's default
    lb_entries = lb_map_size(n)
    if lb_entries:
        os.environ["CILIARY_MAP_LB"] = str(lb_entries)
    else:
        os.environ.pop("CILIARY_MAP_LB", None)
    with S.EmbeddedInstance("k", cluster_id=200 + secrets.randbelow(50)) as inst:
        print(f"  kv N={n}: instance {inst.cluster} up in {inst.up_seconds:.1f}s", flush=True)
        path = inst.data_dir / "services.yaml"
        path.write_text(kv_manifests(svcs))
        fe = S.KernelFrontend(inst, KV_NODE, churned.cluster_ip, churned.port)
        try:
            t0 = time.monotonic()
            inst.cli("apply", "-f", str(path), timeout=load_timeout)
            apply_s = time.monotonic() - t0
            print(f"  kv N={n}: ciliary apply -f of {2 * n + 1} objects took {apply_s:.1f}s", flush=True)
            want, last, seen = 4 * n, 0.0, 0
            while (seen := fe.services.count()) < want:
                if time.monotonic() - t0 > load_timeout:
                    raise TimeoutError(f"kv N={n}: {seen}/{want} lb4 service entries after {load_timeout:.0f}s")
                if time.monotonic() - last >= 5:
                    print(f"  kv N={n}: {seen}/{want} lb4 service entries in the kernel "
                          f"({time.monotonic() - t0:.0f}s)", flush=True)
                    last = time.monotonic()
                time.sleep(0.2)
            load_s = time.monotonic() - t0
            print(f"  kv N={n}: all {want} lb4 service entries in the kernel after {load_s:.1f}s", flush=True)
            if churned.endpoints[2][0] not in fe.slot_addresses():
                raise RuntimeError(f"kv N={n}: {churned.name} not in the kernel as generated")
            memory_loaded = process_stats(inst)
            servicelb_pid = inst.pids().get("servicelb", 0)
            cpu0 = S.process_cpu_s(servicelb_pid)
            gc_before = gc_details(inst)
            samples = asyncio.run(_kv_churn(inst, churned, reps, fe))
            servicelb_cpu_ms = (S.process_cpu_s(servicelb_pid) - cpu0) * 1000 / max(1, reps)
            detail = service_detail(inst, "servicelb")
            gc_churn = gc_during(gc_before, gc_details(inst))
            burst_size = min(BURST, n)
            bursts = asyncio.run(_kv_bursts(inst, [s for s in svcs if s is not churned],
                                            burst_size, BURSTS))
            memory = process_stats(inst)
            node_resync = service_detail(inst, "node").get("last_resync", {})
        finally:
            fe.close()
    problems = inst.problems
    if problems:
        raise RuntimeError(f"kv N={n}: " + "; ".join(problems))
    return {"instance_up_s": round(inst.up_seconds, 1), "apply_s": round(apply_s, 2),
            "lb_map_entries": lb_entries or 65536,
            "load_to_kernel_s": round(load_s, 2),
            "kernel_after_apply_returned_s": round(load_s - apply_s, 2),
            "churned_service": f"{churned.namespace}/{churned.name}",
            "kv_write_ack_ms": S.ms_stats([a for a, _, _ in samples]),
            "kv_to_kernel_ms": S.ms_stats([k for _, k, _ in samples]),
            # where each change spent its time: KV write -> servicelb's row seen, row -> kernel
            "kv_to_row_ms": S.ms_stats([r for _, _, r in samples if r == r] or [float("nan")]),
            "row_to_kernel_ms": S.ms_stats([k - r for _, k, r in samples if r == r] or [float("nan")]),
            "stages_ms": [[round(a * 1000, 3), round(r * 1000, 3), round(k * 1000, 3)]
                          for a, k, r in samples if r == r],
            "servicelb_last_reconcile_ms": detail.get("last_reconcile_ms"),
            "servicelb_cpu_ms_per_change": round(servicelb_cpu_ms, 2),
            "burst_size": burst_size,
            "burst_apply_ms": S.ms_stats([a for a, _ in bursts]),
            "burst_to_kernel_ms": S.ms_stats([k for _, k in bursts]),
            "memory_after_load": memory_loaded,
            "memory": memory,
            "servicelb_detail": detail,
            # the node executor's last periodic full resync: phases and longest loop step
            "node_last_resync": node_resync,
            # cyclic-collector pauses while the single changes ran, per process
            "gc_during_changes": gc_churn}


# ---- output ---------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return float(f"{a / b:.3g}") if b else float("nan")


def summarize(rows: dict[str, dict[str, Any]], kv: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n_str, r in rows.items():
        cil = r["cil"]
        kvr = kv.get(n_str, {}).get("kv_to_kernel_ms")
        for mode in ("nft", "leg"):
            if mode not in r:
                continue
            ipt = r[mode]
            # legacy: the exact rule blob the kernel holds; nft: the (noisy) meminfo delta
            blob = ipt["memory"].get("legacy_blob")
            mem_ipt = (blob["nat_bytes"] + blob["filter_bytes"] if blob
                       else max(ipt["memory"]["kernel_mem_delta_load_kb"], 1) * 1024)
            row = {
                "N": int(n_str), "vs": mode,
                "update_ms_cil_map": cil["update_map_ms"]["median"],
                "update_ms_cil_reconciler": cil["update_reconciler_ms"]["median"],
                "update_ms_ipt_full": ipt["update_full_ms"]["median"],
                "update_ms_ipt_partial": ipt["update_partial_ms"]["median"],
                "update_ratio_full": ratio(cil["update_map_ms"]["median"], ipt["update_full_ms"]["median"]),
                "update_ratio_partial": ratio(cil["update_map_ms"]["median"], ipt["update_partial_ms"]["median"]),
                "update_ms_cil_kv_kernel_p50": kvr["p50"] if kvr else None,
                "update_ms_cil_kv_kernel_p99": kvr["p99"] if kvr else None,
                "update_ratio_kv_full": ratio(kvr["p50"], ipt["update_full_ms"]["median"]) if kvr else None,
                "update_ratio_kv_partial": ratio(kvr["p50"], ipt["update_partial_ms"]["median"]) if kvr else None,
                "initial_load_ratio": ratio(cil["initial_load_s"], ipt["initial_load_s"]),
                "mem_cil_bytes": cil["memory"]["lb_maps_memlock_bytes"],
                "mem_ipt_bytes": mem_ipt,
                "mem_ipt_source": "legacy rule blob" if blob else "meminfo delta",
                "mem_ratio": ratio(cil["memory"]["lb_maps_memlock_bytes"], mem_ipt),
            }
            for pos in ("first", "middle", "last"):
                c, i = cil["traffic"][pos], ipt["traffic"][pos]
                row[f"p50_us_{pos}_cil"] = c["connect_p50_us"]
                row[f"p50_us_{pos}_ipt"] = i["connect_p50_us"]
                row[f"p50_ratio_{pos}"] = ratio(c["connect_p50_us"], i["connect_p50_us"])
                row[f"p99_ratio_{pos}"] = ratio(c["connect_p99_us"], i["connect_p99_us"])
                row[f"cps_ratio_{pos}"] = ratio(c["conn_per_s"], i["conn_per_s"])
            out.append(row)
    return out


def render(res: dict[str, Any]) -> str:
    rows = res["ratios"]
    out = ["Ratios ciliary / kube-proxy iptables (< 1 = ciliary smaller/faster, except conn/s: > 1 = ciliary faster)"]
    def g(v: float | None) -> str:
        return "-" if v is None else f"{v:.2g}"

    out.append(output.table(
        ["N", "vs", "1-svc update", "(partial)", "ciliary kv->kernel", "(partial)", "connect p50 first",
         "p50 last", "p99 last", "conn/s first", "conn/s last", "memory"],
        [[r["N"], r["vs"], g(r["update_ratio_full"]), g(r["update_ratio_partial"]),
          g(r.get("update_ratio_kv_full")), g(r.get("update_ratio_kv_partial")),
          f"{r['p50_ratio_first']:.2f}", f"{r['p50_ratio_last']:.2f}", f"{r['p99_ratio_last']:.2f}",
          f"{r['cps_ratio_first']:.2f}", f"{r['cps_ratio_last']:.2f}", f"{r['mem_ratio']:.2f}"] for r in rows]))
    out.append("(1-svc update: ciliary map write / iptables full and partial restore; ciliary kv->kernel: "
               "p50 from the KV write to the new backend in the kernel / the same restores)")
    kv = {n: r for n, r in res.get("kv_kernel", {}).items() if "kv_to_kernel_ms" in r}
    if kv:
        out.append("")
        out.append("ciliary through its control plane: one EndpointSlice change, KV write -> backend in the "
                   "node's pinned lb4 maps (ms)")
        out.append(output.table(
            ["N", "p50", "p99", "min", "max", "changes", "KV write ack p50", "ack p99", "row seen p50", "row->kernel p99",
             "servicelb reconcile", "apply -f s", "load to kernel s", "after apply returned s"],
            [[n, r["kv_to_kernel_ms"]["p50"], r["kv_to_kernel_ms"]["p99"], r["kv_to_kernel_ms"]["min"],
              r["kv_to_kernel_ms"]["max"], r["kv_to_kernel_ms"]["samples"], r["kv_write_ack_ms"]["p50"], r["kv_write_ack_ms"]["p99"],
              r.get("kv_to_row_ms", {}).get("p50"), r.get("row_to_kernel_ms", {}).get("p99"),
              r.get("servicelb_last_reconcile_ms"), r["apply_s"], r["load_to_kernel_s"],
              r.get("kernel_after_apply_returned_s")] for n, r in kv.items()]))
        with_bursts = {n: r for n, r in kv.items() if "burst_to_kernel_ms" in r}
        if with_bursts:
            out.append("")
            out.append("bursts (one apply changing the slices of many services) and the processes' memory")
            out.append(output.table(
                ["N", "burst", "apply p50 ms", "all in kernel p50 ms", "p99 ms", "servicelb CPU ms/change",
                 "node RSS MiB", "(own / files)", "servicelb", "identity", "policy"],
                [[n, r["burst_size"], r["burst_apply_ms"]["p50"], r["burst_to_kernel_ms"]["p50"],
                  r["burst_to_kernel_ms"]["p99"], r["servicelb_cpu_ms_per_change"],
                  r["memory"].get(f"node/{KV_NODE}", {}).get("rss_mib", "?"),
                  "{} / {}".format(r["memory"].get(f"node/{KV_NODE}", {}).get("anon_mib", "?"),
                                   r["memory"].get(f"node/{KV_NODE}", {}).get("file_mib", "?")),
                  *(r["memory"].get(name, {}).get("rss_mib", "?") for name in ("servicelb", "identity", "policy"))]
                 for n, r in with_bursts.items()]))
    if not res["by_n"]:
        return "\n".join(out)
    out.append("")
    out.append("Absolute values (medians)")
    abs_rows = []
    for n_str, r in res["by_n"].items():
        for mode in ("cil", "nft", "leg"):
            if mode not in r:
                abs_rows.append([n_str, MODE_NAMES[mode], "skipped", "(N > --nft-max)", "", "", "", "", ""])
                continue
            m = r[mode]
            if mode == "cil":
                upd = f"{m['update_map_ms']['median']} (rec {m['update_reconciler_ms']['median']})"
                mem = f"{m['memory']['lb_maps_memlock_bytes'] / 2**20:.1f} MiB memlock ({m['memory']['payload_bytes'] / 2**20:.2f} payload)"
            else:
                upd = f"{m['update_full_ms']['median']} (partial {m['update_partial_ms']['median']})"
                blob = m["memory"].get("legacy_blob")
                mem = f"{m['memory']['kernel_mem_delta_load_kb'] / 1024:.1f} MiB meminfo"
                if blob:
                    mem += f" ({(blob['nat_bytes'] + blob['filter_bytes']) / 2**20:.1f} blob)"
            t = m["traffic"]
            abs_rows.append([n_str, MODE_NAMES[mode], m["initial_load_s"], upd,
                             f"{t['first']['connect_p50_us']}/{t['middle']['connect_p50_us']}/{t['last']['connect_p50_us']}",
                             t["last"]["connect_p99_us"],
                             f"{t['first']['conn_per_s']:.0f}/{t['last']['conn_per_s']:.0f}",
                             sum(x.get("syn_retrans", 0) for x in t.values()), mem])
    out.append(output.table(["N", "mode", "load s", "1-svc update ms", "connect p50 us f/m/l", "p99 last",
                             "conn/s f/l", "SYN rtx", "memory"], abs_rows))
    chk = res.get("shared_backend_check")
    if chk:
        out.append("")
        out.append(f"Shared-backend check (N={chk['N']}; first/middle/last services on the same backends and "
                   "port, 6 x 1,000 connections): " + ", ".join(
                       f"{MODE_NAMES[m]}: {v['counters']['TCPSynRetrans']} SYN retransmits, "
                       f"{v['counters']['OutRsts']} resets, {v['conn_per_s_median']:.0f} conn/s"
                       for m, v in chk.items() if m != "N"))
    return "\n".join(out)


def plot(res: dict[str, Any], dest: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    all_ns = [int(n) for n in res["by_n"]]
    by = res["by_n"]

    def ns_of(mode: str) -> list[int]:
        return [n for n in all_ns if mode in by[str(n)]]

    ns = all_ns
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"cil": "tab:green", "nft": "tab:blue", "leg": "tab:orange"}
    ax = axes[0]
    ax.plot(ns, [by[str(n)]["cil"]["update_map_ms"]["median"] for n in ns], "o-", c=colors["cil"], label="ciliary map")
    ax.plot(ns, [by[str(n)]["cil"]["update_reconciler_ms"]["median"] for n in ns], "o--", c=colors["cil"],
            label="ciliary reconciler")
    kv = {int(n): r["kv_to_kernel_ms"]["p50"] for n, r in res.get("kv_kernel", {}).items() if "kv_to_kernel_ms" in r}
    if kv:
        ax.plot(sorted(kv), [kv[n] for n in sorted(kv)], "^-.", c=colors["cil"], label="ciliary kv->kernel p50")
    for m in ("nft", "leg"):
        ax.plot(ns_of(m), [by[str(n)][m]["update_full_ms"]["median"] for n in ns_of(m)], "s-", c=colors[m],
                label=f"{m} full")
        ax.plot(ns_of(m), [by[str(n)][m]["update_partial_ms"]["median"] for n in ns_of(m)], "s--", c=colors[m],
                label=f"{m} partial")
    ax.set(xscale="log", yscale="log", xlabel="services (x3 endpoints)", ylabel="ms",
           title="apply one service change")
    ax.legend(fontsize=7)
    ax = axes[1]
    for m in ("cil", "nft", "leg"):
        ax.plot(ns_of(m), [by[str(n)][m]["traffic"]["last"]["connect_p50_us"] for n in ns_of(m)], "o-", c=colors[m],
                label=f"{m} last svc p50")
        ax.plot(ns_of(m), [by[str(n)][m]["traffic"]["first"]["connect_p50_us"] for n in ns_of(m)], "o:", c=colors[m],
                label=f"{m} first svc p50")
    ax.set(xscale="log", xlabel="services", ylabel="connect() us", title="connection setup to a VIP")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(ns, [by[str(n)]["cil"]["memory"]["lb_maps_memlock_bytes"] / 2**20 for n in ns], "o-", c=colors["cil"],
            label="ciliary lb maps memlock (prealloc)")
    ax.plot(ns, [by[str(n)]["cil"]["memory"]["payload_bytes"] / 2**20 for n in ns], "o:", c=colors["cil"],
            label="ciliary payload")
    for m in ("nft", "leg"):
        ax.plot(ns_of(m), [max(by[str(n)][m]["memory"]["kernel_mem_delta_load_kb"], 1) / 1024 for n in ns_of(m)], "s-",
                c=colors[m], label=f"{m} kernel meminfo delta")
    ax.plot(ns, [(by[str(n)]["leg"]["memory"]["legacy_blob"]["nat_bytes"]
                  + by[str(n)]["leg"]["memory"]["legacy_blob"]["filter_bytes"]) / 2**20 for n in ns], "s:",
            c=colors["leg"], label="leg rule blob (exact)")
    ax.set(xscale="log", yscale="log", xlabel="services", ylabel="MiB", title="kernel memory")
    ax.legend(fontsize=7)
    fig.suptitle(f"ciliary vs kube-proxy iptables — {res['machine']['kernel']}, {res['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return f"wrote {dest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 100, 1,000 only, fewer repetitions")
    parser.add_argument("--bpf-source", choices=("auto", "tree"), default="auto",
                        help="auto: fall back to bpf/ at git HEAD when the working tree's does not load")
    parser.add_argument("--sizes", dest="sizes_arg", default=None,
                        help="comma-separated N values instead of the default set (at most 4)")
    parser.add_argument("--deadline", type=float, default=HARD_DEADLINE,
                        help=f"abort the sandbox part after this many seconds (default {HARD_DEADLINE:.0f})")
    parser.add_argument("--nft-max", type=int, default=5000,
                        help="largest N measured with iptables-nft (its restore time grows steeply)")
    parser.add_argument("--kv-max", type=int, default=10000,
                        help="largest N measured through the embedded control plane (0: skip that part)")
    parser.add_argument("--kv-reps", type=int, default=None,
                        help="one-endpoint changes per N through the control plane (default 100; --quick 20)")
    parser.add_argument("--kv-sizes", default=None,
                        help="comma-separated N values for the control-plane part (default: the sizes; "
                             "lb maps are raised for N above 16,000, e.g. 50000)")
    parser.add_argument("--kv-only", action="store_true",
                        help="only the control-plane part (no sandbox, no iptables)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results file (default {RESULTS.relative_to(REPO)}; --quick: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.update_reps, args.conns, args.conn_seconds, args.warmup, args.rounds = \
            [100, 1000], 3, 300, 2.0, 30, 2
    else:
        args.sizes, args.update_reps, args.conns, args.conn_seconds, args.warmup, args.rounds = \
            [100, 1000, 5000, 10000], 5, 1000, 3.0, 100, 3
    if args.kv_reps is None:
        args.kv_reps = 20 if args.quick else 100
    if args.sizes_arg:
        args.sizes = [int(x) for x in args.sizes_arg.split(",")][:MAX_SIZES]
    if os.geteuid() != 0:
        print("needs root (namespaces, bpf, iptables in namespaces)", file=sys.stderr)
        return 2
    S.install_sigterm()
    pinned = S.pin_one_cpu()
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/servicelb.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": S.machine(tuple(f"/usr/sbin/{b}" for b in ("iptables-nft", "iptables-legacy"))),
        "params": {"sizes": args.sizes, "endpoints_per_service": 3, "update_reps": args.update_reps,
                   "connections": args.conns, "connection_seconds": args.conn_seconds,
                   "warmup_connections": args.warmup, "traffic_rounds": args.rounds, "nft_max": args.nft_max,
                   "kv_max": args.kv_max, "kv_reps": args.kv_reps, "pinned_cpu": pinned,
                   "map_sizes": MAP_SIZES, "cluster_cidr": K.Options().cluster_cidr},
        "by_n": {},
        "load_average": [os.getloadavg()[0]],
    }
    t_start = time.monotonic()
    problems: list[str] = []
    # the control-plane part first: once the sandbox part has compiled BPF, this process maps
    # LLVM, and the kernel does not page out pages two processes map, so the node executor
    # would keep the compiler pages it hands back on a real node (services/node/residency.py)
    wanted_kv = [int(x) for x in args.kv_sizes.split(",")] if args.kv_sizes else args.sizes
    kv_sizes = [n for n in wanted_kv if n <= args.kv_max]
    if kv_sizes:
        t0 = time.monotonic()
        res["kv_kernel"] = {}
        skipped = [n for n in wanted_kv if n > args.kv_max]
        if skipped:
            res["kv_kernel_skipped"] = f"N > --kv-max {args.kv_max}: {skipped}"
        print(f"ciliary through the control plane (KV write -> pinned lb4 map), N = {kv_sizes}", flush=True)
        for n in kv_sizes:
            try:
                r = kv_kernel(n, args.kv_reps, load_timeout=1200.0)
            except Exception as e:  # recorded, the other sizes still run
                problems.append(f"kv N={n}: {e}")
                print(f"  kv N={n} failed: {e}", file=sys.stderr, flush=True)
                res["kv_kernel"][str(n)] = {"error": str(e)[:400]}
                continue
            res["kv_kernel"][str(n)] = r
            res["load_average"].append(os.getloadavg()[0])
            print(f"N={n:>6} ciliary kv->kernel: p50 {r['kv_to_kernel_ms']['p50']} ms, p99 "
                  f"{r['kv_to_kernel_ms']['p99']} ms (write ack p50 {r['kv_write_ack_ms']['p50']} ms); load "
                  f"{r['load_to_kernel_s']}s", flush=True)
        res["kv_seconds"] = round(time.monotonic() - t0, 1)
    t_sandbox = time.monotonic()
    if not args.kv_only:
        problems += sandbox_part(args, res)
    res["sandbox_seconds"] = round(time.monotonic() - t_sandbox, 1)
    res["wall_seconds"] = round(time.monotonic() - t_start, 1)
    res["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    res["ratios"] = summarize(res["by_n"], res.get("kv_kernel", {}))
    print()
    print(render(res))
    dest = args.output or (None if args.quick else RESULTS)
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a separate run stored beside this one stays
            try:
                kept = json.loads(dest.read_text()).get("supplementary")
            except ValueError:
                kept = None
            if kept:
                res["supplementary"] = kept
        dest.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {dest}")
        if res["by_n"]:
            print(plot(res, dest.with_suffix(".png")))
    return 1 if problems else 0


def sandbox_part(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """The head-to-head in the sandbox cluster (steps 1-5 of the module docstring); returns
    cleanup problems."""
    bench = Bench(args)
    print(f"cluster {bench.cluster}: namespaces ciliary-{bench.cluster}-*, pins {PIN_ROOT}/{bench.cluster}",
          flush=True)
    try:
        bench.build()
        res["datapath_load_s"] = round(bench.load_datapath(), 2)
        res["bpf_source"] = bench.bpf_source
        for n in args.sizes:
            row = {}
            modes = ["cil", "nft", "leg"]
            if n > args.nft_max:
                modes.remove("nft")
                row["skipped"] = {"nft": f"N > --nft-max {args.nft_max}: one iptables-nft-restore of 5,000 services "
                                         "already takes about a minute here (see N=5000)"}
            for mode in modes:
                bench.check_time()
                t0 = time.monotonic()
                row[mode] = bench.ciliary(n) if mode == "cil" else bench.iptables(mode, n)
                upd = row[mode].get("update_map_ms") or row[mode]["update_full_ms"]
                print(f"N={n:>6} {mode}: load {row[mode]['initial_load_s']}s, one-service update "
                      f"{upd['median']} ms ({time.monotonic() - t0:.0f}s)", flush=True)
            t0 = time.monotonic()
            for mode, tr in bench.traffic(n, modes).items():
                row[mode]["traffic"] = tr
                print(f"N={n:>6} {mode}: connect p50 first/middle/last {tr['first']['connect_p50_us']}/"
                      f"{tr['middle']['connect_p50_us']}/{tr['last']['connect_p50_us']} us, conn/s last "
                      f"{tr['last']['conn_per_s']}, SYN retransmits "
                      f"{sum(t['syn_retrans'] for t in tr.values())}", flush=True)
            print(f"  traffic {time.monotonic() - t0:.0f}s", flush=True)
            if n == args.sizes[0]:
                res["shared_backend_check"] = {"N": n, **bench.shared_backend_check(n)}
                print("shared-backend check (SYN retransmits / resets sent per mode): " + ", ".join(
                    f"{m} {v['counters']['TCPSynRetrans']}/{v['counters']['OutRsts']}"
                    for m, v in res["shared_backend_check"].items() if m != "N"), flush=True)
            for mode in modes[1:]:
                row[mode]["memory"]["kernel_mem_delta_flush_kb"] = bench.flush_memory(mode)
            res["load_average"].append(os.getloadavg()[0])
            res["by_n"][str(n)] = row
    finally:
        problems = bench.cleanup()
        if problems:
            print("cleanup problems: " + "; ".join(problems), file=sys.stderr)
        res["cleanup"] = {"namespaces_left": N.cluster_netns(bench.cluster),
                          "pins_left": Path(PIN_ROOT, bench.cluster).exists()}
    return problems


if __name__ == "__main__":
    sys.exit(main())
