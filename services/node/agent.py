"""The node executor's agent: the only place that changes the kernel.

Invariants:
- Start order: claim a node index → build the node's namespaces → load the datapath
  (compile in a thread; maps pinned under ``/sys/fs/bpf/ciliary/<cluster>/<node>/``) →
  restore the reconciler from the pinned maps → re-attach known endpoints → watch the
  desired-state buckets → run pods. A restart therefore changes nothing that was right.
- Desired map entries come only from KV buckets (``ipcache``, ``services``, ``policy``)
  and from registered endpoints, each producer owning one reconciler owner tag; the
  reconciler applies them add-before-delete with retries and prunes orphans on resync.
- Endpoints are registered by the CNI plugin over NATS (``ciliary.node.<c>.<n>.endpoint``)
  and recorded in ``<state dir>/endpoints.json`` with their endpoint id.
- Raw flow events are published on ``flows.raw.<cluster>.<node>`` in batches.
- Teardown (only when asked, e.g. by ``ciliary down``) stops pods, removes the node's
  namespaces and unpins its maps; a plain exit leaves the datapath enforcing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliary import config, schema
from ciliary.bus import SYNCED, Bus, KVEntry, RevisionMismatch
from ciliary.runtime import Context
from ciliary.store import ResourceStore, kv_key
from services.node import addressing, debug, dnsfeed, netns, world
from services.node import layouts as L
from services.node import maps as M
from services.node.datapath import Datapath, MapSizes, ensure_bpffs
from services.node.events import EventPump
from services.node.pods import PodRunner, RunnerConfig
from services.node.reconciler import ReconcileLoop, Reconciler
from services.node.socklb import ENV_MODE as ENV_SOCKET_LB
from services.node.socklb import SockLB, SockLBError, parse_mode

log = logging.getLogger(__name__)

ENV_CLUSTER_CIDR = "CILIARY_CLUSTER_CIDR"
ENV_TEARDOWN = "CILIARY_TEARDOWN_ON_EXIT"
ENV_DEFAULT_NODE = "CILIARY_DEFAULT_NODE"
ENV_STATE_DIR = "CILIARY_NODE_STATE_DIR"
GC_INTERVAL = 30.0
STATS_INTERVAL = 5.0
EVENT_BATCH_MAX = 512
EVENT_GATHER = 0.005  # seconds to let a batch fill before publishing
DEREGISTER_TIMEOUT = 10.0  # longest a deleted pod waits to leave the lb slots before it is stopped
DEREGISTER_SETTLE = 0.5  # then this long, for the other nodes to apply the same `services` update


def map_sizes_from_env() -> MapSizes:
    """Cilium's default sizes unless ``CILIARY_MAP_<NAME>`` overrides one."""
    defaults = MapSizes()
    fields = {name: int(config.env_number(f"CILIARY_MAP_{name.upper()}", getattr(defaults, name),
                                          integer=True, minimum=1))
              for name in MapSizes.__dataclass_fields__}
    return MapSizes(**fields)


@dataclass
class LocalEndpoint:
    container_id: str
    namespace: str
    pod: str
    ip: str
    host_ifname: str
    host_ifindex: int
    ep_id: int


def policy_map_entries(record: schema.PolicyMapRecord) -> list[M.Entry]:
    """Map entries of one identity; port ranges expand to one key per port, and where
    expanded ranges overlap on one key, deny wins over allow."""
    chosen: dict[tuple[int, int, int, str], schema.PolicyEntryRecord] = {}
    for e in record.entries:
        last = e.end_port if e.end_port and e.port else e.port
        for port in range(e.port, last + 1):
            key = (e.peer, port, e.proto, e.direction)
            held = chosen.get(key)
            if held is None or (held.verdict != "deny" and e.verdict == "deny"):
                chosen[key] = e
    return [
        M.policy_entry(record.identity, peer, port, proto, direction,
                       deny=e.verdict == "deny", audit=e.audit, rule_ref=e.rule_ref)
        for (peer, port, proto, direction), e in chosen.items()
    ]


class NodeAgent:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bus: Bus = ctx.bus
        s = ctx.settings
        self.cluster = s.cluster
        self.cluster_id = s.cluster_id
        self.node = s.node
        data_dir = Path(os.environ.get(config.ENV_DATA_DIR) or "/var/lib/ciliary")
        self.state_dir = Path(os.environ.get(ENV_STATE_DIR) or data_dir / "nodes" / self.cluster / self.node)
        self.cluster_cidr = os.environ.get(ENV_CLUSTER_CIDR, addressing.DEFAULT_CLUSTER_CIDR)
        self.teardown = os.environ.get(ENV_TEARDOWN) == "1"
        self.store = ResourceStore(self.bus)
        self.netns = netns.node_netns(self.cluster, self.node)
        self.index = 0
        self.pod_cidr = ""
        self.host_ip = ""
        self.map_sizes = map_sizes_from_env()
        self.datapath: Datapath | None = None
        self.reconciler = Reconciler(max_entries={
            L.IPCACHE: self.map_sizes.ipcache, L.LXC: self.map_sizes.lxc,
            L.POLICY: self.map_sizes.policy, L.LB4_SERVICES: self.map_sizes.lb,
            L.LB4_BACKENDS: self.map_sizes.lb, L.LB4_REVERSE_NAT: self.map_sizes.lb,
            L.LB4_MAGLEV: self.map_sizes.maglev, L.LB_AFFINITY_MATCH: self.map_sizes.lb,
        })
        self.loop_: ReconcileLoop | None = None
        self.endpoints: dict[str, LocalEndpoint] = {}  # by container id
        self.ipcache: dict[str, schema.IPCacheRecord] = {}  # by KV key
        self.frontends: dict[str, schema.LBFrontend] = {}
        self.policies: dict[str, schema.PolicyMapRecord] = {}  # by KV key id.<identity>
        self.nodes: dict[str, dict[str, Any]] = {}  # peer node -> {"ip", "podCIDR"}
        self.peer_routes: dict[str, str] = {}
        self.synced: set[str] = set()
        self._policy_owners: set[int] = set()
        # identity -> (record last written, its entry count): unchanged records are not re-expanded
        self._policy_applied: dict[int, tuple[schema.PolicyMapRecord | None, int]] = {}
        self.runner: PodRunner | None = None
        self.pump: EventPump | None = None
        try:  # socket-level load balancing (socklb): on | hostns-only (default) | off
            self.socket_lb_mode = parse_mode(os.environ.get(ENV_SOCKET_LB))
        except SockLBError as err:
            raise SystemExit(f"node executor {self.node}: {err}") from None
        self.socklb: SockLB | None = None
        self.node_cgroup = ""

    # ------------------------------------------------------------------ start

    async def start(self, tg: asyncio.TaskGroup) -> None:
        self.ctx.declare_watch("node/datapath")
        await self._claim_index()
        underlay = addressing.underlay_cidr(self.cluster_id, self.index)
        self.host_ip = underlay.split("/")[0]
        await asyncio.to_thread(netns.create_node, self.cluster, self.node, underlay)
        await asyncio.to_thread(world.ensure_world, self.cluster, self.cluster_id)
        await asyncio.to_thread(world.connect_node, self.cluster, self.cluster_id, self.node,
                                self.pod_cidr, self.host_ip)
        await asyncio.to_thread(ensure_bpffs)
        self.datapath = Datapath(self.cluster, self.node, self.netns, map_sizes=self.map_sizes)
        seconds = await asyncio.to_thread(self.datapath.load)
        # NodePort / externalIPs arriving from the underlay: from_netdev / to_netdev
        await asyncio.to_thread(self.datapath.attach_host, netns.link_name(self.cluster, self.node, "node"))
        log.info("datapath loaded in %.2fs (pins %s)", seconds, self.datapath.pin_dir)
        self.ctx.detail["datapath_load_seconds"] = round(seconds, 3)
        await self._start_socket_lb()
        self.loop_ = ReconcileLoop(self.reconciler, self.datapath.maps, resync_interval=60.0,
                                   ready=lambda: {"ipcache", "services", "policy", "pods"} <= self.synced)
        tg.create_task(self.loop_.run(), name="reconcile")
        await self.loop_.restored.wait()
        self._restore_endpoints()
        await self._reattach_endpoints()
        await self._report_node_status()

        self.pump = EventPump(asyncio.get_running_loop(), self.cluster, self.cluster_id, self.node)
        self.datapath.ring_reader(self.pump.offer)
        tg.create_task(self._publish_events(), name="events")

        await self.bus.subscribe(
            schema.SUBJECT_NODE_ENDPOINT.format(cluster=self.cluster, node=self.node),
            schema.EndpointRegistration, self._on_registration,
        )
        await self.bus.subscribe(
            schema.SUBJECT_NODE_DEBUG.format(cluster=self.cluster, node=self.node),
            schema.NodeDebugRequest, self._on_debug,
        )
        self.runner = PodRunner(RunnerConfig(
            cluster=self.cluster, node=self.node,
            default_node=os.environ.get(ENV_DEFAULT_NODE, "node-1"),
            pod_cidr=self.pod_cidr, host_ip=self.host_ip, state_dir=self.state_dir,
            nats_url=self.ctx.settings.nats_url,
            cni_bin=str(Path(sys.executable).parent / "ciliary-cni"),
            cgroup=self.node_cgroup,
        ), self._write_pod_status)
        self.runner.deregister = self._deregister
        tg.create_task(self._follow("ipcache", schema.BUCKET_IPCACHE, ">", schema.IPCacheRecord,
                                    self.ipcache, lambda _key: self._sync_ipcache()), name="watch-ipcache")
        tg.create_task(self._follow("services", schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>",
                                    schema.LBFrontend, self.frontends, self._on_frontend_change),
                       name="watch-services")
        tg.create_task(self._follow("policy", schema.BUCKET_POLICY, f"{schema.POLICY_ID_PREFIX}>",
                                    schema.PolicyMapRecord, self.policies,
                                    lambda _key: self._sync_endpoint_entries()), name="watch-policy")
        tg.create_task(self._watch_nodes(), name="watch-nodes")
        tg.create_task(self._watch_pods(tg), name="watch-pods")
        tg.create_task(self._housekeeping(), name="housekeeping")
        self.ctx.watch_synced("node/datapath")

    async def _start_socket_lb(self) -> None:
        """Create the node cgroup and attach (or, in mode off, detach) the socket-LB
        programs; a failure is reported, and pods then run without the cgroup."""
        assert self.datapath is not None
        self.socklb = SockLB.for_datapath(self.datapath, self.socket_lb_mode)
        try:
            await asyncio.to_thread(self.socklb.load)
            await asyncio.to_thread(self.socklb.attach)
            self.node_cgroup = str(self.socklb.cgroup)
            self.ctx.detail["socket_lb"] = {"mode": self.socket_lb_mode, "cgroup": self.node_cgroup}
            log.info("socket LB %s on cgroup %s", self.socket_lb_mode, self.node_cgroup)
        except Exception as err:
            self.ctx.detail["socket_lb"] = {"mode": self.socket_lb_mode, "error": str(err)}
            log.error("socket LB (%s) not attached: %s", self.socket_lb_mode, err)

    async def _claim_index(self) -> None:
        """This node's index: reuse the one it holds, else claim the lowest free one."""
        existing = await self.bus.kv_list(schema.BUCKET_ALLOCATIONS, f"{addressing.NODE_INDEX_PREFIX}.>")
        for key, entry in existing.items():
            if entry.value == self.node.encode():
                self.index = int(key.rsplit(".", 1)[1])
                break
        while not self.index:
            taken = {int(k.rsplit(".", 1)[1]) for k in existing}
            free = next(i for i in range(1, addressing.MAX_NODES + 1) if i not in taken)
            try:
                await self.bus.kv_put(schema.BUCKET_ALLOCATIONS, addressing.node_index_key(free),
                                      self.node.encode(), last_revision=0)
                self.index = free
            except RevisionMismatch:
                existing = await self.bus.kv_list(schema.BUCKET_ALLOCATIONS, f"{addressing.NODE_INDEX_PREFIX}.>")
        node_obj = await self.store.get("Node", "", self.node)
        spec_cidr = ((node_obj.record.manifest.get("spec") or {}).get("podCIDR") if node_obj else "") or ""
        self.pod_cidr = spec_cidr or addressing.pod_cidr(self.cluster_cidr, self.index)
        log.info("node %s: index %d, pod CIDR %s", self.node, self.index, self.pod_cidr)

    async def _report_node_status(self) -> None:
        await self.store.report_status("Node", "", self.node, f"node/{self.node}", {
            "phase": "Ready",
            "podCIDR": self.pod_cidr,
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "CiliaryDatapathReady"}],
            "ciliary": {"netns": self.netns, "pinDir": str(self.datapath.pin_dir if self.datapath else "")},
        })

    # ------------------------------------------------------------------ endpoints

    def _endpoints_file(self) -> Path:
        return self.state_dir / "endpoints.json"

    def _save_endpoints(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._endpoints_file().with_suffix(".tmp")
        tmp.write_text(json.dumps({k: vars(v) for k, v in self.endpoints.items()}, indent=1))
        tmp.replace(self._endpoints_file())

    def _restore_endpoints(self) -> None:
        try:
            data = json.loads(self._endpoints_file().read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        self.endpoints = {k: LocalEndpoint(**v) for k, v in data.items()}
        self._sync_endpoint_entries()

    async def _reattach_endpoints(self) -> None:
        assert self.datapath is not None
        for ep in list(self.endpoints.values()):
            try:
                await asyncio.to_thread(self.datapath.attach, ep.host_ifname)
            except LookupError:
                log.info("endpoint %s/%s is gone; forgetting it", ep.namespace, ep.pod)
                del self.endpoints[ep.container_id]
        self._save_endpoints()
        self._sync_endpoint_entries()

    def _free_ep_id(self) -> int:
        used = {ep.ep_id for ep in self.endpoints.values()}
        return next(i for i in range(1, 65536) if i not in used)

    async def _on_registration(self, reg: schema.EndpointRegistration, msg: Any) -> None:
        try:
            if reg.op == "add":
                assert self.datapath is not None
                await asyncio.to_thread(self.datapath.attach, reg.host_ifname)
                existing = self.endpoints.get(reg.container_id)
                ep = LocalEndpoint(reg.container_id, reg.pod_namespace, reg.pod_name, reg.ip,
                                   reg.host_ifname, reg.host_ifindex,
                                   existing.ep_id if existing else self._free_ep_id())
                self.endpoints[reg.container_id] = ep
                reply = schema.EndpointReply(ok=True, endpoint_id=ep.ep_id)
            elif reg.op == "del":
                self.endpoints.pop(reg.container_id, None)
                reply = schema.EndpointReply(ok=True)
            else:
                reply = schema.EndpointReply(ok=False, error=f"unknown op {reg.op!r}")
            self._save_endpoints()
            self._sync_endpoint_entries()
        except Exception as err:
            log.warning("endpoint registration %s failed: %s", reg.container_id, err)
            reply = schema.EndpointReply(ok=False, error=str(err))
        if msg.reply:
            await msg.respond(schema.encode(reply))

    async def _on_debug(self, req: schema.NodeDebugRequest, msg: Any) -> None:
        try:
            rows = await asyncio.to_thread(self._debug_rows, req)
            reply = schema.NodeDebugReply(ok=True, node=self.node, rows=rows)
        except Exception as err:
            reply = schema.NodeDebugReply(ok=False, node=self.node, error=str(err))
        if msg.reply:
            await msg.respond(schema.encode(reply))

    def _debug_rows(self, req: schema.NodeDebugRequest) -> list[dict[str, Any]]:
        assert self.datapath is not None
        maps = self.datapath.maps
        if req.view == "ipcache":
            return debug.ipcache_rows(maps.dump(L.IPCACHE))
        if req.view == "ct":
            return debug.ct_rows(maps.dump(L.CT))
        if req.view == "policy":
            return debug.policy_rows(maps.dump(L.POLICY), req.identity)
        if req.view == "lb":
            return debug.lb_rows(maps.dump(L.LB4_SERVICES), maps.dump(L.LB4_BACKENDS),
                                 maps.dump(L.LB4_REVERSE_NAT))
        if req.view == "endpoints":
            return debug.endpoint_rows(self.endpoints.values(), maps.dump(L.LXC))
        if req.view == "metrics":
            return debug.metrics_rows(maps.dump(L.METRICS))
        raise ValueError(f"unknown view {req.view!r}; one of {', '.join(schema.NODE_DEBUG_VIEWS)}")

    def identity_of_ip(self, ip: str) -> int:
        record = self.ipcache.get(schema.ipcache_key(f"{ip}/32"))
        return record.identity if record else 5  # reserved:init until identity resolves

    def _sync_endpoint_entries(self) -> None:
        entries = []
        for ep in sorted(self.endpoints.values(), key=lambda e: e.ep_id):
            identity = self.identity_of_ip(ep.ip)
            pol = self.policies.get(schema.policy_key(identity))
            entries.append(M.endpoint_entry(
                ep.host_ifindex, ep.ep_id, identity, ep.ip,
                policy_ingress=bool(pol and pol.ingress_enforced),
                policy_egress=bool(pol and pol.egress_enforced),
                audit_ingress=bool(pol and pol.audit_ingress),
                audit_egress=bool(pol and pol.audit_egress),
            ))
        # policy entries before the endpoint flags that make the datapath consult them
        self._sync_policy_entries()
        self.reconciler.set_desired("endpoints", entries)
        self.ctx.detail["endpoints"] = len(entries)
        self._kick()

    def _sync_policy_entries(self) -> None:
        """Policy map entries for the identities of this node's endpoints only."""
        local = {self.identity_of_ip(ep.ip) for ep in self.endpoints.values()}
        total = 0
        overflow: list[int] = []
        for identity in sorted(set(self._policy_owners) | local):
            record = self.policies.get(schema.policy_key(identity)) if identity in local else None
            applied = self._policy_applied.get(identity)
            if applied is not None and applied[0] is record and total + applied[1] <= self.map_sizes.policy:
                total += applied[1]  # same record as last time: nothing to expand or write
                continue
            entries = policy_map_entries(record) if record else []
            if total + len(entries) > self.map_sizes.policy:
                overflow.append(identity)
                entries = []
            total += len(entries)
            self.reconciler.set_desired(f"policy:{identity}", entries)
            if entries:
                self._policy_owners.add(identity)
                self._policy_applied[identity] = (record, len(entries))
            else:
                self._policy_owners.discard(identity)
                self._policy_applied.pop(identity, None)
        self.ctx.detail["policy_entries"] = total
        if overflow:
            self.ctx.detail["policy_overflow"] = overflow
            log.error("policy map full (%d entries): identities %s not written", self.map_sizes.policy, overflow)
        else:
            self.ctx.detail.pop("policy_overflow", None)

    def _maybe_prune(self) -> None:
        """Prune orphans as soon as every producer has delivered its state once."""
        if self.loop_ is not None and {"ipcache", "services", "policy", "pods"} <= self.synced:
            self.loop_.request_resync()

    def _kick(self) -> None:
        if self.loop_ is not None:
            self.loop_.kick()

    # ------------------------------------------------------------------ desired state

    async def _follow(self, name: str, bucket: str, pattern: str, type_: type, table: dict[str, Any],
                      on_change: Callable[[str | None], None]) -> None:
        """Mirror ``bucket`` into ``table`` (by KV key); after the first SYNCED call
        ``on_change(key)`` per change and ``on_change(None)`` after every (re-)sync."""
        self.ctx.declare_watch(name)
        async for event in self.bus.watch(bucket, pattern):
            if event is SYNCED:
                self.synced.add(name)
                self.ctx.watch_synced(name)
                self._maybe_prune()
                on_change(None)
                continue
            assert isinstance(event, KVEntry)
            if event.deleted:
                table.pop(event.key, None)
            else:
                try:
                    table[event.key] = schema.decode(event.value, type_)
                except Exception as err:
                    log.warning("ignoring bad %s entry %s: %s", name, event.key, err)
                    continue
            if name in self.synced:
                on_change(event.key)

    def _sync_ipcache(self) -> None:
        entries = []
        for record in self.ipcache.values():
            if ":" in record.prefix:
                continue  # IPv4 datapath
            identity = record.identity
            if record.source == "node" and record.node == self.node:
                identity = L.IDENTITY_HOST
            entries.append(M.ipcache_entry(record.prefix, identity))
        self.reconciler.set_desired("ipcache", entries)
        self.ctx.detail["ipcache"] = len(entries)
        self._sync_endpoint_entries()

    def _on_frontend_change(self, key: str | None) -> None:
        for changed in ([key] if key is not None else list(self.frontends)):
            self._sync_frontend(changed)

    def _sync_frontend(self, key: str) -> None:
        fe = self.frontends.get(key)
        owner = f"lb:{key}"
        if fe is None or (fe.node and fe.node != self.node):
            # A NodePort frontend on another node's address is that node's: traffic to
            # it leaves this node untranslated and that node's from_netdev serves it.
            self.reconciler.set_desired(owner, [])
        else:
            # backends, reverse NAT, affinity match, Maglev table, slots, slot 0 (in that
            # order; the reconciler adds before it removes)
            self.reconciler.set_desired(owner, M.lb_frontend_entries(
                fe, self.node, self.map_sizes.maglev_table))
        self.ctx.detail["frontends"] = len(self.frontends)
        self._kick()

    # ------------------------------------------------------------------ pod deletion grace

    def _selects(self, ip: str) -> bool:
        """Whether a frontend of this node has a backend with address ``ip`` in its slots."""
        for fe in self.frontends.values():
            if fe.node and fe.node != self.node:
                continue
            slots = set(fe.slots_by_node.get(self.node, []) if fe.traffic_policy == "Local" else fe.slots)
            if slots and any(b.ip == ip and b.id in slots for b in fe.backends):
                return True
        return False

    async def _deregister(self, ip: str) -> None:
        """Before a deleted pod is stopped: wait until servicelb has taken ``ip`` out of every
        slot and this node's lb maps hold that, then ``DEREGISTER_SETTLE`` more, as every
        node applies the same update. At most ``DEREGISTER_TIMEOUT``; a pod that no
        frontend selects (or a host-network pod, whose address is the node's) is not held."""
        if ip == self.host_ip or not self._selects(ip):
            return
        deadline = time.monotonic() + DEREGISTER_TIMEOUT
        while self._selects(ip) or self.reconciler.unsettled("lb:"):
            if time.monotonic() >= deadline:
                log.warning("%s is still a selected backend after %.0fs; stopping its pod anyway",
                            ip, DEREGISTER_TIMEOUT)
                return
            await asyncio.sleep(0.05)
        await asyncio.sleep(DEREGISTER_SETTLE)

    async def _watch_nodes(self) -> None:
        """Peer routes: another node's pod CIDR via its underlay address (direct routing)."""
        async for event in self.bus.watch(schema.BUCKET_STATUS, "Node.>"):
            if event is SYNCED or not isinstance(event, KVEntry):
                continue
            _, _, name = event.key.split(".", 2)
            if name == self.node:
                continue
            if event.deleted:
                self.nodes.pop(name, None)
                continue
            try:
                status = schema.decode(event.value, schema.StatusRecord).status
            except Exception:
                continue
            ip = next((a.get("address") for a in status.get("addresses", []) if a.get("type") == "InternalIP"), "")
            cidr = status.get("podCIDR", "")
            if ip and cidr and self.peer_routes.get(cidr) != ip:
                try:
                    await asyncio.to_thread(netns.route_pod_cidr, self.cluster, self.node, cidr, ip)
                    self.peer_routes[cidr] = ip
                    log.info("route %s via %s (%s)", cidr, ip, name)
                except Exception as err:
                    log.warning("route to %s failed: %s", name, err)

    async def _watch_pods(self, tg: asyncio.TaskGroup) -> None:
        assert self.runner is not None
        name = "pods"
        self.ctx.declare_watch(name)
        started = False
        async for event in self.bus.watch(schema.BUCKET_RESOURCES, "Pod.>"):
            if event is SYNCED:
                self.synced.add(name)
                self.ctx.watch_synced(name)
                self._maybe_prune()
                if not started:
                    self.runner.adopt_specs()
                    tg.create_task(self.runner.run(), name="pod-runner")
                    started = True
                continue
            assert isinstance(event, KVEntry)
            self.runner.on_pod(event)
            self.ctx.detail["pods"] = len(self.runner.desired)

    async def _write_pod_status(self, namespace: str, name: str, reporter: str, status: dict[str, Any]) -> None:
        await self.store.report_status("Pod", namespace, name, reporter, status)

    # ------------------------------------------------------------------ events and housekeeping

    async def _publish_events(self) -> None:
        """Batch ring-buffer events for ``EVENT_GATHER`` seconds (at most ``EVENT_BATCH_MAX``)
        and publish them; the kernel's lost-event counter is read at most once a second."""
        assert self.pump is not None and self.datapath is not None
        subject = schema.SUBJECT_FLOWS_RAW.format(cluster=self.cluster, node=self.node)
        lost_total = 0
        lost_read = 0.0
        while True:
            try:
                events = await asyncio.wait_for(self.pump.queue.get(), timeout=1.0)
            except TimeoutError:
                events = []  # idle: still report losses the kernel counted since the last batch
            if events:
                await asyncio.sleep(EVENT_GATHER)
                while len(events) < EVENT_BATCH_MAX and not self.pump.queue.empty():
                    events.extend(self.pump.queue.get_nowait())
            if time.monotonic() - lost_read >= 1.0:
                lost_total = await asyncio.to_thread(self.datapath.events_lost)
                lost_read = time.monotonic()
            if not events and lost_total <= self.pump.kernel_lost_seen and not self.pump.lost_queue:
                continue
            batch = self.pump.batch(events, lost_total)
            try:
                await self.bus.publish(subject, batch)
                self.pump.published += len(events)
            except Exception as err:
                self.pump.lost_queue += len(events)
                log.warning("publishing %d events failed: %s", len(events), err)
            await dnsfeed.publish(self.bus, batch, self.ctx.detail)
            self.ctx.detail["events_published"] = self.pump.published
            self.ctx.detail["events_lost"] = self.pump.kernel_lost_seen + self.pump.lost_queue

    async def _housekeeping(self) -> None:
        """Map pressure every ``STATS_INTERVAL``, conntrack GC every ``GC_INTERVAL``."""
        assert self.datapath is not None
        last_gc = time.monotonic()
        while True:
            self._report_map_pressure()
            await asyncio.sleep(STATS_INTERVAL)
            if time.monotonic() - last_gc < GC_INTERVAL:
                continue
            last_gc = time.monotonic()
            try:
                removed = await asyncio.to_thread(self.datapath.gc_conntrack)
                if removed:
                    log.info("conntrack gc removed %d entries", removed)
            except Exception as err:
                log.warning("conntrack gc failed: %s", err)

    def _report_map_pressure(self) -> None:
        """Fill ratio of every map the reconciler writes (what Cilium calls map pressure)."""
        stats = self.reconciler.stats()
        self.ctx.detail["maps"] = {
            name: {"entries": m.entries, "max": m.max_entries, "fill": round(m.fill or 0.0, 6)}
            for name, m in stats.maps.items() if m.max_entries
        }
        self.ctx.detail["map_pressure_max"] = max(
            (m.fill or 0.0 for m in stats.maps.values() if m.max_entries), default=0.0)
        self.ctx.detail["reconciler"] = {"pending": stats.pending, "error": stats.error,
                                         "total_errors": stats.total_errors}

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.shutdown(teardown=self.teardown)
        if self.datapath is not None:
            await asyncio.to_thread(self.datapath.close)
        if self.socklb is not None:
            await asyncio.to_thread(self.socklb.close)
        if self.teardown:
            if self.socklb is not None:
                try:
                    await asyncio.to_thread(self.socklb.teardown)
                except Exception as err:
                    log.warning("removing the node cgroup failed: %s", err)
            await asyncio.to_thread(netns.delete_node, self.cluster, self.node)
            if self.datapath is not None:
                await asyncio.to_thread(self.datapath.unpin)
            await asyncio.to_thread(world.remove_world_if_alone, self.cluster)
            try:
                await self.bus.kv_delete(schema.BUCKET_STATUS, kv_key("Node", "", self.node))
            except Exception:
                pass
            log.info("node %s torn down", self.node)
