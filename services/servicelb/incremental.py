"""The service model kept current one change at a time: a change recomputes only the
Services it touches.

Pure code over plain data, like `model` (whose per-Service steps it runs); time is the
caller's ``now``. The engine holds the model's inputs (`model.Inputs`, departed pods
included), their decoded views (`model.Views`), every Service's `model.ServicePart`, and
indexes from each input to the Services it affects:

- a Service: itself;
- an EndpointSlice: the Service its ``kubernetes.io/service-name`` label names, before
  and after the change;
- a Pod (with ``Config.derive_slices``): the Services of its namespace whose selector
  matches its labels, before and after, when its view (IP, readiness, labels, node,
  named ports) changed; a pod without an IPv4 address counts as absent (it is no
  backend);
- a Node, when its view (InternalIP, zone) changed: every Service that wants node ports
  and every Service with a backend on that node;
- a frontend address: when the Service that owns it changes (on a clash the Service that
  sorts first keeps it), every Service that wants it gets its rows rebuilt.

Invariants:
- After `update`, `desired()` equals `model.compute` over `inputs` with the same
  allocations, and `frontends`/`endpoints` are its rows (the property test checks this
  over random change sequences). `rebuild` runs `model.compute` itself and takes its
  parts, so the first pass and every resync are the from-scratch model.
- Within one `update` the recomputed Services go through the model's steps in the
  model's order: every requested value claimed first, then plans in Service order, then
  rows in Service order, so allocation order is the model's.
- A value is in use while some Service's part holds it (reference counts over
  ``used_plan``/``used_rows``). `take_unused` lists the values no part holds any more,
  to be released after the output without them is written; pending values are never
  listed.
- A Service that missed a value of a pool (requested value taken, pool exhausted) is
  recomputed after that pool released values, as a from-scratch recompute would see them
  free (`has_work` says so until that update ran).
- Departed pods (`departures`) follow the same per-pod steps as the whole-input path;
  a departure's end is a change of that pod.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ciliary.resources.model import EndpointSlice
from ciliary.schema import LBEndpoints, LBFrontend
from services.servicelb import departures, model
from services.servicelb.model import PodView, Ref, ServicePart

NodeName = str
Label = tuple[str, str, str]  # (namespace, key, value)


@dataclass
class Delta:
    """What one `update` may have changed."""

    frontends: set[str] = field(default_factory=set)  # frontend keys: compare their rows
    endpoints: set[str] = field(default_factory=set)  # derived-slice keys
    statuses: set[Ref] = field(default_factory=set)  # Services whose status may differ
    recomputed: int = 0  # Services that went through the model's steps
    problems: list[str] = field(default_factory=list)  # of what was recomputed


class Engine:
    """Inputs, per-Service parts and their indexes; `update` recomputes what changed."""

    def __init__(self, alloc: model.Allocations, cfg: model.Config) -> None:
        self.alloc = alloc
        self.cfg = cfg
        self.inputs = model.Inputs()
        self.live_pods: dict[Ref, dict[str, Any]] = {}
        self.live_pod_status: dict[Ref, dict[str, Any]] = {}
        self.departures = departures.Departures()
        self.views = model.Views()
        self.nodes: dict[NodeName, model.NodeView] = {}  # sorted by name
        self.parts: dict[Ref, ServicePart] = {}
        self.frontends: dict[str, LBFrontend] = {}
        self.endpoints: dict[str, LBEndpoints] = {}
        self.counts: tuple[dict[int, int], ...] = tuple({} for _ in alloc.pools())
        self.zero: tuple[set[int], ...] = tuple(set() for _ in alloc.pools())  # counts that hit 0
        self.troubled: set[Ref] = set()  # parts with problems
        self.blocked: tuple[set[Ref], ...] = tuple(set() for _ in alloc.pools())  # missed a value
        self.retry: set[Ref] = set()  # blocked on a pool that has released values since
        # indexes
        self.manual: dict[Ref, set[Ref]] = {}  # Service -> slices naming it
        self.slice_service: dict[Ref, Ref] = {}  # slice -> the Service it names
        self.pods_by_label: dict[Label, set[Ref]] = {}
        self.selecting: dict[Label, set[Ref]] = {}  # one pair of each selector -> Services
        self.selector_label: dict[Ref, Label] = {}
        self.node_port_services: set[Ref] = set()
        self.on_node: dict[NodeName, set[Ref]] = {}
        self.service_nodes: dict[Ref, frozenset[NodeName]] = {}
        self.wanters: dict[str, set[Ref]] = {}  # frontend key -> Services whose plans want it
        self.owners: dict[str, Ref] = {}  # frontend key -> the Service that has it
        # changes since the last update
        self.dirty_services: set[Ref] = set()
        self.dirty_slices: set[Ref] = set()
        self.dirty_pods: set[Ref] = set()
        self.dirty_nodes: set[NodeName] = set()

    # ------------------------------------------------------------------ whole inputs

    def load(self, inputs: model.Inputs, now: float) -> None:
        """Take whole inputs (live pods only; departed ones are added here); `rebuild`
        computes from them."""
        self.live_pods = dict(inputs.pods)
        self.live_pod_status = dict(inputs.pod_status)
        self.departures.apply(inputs, now)
        self.inputs = inputs
        for dirty in (self.dirty_services, self.dirty_slices, self.dirty_pods, self.dirty_nodes):
            dirty.clear()
        self.retry = set()

    def rebuild(self) -> model.Desired:
        """`model.compute` over the inputs; its parts become the engine's state."""
        desired = model.compute(self.inputs, self.alloc, self.cfg)
        self.views = desired.views
        self.nodes = self.views.sorted_nodes()
        self.parts = dict(desired.parts)
        self.frontends = dict(desired.frontends)
        self.endpoints = dict(desired.endpoints)
        self.manual, self.slice_service = {}, {}
        for ref, eps in self.views.slices.items():
            self._index_slice(ref, eps)
        self.pods_by_label = {}
        for view in self.views.pods.values():
            if model.has_address(view):
                self._index_pod(view, add=True)
        self.selecting, self.selector_label, self.node_port_services = {}, {}, set()
        self.on_node, self.service_nodes, self.wanters, self.owners = {}, {}, {}, {}
        self.counts = tuple({} for _ in self.alloc.pools())
        for part in self.parts.values():
            self._index_part(part)
            self._count(part.used_plan, +1)
            self._count(part.used_rows, +1)
            for key in part.wanted():
                self.wanters.setdefault(key, set()).add(part.ref)
                self.owners.setdefault(key, part.ref)  # parts are in Service order
        self.zero = tuple(set(pool.owners) for pool in self.alloc.pools())
        self.troubled = set()
        self.blocked = tuple(set() for _ in self.alloc.pools())
        for part in self.parts.values():
            self._mark(part)
        self.retry = set()
        return desired

    def desired(self) -> model.Desired:
        """The whole desired state, assembled from the parts (what `model.compute` returns)."""
        return model.assemble(self.views, dict(sorted(self.parts.items())))

    def problems(self) -> list[str]:
        """Every problem, in the model's order."""
        parts = {ref: self.parts[ref] for ref in sorted(self.troubled)}
        return model.assemble(self.views, parts).problems

    def services(self) -> int:
        """Services that decoded."""
        return len(self.parts) - sum(1 for ref in self.troubled if self.parts[ref].svc is None)

    def backends(self) -> int:
        """Backend ids in use."""
        return len(self.counts[3])

    # ------------------------------------------------------------------ changes

    def set_service(self, ref: Ref, manifest: dict[str, Any] | None, generation: int = 1) -> None:
        old = self.inputs.services.get(ref)
        if manifest is None:
            if old is None:
                return
            del self.inputs.services[ref]
        else:
            if old is not None and old[0] is manifest and old[1] == generation:
                return
            self.inputs.services[ref] = (manifest, generation)
        if old is not None and old[0] is not manifest:
            self.inputs.memo.forget(old[0])
        self.dirty_services.add(ref)

    def set_slice(self, ref: Ref, manifest: dict[str, Any] | None) -> None:
        if self._replace(self.inputs.slices, ref, manifest):
            self.dirty_slices.add(ref)

    def set_pod(self, ref: Ref, manifest: dict[str, Any] | None) -> None:
        if self._replace(self.live_pods, ref, manifest):
            self.dirty_pods.add(ref)

    def set_pod_status(self, ref: Ref, status: dict[str, Any] | None) -> None:
        if self._replace(self.live_pod_status, ref, status, forget=False):
            self.dirty_pods.add(ref)

    def set_node(self, name: NodeName, manifest: dict[str, Any] | None) -> None:
        if self._replace(self.inputs.nodes, name, manifest):
            self.dirty_nodes.add(name)

    def set_node_status(self, name: NodeName, status: dict[str, Any] | None) -> None:
        if self._replace(self.inputs.node_status, name, status, forget=False):
            self.dirty_nodes.add(name)

    def _replace(self, store: dict[Any, dict[str, Any]], key: Any, value: dict[str, Any] | None,
                 forget: bool = True) -> bool:
        old = store.get(key)
        if old is value:
            return False
        if value is None:
            del store[key]
        else:
            store[key] = value
        if forget and old is not None:
            self.inputs.memo.forget(old)
        return True

    def has_work(self) -> bool:
        """Changes not yet recomputed (or Services to retry after a release)."""
        return bool(self.retry or self.dirty_services or self.dirty_slices
                    or self.dirty_pods or self.dirty_nodes)

    def next_expiry(self) -> float | None:
        """When the next departed pod's grace period ends."""
        return self.departures.next_expiry()

    # ------------------------------------------------------------------ recompute

    def update(self, now: float) -> Delta:
        """Recompute every Service the changes since the last update touch."""
        affected = set(self.dirty_services)
        problems: list[str] = []
        affected |= self._update_pods(now, problems)
        affected |= self._update_nodes(problems)
        affected |= self._update_slices(problems)
        affected |= self.retry
        self.dirty_services.clear()
        self.retry = set()
        delta = self._recompute(affected)
        delta.problems[:0] = problems
        return delta

    def _update_pods(self, now: float, problems: list[str]) -> set[Ref]:
        changed = self.dirty_pods
        self.dirty_pods = set()
        for ref in changed:
            manifest = self.live_pods.get(ref)
            if manifest is not None:
                self.departures.observe(ref, manifest, self.live_pod_status.get(ref))
            else:
                self.departures.gone(ref, now)
        changed.update(self.departures.expire(now))
        affected: set[Ref] = set()
        for ref in changed:
            manifest, status = self._effective_pod(ref)
            if not self.cfg.derive_slices:
                continue
            old = _backend(self.views.pods.get(ref))
            new = _backend(self.views.set_pod(ref, manifest, status, self.inputs.memo))
            if ref in self.views.pod_problems:
                problems.append(self.views.pod_problems[ref])
            if old == new:
                continue
            for view, add in ((old, False), (new, True)):
                if view is not None:
                    self._index_pod(view, add)
                    affected |= self._selecting(view)
        return affected

    def _effective_pod(self, ref: Ref) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The pod as the model's inputs hold it: live, departed, or gone."""
        if ref in self.live_pods:
            manifest, status = self.live_pods[ref], self.live_pod_status.get(ref)
        elif ref in self.departures.departed:
            manifest, status = self.departures.effective(ref)
        else:
            manifest, status = None, self.live_pod_status.get(ref)
        for store, value in ((self.inputs.pods, manifest), (self.inputs.pod_status, status)):
            if value is None:
                store.pop(ref, None)
            else:
                store[ref] = value
        return manifest, status

    def _update_nodes(self, problems: list[str]) -> set[Ref]:
        affected: set[Ref] = set()
        changed = False
        for name in self.dirty_nodes:
            old = self.views.nodes.get(name)
            new = self.views.set_node(name, self.inputs.nodes.get(name), self.inputs.node_status.get(name),
                                      self.inputs.memo)
            if name in self.views.node_problems:
                problems.append(self.views.node_problems[name])
            if old != new:
                changed = True
                affected |= self.node_port_services | self.on_node.get(name, set())
        self.dirty_nodes.clear()
        if changed:
            self.nodes = self.views.sorted_nodes()
        return affected

    def _update_slices(self, problems: list[str]) -> set[Ref]:
        affected: set[Ref] = set()
        for ref in self.dirty_slices:
            old = self.slice_service.pop(ref, None)
            if old is not None:
                self.manual[old].discard(ref)
                if not self.manual[old]:
                    del self.manual[old]
                affected.add(old)
            eps = self.views.set_slice(ref, self.inputs.slices.get(ref), self.inputs.memo)
            if ref in self.views.slice_problems:
                problems.append(self.views.slice_problems[ref])
            if eps is not None:
                new = self._index_slice(ref, eps)
                if new is not None:
                    affected.add(new)
        self.dirty_slices.clear()
        return affected

    def _recompute(self, affected: set[Ref]) -> Delta:
        """The model's steps for ``affected`` (and rows for Services whose frontend
        addresses changed owner), in the model's order."""
        delta = Delta()
        alloc, cfg = self.alloc, self.cfg
        refs = sorted(r for r in affected if r in self.inputs.services or r in self.parts)
        old_parts = {ref: self.parts.get(ref) for ref in refs}
        new_parts = {ref: model.new_part(ref, *self.inputs.services[ref], self.inputs.memo)
                     for ref in refs if ref in self.inputs.services}
        claims = {ref: model.claim_requested(part, alloc, cfg) for ref, part in new_parts.items()}
        for ref, part in new_parts.items():
            model.plan_service(part, self._manual_slices(ref), self._candidate_pods(part), self.nodes,
                               alloc, cfg, claims[ref])

        touched: set[str] = set()
        for ref in refs:
            old, new = old_parts[ref], new_parts.get(ref)
            if old is not None:
                self._unindex_part(old)
                self._count(old.used_plan, -1)
                self._count(old.used_rows, -1)
                delta.frontends.update(old.frontends)
                if old.endpoints is not None:
                    self.endpoints.pop(old.endpoints_key, None)
                    delta.endpoints.add(old.endpoints_key)
                del self.parts[ref]
            old_keys = set(old.wanted()) if old is not None else set()
            new_keys = set(new.wanted()) if new is not None else set()
            for key in old_keys - new_keys:
                self.wanters[key].discard(ref)
                if not self.wanters[key]:
                    del self.wanters[key]
            for key in new_keys - old_keys:
                self.wanters.setdefault(key, set()).add(ref)
            touched |= old_keys ^ new_keys
            if new is not None:
                self.parts[ref] = new
                self._index_part(new)
                self._count(new.used_plan, +1)
            delta.statuses.add(ref)

        rows = set(new_parts)
        for key in touched:
            wanting = self.wanters.get(key)
            owner = min(wanting) if wanting else None
            if self.owners.get(key) != owner:
                if owner is None:
                    del self.owners[key]
                else:
                    self.owners[key] = owner
                    rows |= wanting  # type: ignore[arg-type]
        for ref in sorted(rows):
            part = self.parts[ref]
            if ref not in new_parts:  # only its rows: the frontend addresses it owns changed
                self._count(part.used_rows, -1)
                delta.frontends.update(part.frontends)
            model.build_rows(part, self.owners, self.nodes, alloc, cfg)
            self._count(part.used_rows, +1)
        for key in delta.frontends:
            self.frontends.pop(key, None)
        for ref in sorted(rows):
            part = self.parts[ref]
            self.frontends.update(part.frontends)
            delta.frontends.update(part.frontends)
        for part in new_parts.values():
            if part.endpoints is not None:
                self.endpoints[part.endpoints_key] = part.endpoints
                delta.endpoints.add(part.endpoints_key)
        for ref in refs:
            self._unmark(ref)
        for ref in rows | set(new_parts):
            part = self.parts[ref]
            self._unmark(ref)
            self._mark(part)
            delta.problems += [p for p in (part.decode_problem, *part.plan_problems,
                                           *part.clash_problems, *part.row_problems) if p]
        delta.recomputed = len(rows | set(refs))
        return delta

    def take_unused(self) -> list[list[int]]:
        """Per pool, the values no Service holds any more (release them once the output
        without them is written). Services that missed a value of a pool that releases
        some are recomputed by the next update."""
        unused = []
        for pool, counts, zero, blocked in zip(self.alloc.pools(), self.counts, self.zero, self.blocked,
                                               strict=True):
            free = sorted(v for v in zero if v not in counts and v in pool.owners and v not in pool.pending)
            zero.clear()
            if free:
                self.retry |= blocked
            unused.append(free)
        return unused

    # ------------------------------------------------------------------ indexes

    def _mark(self, part: ServicePart) -> None:
        if part.has_problems():
            self.troubled.add(part.ref)
        for i in part.missed_plan | part.missed_rows:
            self.blocked[i].add(part.ref)

    def _unmark(self, ref: Ref) -> None:
        self.troubled.discard(ref)
        for blocked in self.blocked:
            blocked.discard(ref)

    def _count(self, used: tuple[frozenset[int], ...], step: int) -> None:
        for counts, zero, values in zip(self.counts, self.zero, used, strict=True):
            for value in values:
                count = counts.get(value, 0) + step
                if count:
                    counts[value] = count
                else:
                    del counts[value]
                    zero.add(value)

    def _index_slice(self, ref: Ref, eps: EndpointSlice) -> Ref | None:
        if not eps.service_name:
            return None
        service = (ref[0], eps.service_name)
        self.slice_service[ref] = service
        self.manual.setdefault(service, set()).add(ref)
        return service

    def _manual_slices(self, ref: Ref) -> list[EndpointSlice]:
        return [self.views.slices[s] for s in sorted(self.manual.get(ref, ()))]

    def _index_pod(self, view: PodView, add: bool) -> None:
        ref = (view.namespace, view.name)
        for key, value in view.labels.items():
            label = (view.namespace, key, value)
            if add:
                self.pods_by_label.setdefault(label, set()).add(ref)
            else:
                refs = self.pods_by_label.get(label)
                if refs is not None:
                    refs.discard(ref)
                    if not refs:
                        del self.pods_by_label[label]

    def _selecting(self, view: PodView) -> set[Ref]:
        """The Services whose selector matches the pod's labels."""
        found: set[Ref] = set()
        for key, value in view.labels.items():
            for ref in self.selecting.get((view.namespace, key, value), ()):
                svc = self.parts[ref].svc
                assert svc is not None
                if all(view.labels.get(k) == v for k, v in svc.spec.selector.items()):
                    found.add(ref)
        return found

    def _candidate_pods(self, part: ServicePart) -> list[PodView]:
        """The pods a Service's selector picks, in Pod order."""
        svc = part.svc
        if svc is None or not self.cfg.derive_slices or not svc.spec.selector:
            return []
        ns = part.ref[0]
        sets = [self.pods_by_label.get((ns, k, v), set()) for k, v in svc.spec.selector.items()]
        smallest = min(sets, key=len)
        chosen = [self.views.pods[ref] for ref in sorted(smallest)]
        return [view for view in chosen if all(view.labels.get(k) == v for k, v in svc.spec.selector.items())]

    def _index_part(self, part: ServicePart) -> None:
        ref, svc = part.ref, part.svc
        if svc is None:
            return
        if self.cfg.derive_slices and svc.spec.selector:
            key, value = min(svc.spec.selector.items())
            label = (ref[0], key, value)
            self.selector_label[ref] = label
            self.selecting.setdefault(label, set()).add(ref)
        if svc.spec.type in ("NodePort", "LoadBalancer"):
            self.node_port_services.add(ref)
        names = frozenset(ep.node_name for eps in part.slices for ep in eps.endpoints if ep.node_name)
        if names:
            self.service_nodes[ref] = names
            for name in names:
                self.on_node.setdefault(name, set()).add(ref)

    def _unindex_part(self, part: ServicePart) -> None:
        ref = part.ref
        label = self.selector_label.pop(ref, None)
        if label is not None:
            self.selecting[label].discard(ref)
            if not self.selecting[label]:
                del self.selecting[label]
        self.node_port_services.discard(ref)
        for name in self.service_nodes.pop(ref, ()):
            self.on_node[name].discard(ref)
            if not self.on_node[name]:
                del self.on_node[name]


def _backend(view: PodView | None) -> PodView | None:
    """A pod's view if it can be a derived backend (only those are indexed)."""
    return view if view is not None and model.has_address(view) else None
