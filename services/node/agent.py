"""The node executor's agent: wires the desired-state buckets to the node's kernel.

Three parts, one job each: ``kernel.NodeKernel`` performs every kernel operation,
``translate`` turns bucket records into map entries per owner, and this module wires
them: start order, watches, registrations and housekeeping.

Invariants:
- Start order: claim a node index → build the node's namespaces → load the datapath
  (compile in a thread; maps pinned under ``/sys/fs/bpf/ciliary/<cluster>/<node>/``) →
  restore the reconciler from the pinned maps → re-attach known endpoints → watch the
  desired-state buckets → run pods. A restart therefore changes nothing that was right.
- Desired map entries come only from KV buckets (``ipcache``, ``services``, ``policy``)
  and from registered endpoints, each producer owning reconciler owner tags
  (``translate``); the reconciler applies them add-before-delete with retries and prunes
  orphans once every input (``ipcache``, ``services``, ``policy``, ``pods``) has synced.
- Each input is a ``Mirror`` named after it in the service health; after its first
  ``SYNCED`` every change re-translates what it affects, and every (re-)sync
  re-translates all of it. An ``ipcache`` or ``services`` key is its own reconciler owner
  (``translate.ipcache_owner``, ``frontend_owner``): one changed key re-translates and
  re-diffs one record, never the whole bucket.
- Endpoints are registered by the CNI plugin over NATS (``ciliary.node.<c>.<n>.endpoint``)
  and recorded in ``<state dir>/endpoints.json`` with their endpoint id.
- Once the datapath is compiled and loaded, the compiler's resident pages and freed heap
  are handed back to the kernel (``residency``); health detail ``compiler_memory``.
- Raw flow events are published on ``flows.raw.<cluster>.<node>`` in batches.
- Teardown (only when asked, e.g. by ``ciliary down``) stops pods, removes the node's
  namespaces and unpins its maps; a plain exit leaves the datapath enforcing.
- The pod CIDR is the Node object's ``spec.podCIDR`` when it names one, else the node
  index's /24 of the cluster CIDR; with ``CILIARY_POD_CIDR_FROM_NODE=1`` the executor waits
  at start until the Node object names one (a cluster's node IPAM, via the kube bridge).
- Two modes (``CILIARY_NODE_MODE``). ``sandbox`` (the embedded default) builds the node's
  namespace and runs the pods bound to it. ``host`` (a DaemonSet on a real node) is the
  node the process runs in: no namespace is created, pods are run by the node's container
  runtime, which calls the installed ``ciliary-cni`` (relayed to this process,
  ``cnirelay``); the conflist is written once the datapath is loaded; teardown removes it
  and the plugin (``CILIARY_CNI_BIN_DIR``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ciliary import clusters, config, heap, schema
from ciliary.bus import SYNCED, Bus, KVEntry, Message, RevisionMismatch, Synced
from ciliary.cachestats import CacheStats
from ciliary.runtime import Context
from ciliary.store import ResourceStore, kv_key
from ciliary.watch import Mirror, PassLoop, decoder
from services.node import addressing, cniinstall, cnirelay, dnsfeed, residency, sidecar
from services.node import layouts as L
from services.node import translate as T
from services.node.datapath import MapSizes
from services.node.endpoints import EndpointBook
from services.node.events import EventPump
from services.node.kernel import NodeKernel
from services.node.meshroutes import MeshRoutes
from services.node.pods import PodRunner, RunnerConfig, clear_reported_status
from services.node.policyrecords import FullPolicyRecords
from services.node.reconciler import ReconcileLoop, Reconciler
from services.node.socklb import ENV_MODE as ENV_SOCKET_LB
from services.node.socklb import SockLBError, parse_mode

log = logging.getLogger(__name__)

ENV_CLUSTER_CIDR = "CILIARY_CLUSTER_CIDR"
ENV_POD_CIDR_FROM_NODE = "CILIARY_POD_CIDR_FROM_NODE"  # 1: wait for the Node's spec.podCIDR
NODE_CIDR_POLL = 0.5  # seconds between reads of the Node object while waiting for its podCIDR
ENV_TEARDOWN = "CILIARY_TEARDOWN_ON_EXIT"
ENV_DEFAULT_NODE = "CILIARY_DEFAULT_NODE"
ENV_STATE_DIR = "CILIARY_NODE_STATE_DIR"
ENV_NODE_MODE = "CILIARY_NODE_MODE"
ENV_NODE_IP = "CILIARY_NODE_IP"
ENV_NODE_DEVICE = "CILIARY_NODE_DEVICE"
ENV_CNI_CONF_DIR = "CILIARY_CNI_CONF_DIR"
ENV_CNI_RELAY_PORT = "CILIARY_CNI_RELAY_PORT"
ENV_CNI_IPAM_DIR = "CILIARY_CNI_IPAM_DIR"
ENV_CNI_BIN_DIR = "CILIARY_CNI_BIN_DIR"
NODE_MODES = ("sandbox", "host")
GC_INTERVAL = 30.0
STATS_INTERVAL = 5.0
RESYNC_INTERVAL = 60.0
EVENT_BATCH_MAX = 512
EVENT_GATHER = 0.005  # seconds to let a batch fill before publishing
DEREGISTER_TIMEOUT = 10.0  # longest a deleted pod waits to leave the lb slots before it is stopped
DEREGISTER_SETTLE = 0.5  # then this long, for the other nodes to apply the same `services` update
INPUTS = frozenset({"ipcache", "services", "policy", "pods"})  # all synced: orphans may be pruned


def map_sizes_from_env() -> MapSizes:
    """Cilium's default sizes unless ``CILIARY_MAP_<NAME>`` overrides one."""
    defaults = MapSizes()
    fields = {name: int(config.env_number(f"CILIARY_MAP_{name.upper()}", getattr(defaults, name),
                                          integer=True, minimum=1))
              for name in MapSizes.__dataclass_fields__}
    return MapSizes(**fields)


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
        self.cluster_cidr = os.environ.get(ENV_CLUSTER_CIDR) or clusters.default_pod_cidr(self.cluster_id)
        self.teardown = os.environ.get(ENV_TEARDOWN) == "1"
        self.pod_cidr_from_node = os.environ.get(ENV_POD_CIDR_FROM_NODE) == "1"
        self.mode = os.environ.get(ENV_NODE_MODE) or "sandbox"
        if self.mode not in NODE_MODES:
            raise SystemExit(f"node executor {self.node}: {ENV_NODE_MODE}={self.mode!r}: "
                             f"expected one of {', '.join(NODE_MODES)}")
        self.host_mode = self.mode == "host"
        # host mode: the runtime runs pods; the pods input is not the executor's
        self.inputs = INPUTS - {"pods"} if self.host_mode else INPUTS
        self.cni_conf_dir = os.environ.get(ENV_CNI_CONF_DIR) or "/etc/cni/net.d"
        self.cni_relay_port = int(config.env_number(ENV_CNI_RELAY_PORT, cniinstall.DEFAULT_RELAY_PORT,
                                                    integer=True, minimum=1))
        self.cni_relay: asyncio.Server | None = None
        self.store = ResourceStore(self.bus)
        self.index = 0
        self.pod_cidr = ""
        self.host_ip = ""
        self.node_cgroup = ""
        self.map_sizes = map_sizes_from_env()
        try:  # socket-level load balancing (socklb): on | hostns-only (default) | off
            self.socket_lb_mode = parse_mode(os.environ.get(ENV_SOCKET_LB))
        except SockLBError as err:
            raise SystemExit(f"node executor {self.node}: {err}") from None
        self.kernel = NodeKernel(self.cluster, self.cluster_id, self.node, map_sizes=self.map_sizes,
                                 socket_lb_mode=self.socket_lb_mode, host_mode=self.host_mode)
        self.reconciler = Reconciler(max_entries={
            L.IPCACHE: self.map_sizes.ipcache, L.LXC: self.map_sizes.lxc,
            L.POLICY: self.map_sizes.policy, L.LB4_SERVICES: self.map_sizes.lb,
            L.LB4_BACKENDS: self.map_sizes.lb, L.LB4_REVERSE_NAT: self.map_sizes.lb,
            L.LB4_MAGLEV: self.map_sizes.maglev, L.LB_AFFINITY_MATCH: self.map_sizes.lb,
        })
        self.loop_: ReconcileLoop | None = None
        self.policy_selection = T.PolicySelection(self.map_sizes.policy)
        self.endpoints = EndpointBook(self.state_dir)
        # the mirrors' decoded values (by KV key) once watching; empty before
        self.ipcache: Mapping[str, schema.IPCacheRecord] = {}
        self._ipcache_owned: set[str] = set()  # ipcache keys with an entry in the reconciler
        self.frontends: Mapping[str, schema.LBFrontend] = {}
        # bucket policy: every identity's head (flags), full records of local identities only
        self.policies: Mapping[str, schema.PolicyMapHead] = {}
        self.policy_records = FullPolicyRecords({})  # over the policy mirror once watching
        self._policy_interest: set[int] = set()  # identities whose record changes this node's maps
        self._endpoint_identity: dict[int, int] = {}  # endpoint id -> identity its lxc entry carries
        self.peer_routes: dict[str, str] = {}  # pod CIDR -> via, as routed
        self.synced: set[str] = set()
        self.runner: PodRunner | None = None
        self.pump: EventPump | None = None
        self.caches = CacheStats()  # reported under detail "caches" with the map pressure
        for name in ("rows", "owners", "observed"):
            self.caches.register(f"reconciler_{name}", lambda name=name: self.reconciler.table_sizes()[name])
        self.caches.register("endpoints", lambda: len(self.endpoints))
        self.caches.register("pods", lambda: len(self.runner.pods) if self.runner is not None else 0)
        self.caches.register("policy_owners", lambda: len(self.policy_selection.owners))
        self.caches.register("policy_records_decoded", lambda: self.policy_records.decoded())

    # ------------------------------------------------------------------ start

    async def start(self, tg: asyncio.TaskGroup) -> None:
        self.ctx.declare_watch("node/datapath")
        await self._claim_index()
        if self.host_mode:
            self.host_ip, device = await self.kernel.prepare_host(
                os.environ.get(ENV_NODE_IP, ""), os.environ.get(ENV_NODE_DEVICE, ""))
            log.info("host mode: node address %s, device %s", self.host_ip or "-", device or "-")
        else:
            underlay = addressing.underlay_cidr(self.cluster_id, self.index)
            self.host_ip = underlay.split("/")[0]
            await self.kernel.create_node_namespaces(underlay, self.pod_cidr, self.host_ip)
        seconds = await self.kernel.load_datapath()
        log.info("datapath loaded in %.2fs (pins %s)", seconds, self.kernel.pin_dir)
        self.ctx.detail["datapath_load_seconds"] = round(seconds, 3)
        await self._attach_socket_lb()
        # compiling is over: the compiler's pages and freed heap go back to the kernel
        released = await asyncio.to_thread(residency.release_compiler_memory)
        self.ctx.detail["compiler_memory"] = released
        log.info("after loading the datapath: RSS %.1f MiB -> %.1f MiB (compiler pages released)",
                 released["rss_before_mib"], released["rss_after_mib"])
        self.loop_ = ReconcileLoop(self.reconciler, self.kernel.maps, resync_interval=RESYNC_INTERVAL,
                                   ready=lambda: self.inputs <= self.synced, heap=heap.freezer())
        tg.create_task(self.loop_.run(), name="reconcile")
        await self.loop_.restored.wait()
        self.endpoints.restore()
        await self._reattach_endpoints()
        await self._report_node_status()

        self.pump = EventPump(asyncio.get_running_loop(), self.cluster, self.cluster_id, self.node)
        self.kernel.start_event_ring(self.pump.offer)
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
            nats_url=self.ctx.settings.nats_url, nats_creds=self.ctx.settings.nats_creds,
            cni_bin=str(Path(sys.executable).parent / "ciliary-cni"),
            cgroup=self.node_cgroup,
        ), self._write_pod_status, self.kernel,
            clear_status=lambda namespace, name, reporter: clear_reported_status(self.bus, namespace, name, reporter))
        self.runner.deregister = self._deregister
        self._watch_desired_state(tg)
        self._watch_nodes(tg)
        if self.host_mode:
            await self._serve_cni()
        else:  # ClusterMesh: links and routes to connected clusters' nodes; this node's pods
            MeshRoutes(self.kernel, self.cluster).start(tg, self.bus)
            self._watch_pods(tg, self.runner)
        tg.create_task(self._housekeeping(), name="housekeeping")
        self.ctx.watch_synced("node/datapath")

    async def _serve_cni(self) -> None:
        """Host mode: answer the installed plugin, then tell the runtime about the network."""
        self.cni_relay = await cnirelay.serve(self.kernel.run_cni, self.cni_relay_port)
        ipam_dir = os.environ.get(ENV_CNI_IPAM_DIR) or cniinstall.DEFAULT_IPAM_DIR
        path = await asyncio.to_thread(cniinstall.write_conflist, self.cni_conf_dir, cniinstall.conflist(
            cluster=self.cluster, node=self.node, subnet=self.pod_cidr,
            nats_url=self.ctx.settings.nats_url, nats_creds=self.ctx.settings.nats_creds,
            ipam_dir=ipam_dir))
        self.ctx.detail["cni"] = {"conflist": str(path), "relay_port": self.cni_relay_port}
        log.info("CNI configuration %s written", path)

    async def _attach_socket_lb(self) -> None:
        """Attach (or, in mode off, detach) the socket-LB programs on the node cgroup; a
        failure is reported, and pods then run without the cgroup."""
        try:
            self.node_cgroup = await self.kernel.attach_socket_lb()
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
        spec_cidr = await self._node_pod_cidr()
        self.pod_cidr = spec_cidr or addressing.pod_cidr(self.cluster_cidr, self.index)
        log.info("node %s: index %d, pod CIDR %s", self.node, self.index, self.pod_cidr)

    async def _node_pod_cidr(self) -> str:
        """``spec.podCIDR`` of this node's Node object ("" when it names none). With
        ``CILIARY_POD_CIDR_FROM_NODE=1`` (a cluster whose node IPAM assigns pod CIDRs, its
        Nodes brought in by the kube bridge) it waits until the object names one."""
        waited = 0.0
        while True:
            node_obj = await self.store.get("Node", "", self.node)
            spec = (node_obj.record.manifest.get("spec") or {}) if node_obj else {}
            cidr = spec.get("podCIDR") if isinstance(spec, dict) else ""
            if cidr or not self.pod_cidr_from_node:
                return str(cidr or "")
            if waited % 10 == 0:
                log.info("node %s: waiting for spec.podCIDR of Node %s (%s=1)", self.node,
                         self.node, ENV_POD_CIDR_FROM_NODE)
            await asyncio.sleep(NODE_CIDR_POLL)
            waited += NODE_CIDR_POLL

    async def _report_node_status(self) -> None:
        await self.store.report_status("Node", "", self.node, f"node/{self.node}", {
            "phase": "Ready",
            "podCIDR": self.pod_cidr,
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "CiliaryDatapathReady"}],
            "ciliary": {"mode": self.mode, "netns": self.kernel.netns or "", "pinDir": self.kernel.pin_dir},
        })

    # ------------------------------------------------------------------ endpoints

    async def _reattach_endpoints(self) -> None:
        for ep in self.endpoints:
            try:
                await self.kernel.attach_endpoint(ep.host_ifname)
            except LookupError:
                log.info("endpoint %s/%s is gone; forgetting it", ep.namespace, ep.pod)
                self.endpoints.remove(ep.container_id)
        self.endpoints.save()
        self._sync_endpoint_entries()

    async def _on_registration(self, reg: schema.EndpointRegistration, msg: Message) -> None:
        try:
            if reg.op == "add":
                await self.kernel.attach_endpoint(reg.host_ifname)
                reply = schema.EndpointReply(ok=True, endpoint_id=self.endpoints.add(reg).ep_id)
                await self._report_runtime_pod(reg)
            elif reg.op == "del":
                self.endpoints.remove(reg.container_id)
                reply = schema.EndpointReply(ok=True)
                await self._report_runtime_pod(reg)
            else:
                reply = schema.EndpointReply(ok=False, error=f"unknown op {reg.op!r}")
            self.endpoints.save()
            self._sync_endpoint_entries()
        except Exception as err:
            log.warning("endpoint registration %s failed: %s", reg.container_id, err)
            reply = schema.EndpointReply(ok=False, error=str(err))
        await msg.respond(reply)

    async def _report_runtime_pod(self, reg: schema.EndpointRegistration) -> None:
        """Host mode: the runtime ran the pod, so this executor reports the address it got
        (as a Cilium agent publishes its endpoints): Pod status ``podIP`` on ADD, removed
        on DEL. A registration without a pod name (a bare runtime) reports nothing."""
        if not self.host_mode or not reg.pod_name:
            return
        namespace = reg.pod_namespace or "default"
        if reg.op == "add":
            await self.store.report_status("Pod", namespace, reg.pod_name, f"node/{self.node}", {
                "podIP": reg.ip, "podIPs": [{"ip": reg.ip}], "hostIP": self.host_ip,
                "ciliary": {"containerID": reg.container_id, "interface": reg.host_ifname},
            })
        else:
            await self.bus.kv_delete(schema.BUCKET_STATUS, kv_key("Pod", namespace, reg.pod_name))

    async def _on_debug(self, req: schema.NodeDebugRequest, msg: Message) -> None:
        try:
            rows = await self.kernel.read_debug_view(req.view, self.endpoints, req.identity)
            reply = schema.NodeDebugReply(ok=True, node=self.node, rows=rows)
        except Exception as err:
            reply = schema.NodeDebugReply(ok=False, node=self.node, error=str(err))
        await msg.respond(reply)

    # ------------------------------------------------------------------ desired state

    def _watch_desired_state(self, tg: asyncio.TaskGroup) -> None:
        self.ipcache = self._follow(tg, "ipcache", schema.BUCKET_IPCACHE, ">", schema.IPCacheRecord,
                                    self._sync_ipcache)
        self.frontends = self._follow(tg, "services", schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>",
                                      schema.LBFrontend, self._sync_frontends)
        policy = self.ctx.mirror(tg, schema.BUCKET_POLICY, f"{schema.POLICY_ID_PREFIX}>", name="policy",
                                 decode=decoder(schema.PolicyMapHead))
        self.policies = policy.values
        self.policy_records = FullPolicyRecords(policy.entries)
        self._follow_mirror(policy, self._on_policy_record)

    def _follow(self, tg: asyncio.TaskGroup, name: str, bucket: str, pattern: str, type_: type,
                on_change: Callable[[str | None], None]) -> Mapping[str, Any]:
        """Mirror ``bucket`` (health name ``name``); after the first SYNCED call
        ``on_change(key)`` per change and ``on_change(None)`` after every (re-)sync.
        Returns the mirror's decoded values by KV key."""
        mirror = self.ctx.mirror(tg, bucket, pattern, name=name, decode=decoder(type_))
        self._follow_mirror(mirror, on_change)
        return mirror.values

    def _follow_mirror(self, mirror: Mirror[Any], on_change: Callable[[str | None], None]) -> None:
        """``on_change`` as `_follow` calls it, for a mirror made by the caller."""
        name = mirror.name

        def changed(event: KVEntry | Synced) -> None:
            if event is SYNCED:
                self._input_synced(name)
                on_change(None)
            elif name in self.synced:
                assert isinstance(event, KVEntry)
                on_change(event.key)

        mirror.listen(changed)

    def _input_synced(self, name: str) -> None:
        """Prune orphans as soon as every input has delivered its state once."""
        self.synced.add(name)
        if self.loop_ is not None and self.inputs <= self.synced:
            self.loop_.request_resync()

    def _sync_ipcache(self, key: str | None) -> None:
        """One prefix's entry (``key``), or every prefix after a (re-)sync; each prefix is
        its own reconciler owner, so one change costs one row, not the whole table."""
        if key is not None:
            entries = T.ipcache_record_entries(self.ipcache.get(key), self.node)
            self.reconciler.set_desired(T.ipcache_owner(key), entries)
            if entries:
                self._ipcache_owned.add(key)
            else:
                self._ipcache_owned.discard(key)
        else:
            owned = set()
            for each, record in self.ipcache.items():
                entries = T.ipcache_record_entries(record, self.node)
                self.reconciler.set_desired(T.ipcache_owner(each), entries)
                if entries:
                    owned.add(each)
            for gone in self._ipcache_owned - owned:
                self.reconciler.clear_owner(T.ipcache_owner(gone))
            self._ipcache_owned = owned
        self.ctx.detail["ipcache"] = len(self._ipcache_owned)
        self._sync_endpoint_entries()

    def _on_policy_record(self, key: str | None) -> None:
        """A policy record matters here only for an identity one of this node's endpoints
        has or is about to get (or after a re-sync)."""
        if key is not None:
            try:
                identity = int(key[len(schema.POLICY_ID_PREFIX):])
            except ValueError:
                return
            if identity not in self._policy_interest:
                return
        self._sync_endpoint_entries()

    def _sync_endpoint_entries(self) -> None:
        wanted = T.ipcache_identities(self.endpoints, self.ipcache)
        identities = T.endpoint_identities(wanted, self.policies, self._endpoint_identity)
        self._endpoint_identity = identities
        self._policy_interest = set(identities.values()) | set(wanted.values())
        self.ctx.detail["endpoints_awaiting_policy"] = sum(
            1 for ep_id, identity in identities.items() if identity != wanted[ep_id])
        entries = T.endpoint_entries(self.endpoints, identities, self.policies)
        # policy entries before the endpoint flags that make the datapath consult them
        self._sync_policy_entries(set(identities.values()))
        self.reconciler.set_desired(T.ENDPOINTS_OWNER, entries)
        self.ctx.detail["endpoints"] = len(entries)
        self._kick()

    def _sync_policy_entries(self, local: set[int]) -> None:
        """Policy map entries for the identities of this node's endpoints only."""
        plan = self.policy_selection.select(local, self.policy_records)
        self.policy_records.retain(schema.policy_key(i) for i in local)
        for owner, entries in plan.writes.items():
            self.reconciler.set_desired(owner, entries)
        self.ctx.detail["policy_entries"] = plan.total
        if plan.overflow:
            self.ctx.detail["policy_overflow"] = plan.overflow
            log.error("policy map full (%d entries): identities %s not written",
                      self.map_sizes.policy, plan.overflow)
        else:
            self.ctx.detail.pop("policy_overflow", None)

    def _sync_frontends(self, key: str | None) -> None:
        for changed in ([key] if key is not None else list(self.frontends)):
            # backends, reverse NAT, affinity match, Maglev table, slots, slot 0 (in that
            # order; the reconciler adds before it removes)
            self.reconciler.set_desired(T.frontend_owner(changed), T.frontend_entries(
                self.frontends.get(changed), self.node, self.map_sizes.maglev_table))
        self.ctx.detail["frontends"] = len(self.frontends)
        self._kick()

    def _kick(self) -> None:
        if self.loop_ is not None:
            self.loop_.kick()

    # ------------------------------------------------------------------ peers and pods

    def _watch_nodes(self, tg: asyncio.TaskGroup) -> None:
        """Peer routes: another node's pod CIDR via its underlay address (direct routing).
        Not part of the service health: a node serves its own pods without its peers."""
        nodes: Mirror[schema.StatusRecord] = Mirror(schema.BUCKET_STATUS, "Node.>", name="nodes",
                                                    decode=decoder(schema.StatusRecord))
        routes = PassLoop("peer-routes", lambda: self._route_peers(nodes.values))
        nodes.notify(routes)
        tg.create_task(nodes.follow(self.bus), name="watch-nodes")
        tg.create_task(routes.run(), name="peer-routes")

    async def _route_peers(self, statuses: Mapping[str, schema.StatusRecord]) -> None:
        for cidr, (via, peer) in T.peer_routes(statuses, self.node).items():
            if self.peer_routes.get(cidr) == via:
                continue
            try:
                await self.kernel.route_pod_cidr(cidr, via)
                self.peer_routes[cidr] = via
                log.info("route %s via %s (%s)", cidr, via, peer)
            except Exception as err:
                log.warning("route to %s failed: %s", peer, err)

    def _watch_pods(self, tg: asyncio.TaskGroup, runner: PodRunner) -> None:
        """Pods bound here go to the runner; it starts after the first SYNCED, with the
        containers of an earlier run adopted."""
        pods = self.ctx.mirror(tg, schema.BUCKET_RESOURCES, "Pod.>", name="pods")

        def changed(event: KVEntry | Synced) -> None:
            if event is SYNCED:
                self._input_synced("pods")
                if pods.syncs == 1:
                    runner.adopt_specs()
                    tg.create_task(runner.run(), name="pod-runner")
                return
            assert isinstance(event, KVEntry)
            runner.on_pod(event)
            self.ctx.detail["pods"] = len(runner.desired)

        pods.listen(changed)

    async def _deregister(self, ip: str) -> None:
        """Before a deleted pod is stopped: wait until servicelb has taken ``ip`` out of every
        slot and this node's lb maps hold that, then ``DEREGISTER_SETTLE`` more, as every
        node applies the same update. At most ``DEREGISTER_TIMEOUT``; a pod that no
        frontend selects (or a host-network pod, whose address is the node's) is not held."""
        def selected() -> bool:
            return T.selects_backend(self.frontends.values(), self.node, ip)

        if ip == self.host_ip or not selected():
            return
        deadline = time.monotonic() + DEREGISTER_TIMEOUT
        while selected() or self.reconciler.unsettled(T.LB_OWNER_PREFIX):
            if time.monotonic() >= deadline:
                log.warning("%s is still a selected backend after %.0fs; stopping its pod anyway",
                            ip, DEREGISTER_TIMEOUT)
                return
            await asyncio.sleep(0.05)
        await asyncio.sleep(DEREGISTER_SETTLE)

    async def _write_pod_status(self, namespace: str, name: str, reporter: str, status: dict[str, Any]) -> None:
        await self.store.report_status("Pod", namespace, name, reporter, status)

    # ------------------------------------------------------------------ events and housekeeping

    async def _publish_events(self) -> None:
        """Batch ring-buffer events for ``EVENT_GATHER`` seconds (at most ``EVENT_BATCH_MAX``)
        and publish them; the kernel's lost-event counter is read at most once a second."""
        assert self.pump is not None
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
                lost_total = await self.kernel.events_lost()
                lost_read = time.monotonic()
            if not events and lost_total <= self.pump.kernel_lost_seen and not self.pump.lost_queue:
                continue
            batch = self.pump.batch(events, lost_total)
            try:
                await self.bus.publish(subject, batch)
                self.pump.published += len(events)
            except Exception as err:
                self.pump.unpublished(batch)
                log.warning("publishing %d events failed: %s", len(events), err)
            await dnsfeed.publish(self.bus, batch, self.ctx.detail)
            self.ctx.detail["events_published"] = self.pump.published
            self.ctx.detail["events_lost"] = self.pump.kernel_lost_seen + self.pump.lost_queue

    async def _housekeeping(self) -> None:
        """Map pressure every ``STATS_INTERVAL``, conntrack GC every ``GC_INTERVAL``."""
        last_gc = time.monotonic()
        while True:
            self._report_map_pressure()
            self._report_socket_lb()
            await asyncio.sleep(STATS_INTERVAL)
            if time.monotonic() - last_gc < GC_INTERVAL:
                continue
            last_gc = time.monotonic()
            try:
                removed = await self.kernel.gc_conntrack()
                if removed:
                    log.info("conntrack gc removed %d entries", removed)
            except Exception as err:
                log.warning("conntrack gc failed: %s", err)

    def _report_socket_lb(self) -> None:
        """The socket-LB mode in effect: sidecar pods never join the node cgroup."""
        sidecars = self.runner.sidecar_pods if self.runner is not None else 0
        report = self.ctx.detail.get("socket_lb")
        if isinstance(report, dict):
            report["sidecar_pods"] = sidecars
            report["effective"] = sidecar.effective_socket_lb(self.socket_lb_mode, sidecars)

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
        if self.loop_ is not None and self.loop_.last_resync:
            self.ctx.detail["last_resync"] = self.loop_.last_resync
        self.caches.publish(self.ctx.detail)

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        if self.cni_relay is not None:
            self.cni_relay.close()
            await self.cni_relay.wait_closed()
        if self.runner is not None and not self.host_mode:
            await self.runner.shutdown(teardown=self.teardown)
        await self.kernel.close()
        if self.teardown:
            if self.host_mode:  # uninstall: the runtime finds neither configuration nor plugin
                await asyncio.to_thread(cniinstall.remove, self.cni_conf_dir, os.environ.get(ENV_CNI_BIN_DIR))
            await self.kernel.teardown([ep.host_ifname for ep in self.endpoints])
            try:
                await self.bus.kv_delete(schema.BUCKET_STATUS, kv_key("Node", "", self.node))
            except Exception:
                pass
            log.info("node %s torn down", self.node)
