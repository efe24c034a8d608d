"""The narrow interface through which desired state reaches BPF maps.

``MapOps`` is what reconcilers call; it has three implementations:
``BccMapOps`` over the maps of a loaded datapath, ``FakeMapOps`` (a dict that
dumps to stable text) and ``FaultyMapOps`` (fails a seeded fraction of calls).

Invariants:
- Keys and values are the ctypes layouts of ``layouts.ALL_MAPS`` (``MAPS``, which
  reconcilers own, plus the datapath-written ``STATE_MAPS``); any other map name
  is an error.
- ``update`` is an upsert and ``delete`` of a missing key succeeds: every
  operation is idempotent, so a reconciler may retry any call.
- ``*_batch`` has the same effect as the loop of single calls; on a failure
  part of the batch may have been applied (retrying the whole batch is safe).
- ``dump`` decodes every entry; per-CPU values are summed across CPUs. ``BccMapOps``
  also has ``dump_bytes`` (the same entries as raw bytes, hash maps by batch lookup),
  which the resync prefers where an implementation has it (hash maps and LPM tries by
  the kernel's batch lookup).
- Every failure is raised as ``MapOpsError``.
- The entry builders (``ipcache_entry`` ...) are pure and are the one place
  that turns desired-state fields into map keys and values; which entries a
  whole record becomes (a policy, a frontend) is ``translate``'s.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from services.node import layouts as L
from services.node import mapbatch
from services.node.layouts import Layout


class MapOpsError(RuntimeError):
    """A map operation failed; the reconciler retries it later."""


@runtime_checkable
class MapOps(Protocol):
    def update(self, map_name: str, key: Layout, value: Layout) -> None: ...

    def update_batch(self, map_name: str, items: Sequence[tuple[Layout, Layout]]) -> None: ...

    def delete(self, map_name: str, key: Layout) -> None: ...

    def delete_batch(self, map_name: str, keys: Sequence[Layout]) -> None: ...

    def dump(self, map_name: str) -> dict[Layout, Layout]: ...


def _layouts(map_name: str) -> tuple[type[Layout], type[Layout]]:
    try:
        return L.ALL_MAPS[map_name]
    except KeyError:
        raise MapOpsError(f"unknown map {map_name!r}") from None


def _check(map_name: str, key: Layout, value: Layout | None = None) -> None:
    kt, vt = _layouts(map_name)
    if type(key) is not kt:
        raise MapOpsError(f"{map_name}: key must be {kt.__name__}, got {type(key).__name__}")
    if value is not None and type(value) is not vt:
        raise MapOpsError(f"{map_name}: value must be {vt.__name__}, got {type(value).__name__}")


# ---- bcc ----------------------------------------------------------------------------


class BccMapOps:
    """MapOps over bcc tables (the pinned maps of a loaded ``Datapath``)."""

    def __init__(self, tables: Mapping[str, Any]):
        self._tables = dict(tables)

    def _table(self, map_name: str):
        _layouts(map_name)
        try:
            return self._tables[map_name]
        except KeyError:
            raise MapOpsError(f"map {map_name!r} is not loaded") from None

    def update(self, map_name: str, key: Layout, value: Layout) -> None:
        _check(map_name, key, value)
        t = self._table(map_name)
        try:
            t[t.Key.from_buffer_copy(bytes(key))] = t.Leaf.from_buffer_copy(bytes(value))
        except Exception as e:
            raise MapOpsError(f"{map_name}: update {key!r}: {e}") from e

    def update_batch(self, map_name: str, items: Sequence[tuple[Layout, Layout]]) -> None:
        items = list(items)
        if not items:
            return
        for k, v in items:
            _check(map_name, k, v)
        t = self._table(map_name)
        if len(items) > 1 and map_name != L.IPCACHE:  # LPM tries have no batch ops
            # one buffer per side (bcc's Key/Leaf have the layouts' sizes: tests/unit/test_layouts.py)
            keys = (t.Key * len(items)).from_buffer_copy(b"".join(bytes(k) for k, _ in items))
            vals = (t.Leaf * len(items)).from_buffer_copy(b"".join(bytes(v) for _, v in items))
            try:
                t.items_update_batch(keys, vals)
                return
            except Exception:
                pass  # kernel or map type without batch support: fall back
        for k, v in items:
            self.update(map_name, k, v)

    def delete(self, map_name: str, key: Layout) -> None:
        _check(map_name, key)
        t = self._table(map_name)
        try:
            del t[t.Key.from_buffer_copy(bytes(key))]
        except KeyError:
            pass
        except Exception as e:
            raise MapOpsError(f"{map_name}: delete {key!r}: {e}") from e

    def delete_batch(self, map_name: str, keys: Sequence[Layout]) -> None:
        # A kernel batch delete stops at the first missing key, which would
        # break idempotence; single deletes are exact.
        for k in keys:
            self.delete(map_name, k)

    def dump(self, map_name: str) -> dict[Layout, Layout]:
        kt, vt = _layouts(map_name)
        t = self._table(map_name)
        out: dict[Layout, Layout] = {}
        try:
            # key by key: bcc's items_lookup_batch (Debian's bcc) passes one counter as both
            # the batch token and the count, which returns wrong or partial dumps
            for k, v in t.items():
                key = kt.from_bytes(ct.string_at(ct.addressof(k), ct.sizeof(k)))
                if isinstance(v, (list, tuple, ct.Array)):
                    out[key] = _sum_percpu(vt, v)
                else:
                    out[key] = vt.from_bytes(ct.string_at(ct.addressof(v), ct.sizeof(v)))
        except MapOpsError:
            raise
        except Exception as e:
            raise MapOpsError(f"{map_name}: dump: {e}") from e
        return out


    def dump_bytes(self, map_name: str) -> dict[bytes, bytes]:
        """``dump`` as key bytes -> value bytes (what a resync learns from). Hash maps are
        read with the kernel's batch lookup (``mapbatch``: about ten times faster than key
        by key, with the interpreter lock released while the kernel copies); per-CPU maps,
        and any map the kernel has no batch lookup for, key by key."""
        t = self._table(map_name)
        if "PerCpu" not in type(t).__name__:
            try:
                return mapbatch.lookup_batch(t.map_fd, ct.sizeof(t.Key), ct.sizeof(t.Leaf))
            except mapbatch.BatchUnsupported:
                pass
            except OSError as e:
                raise MapOpsError(f"{map_name}: dump: {e}") from e
        return dump_as_bytes(self.dump(map_name))


def dump_as_bytes(dumped: Mapping[Layout, Layout]) -> dict[bytes, bytes]:
    """A ``dump`` as key bytes -> value bytes (what a resync learns from)."""
    return {bytes(k): bytes(v) for k, v in dumped.items()}


def _sum_percpu(vt: type[Layout], values: Iterable[Any]) -> Layout:
    total = vt()
    for v in values:
        one = vt.from_bytes(ct.string_at(ct.addressof(v), ct.sizeof(v)))
        for name, _ in vt._fields_:
            setattr(total, name, getattr(total, name) + getattr(one, name))
    return total


# ---- fake and faulty ---------------------------------------------------------------


class FakeMapOps:
    """In-memory MapOps; ``dump_text`` is stable, sorted and human-readable."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[bytes, tuple[Layout, Layout]]] = {n: {} for n in L.ALL_MAPS}

    def update(self, map_name: str, key: Layout, value: Layout) -> None:
        _check(map_name, key, value)
        self.maps[map_name][bytes(key)] = (type(key).from_bytes(bytes(key)),
                                           type(value).from_bytes(bytes(value)))

    def update_batch(self, map_name: str, items: Sequence[tuple[Layout, Layout]]) -> None:
        for k, v in items:
            self.update(map_name, k, v)

    def delete(self, map_name: str, key: Layout) -> None:
        _check(map_name, key)
        self.maps[map_name].pop(bytes(key), None)

    def delete_batch(self, map_name: str, keys: Sequence[Layout]) -> None:
        for k in keys:
            self.delete(map_name, k)

    def dump(self, map_name: str) -> dict[Layout, Layout]:
        _layouts(map_name)  # list() first: a snapshot, also while another thread writes
        return {k: v for k, v in list(self.maps[map_name].values())}

    def dump_text(self) -> str:
        lines = []
        for name in sorted(self.maps):
            for kb in sorted(self.maps[name]):
                k, v = self.maps[name][kb]
                lines.append(f"{name} {k!r} => {v!r}")
        return "\n".join(lines) + ("\n" if lines else "")


class FaultyMapOps:
    """Wraps a MapOps and fails a seeded fraction ``rate`` of calls before they run."""

    def __init__(self, inner: MapOps, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        self.inner = inner
        self.rate = rate
        self.failures = 0
        self._rng = random.Random(seed)

    def _maybe_fail(self, op: str, map_name: str) -> None:
        if self._rng.random() < self.rate:
            self.failures += 1
            raise MapOpsError(f"injected failure: {op} {map_name}")

    def update(self, map_name: str, key: Layout, value: Layout) -> None:
        self._maybe_fail("update", map_name)
        self.inner.update(map_name, key, value)

    def update_batch(self, map_name: str, items: Sequence[tuple[Layout, Layout]]) -> None:
        self._maybe_fail("update_batch", map_name)
        self.inner.update_batch(map_name, items)

    def delete(self, map_name: str, key: Layout) -> None:
        self._maybe_fail("delete", map_name)
        self.inner.delete(map_name, key)

    def delete_batch(self, map_name: str, keys: Sequence[Layout]) -> None:
        self._maybe_fail("delete_batch", map_name)
        self.inner.delete_batch(map_name, keys)

    def dump(self, map_name: str) -> dict[Layout, Layout]:
        self._maybe_fail("dump", map_name)
        return self.inner.dump(map_name)


# ---- desired-state entries -----------------------------------------------------------


class Entry(NamedTuple):
    map: str
    key: Layout
    value: Layout


_PROTOS = {"tcp": L.IPPROTO_TCP, "udp": L.IPPROTO_UDP, "icmp": L.IPPROTO_ICMP, "any": 0}
_DIRS = {"ingress": L.DIR_INGRESS, "egress": L.DIR_EGRESS}


def proto_number(proto: str | int) -> int:
    return proto if isinstance(proto, int) else _PROTOS[proto.lower()]


def ipcache_entry(cidr: str, identity: int, flags: int = 0) -> Entry:
    net = ipaddress.ip_network(cidr, strict=False)
    key = L.IpcacheKey(prefixlen=net.prefixlen, ip=L.ip4(str(net.network_address)))
    return Entry(L.IPCACHE, key, L.IpcacheValue(identity=identity, flags=flags))


def endpoint_entry(ifindex: int, ep_id: int, identity: int, ip: str, *,
                   policy_ingress: bool = False, policy_egress: bool = False,
                   audit_ingress: bool = False, audit_egress: bool = False) -> Entry:
    flags = ((L.EP_F_POLICY_INGRESS if policy_ingress else 0)
             | (L.EP_F_POLICY_EGRESS if policy_egress else 0)
             | (L.EP_F_AUDIT_INGRESS if audit_ingress else 0)
             | (L.EP_F_AUDIT_EGRESS if audit_egress else 0))
    return Entry(L.LXC, L.EndpointKey(ifindex=ifindex),
                 L.EndpointInfo(ep_id=ep_id, identity=identity, ipv4=L.ip4(ip), flags=flags))


def policy_entry(local_id: int, peer_id: int, dport: int, proto: str | int, direction: str,
                 *, deny: bool = False, audit: bool = False, rule_ref: int = 0) -> Entry:
    """``peer_id``/``dport``/``proto`` 0 (or "any") are wildcards."""
    key = L.PolicyKey(local_id=local_id, peer_id=peer_id, dport=L.port(dport),
                      proto=proto_number(proto), direction=_DIRS[direction])
    value = L.PolicyValue(verdict=L.POLICY_DENY if deny else L.POLICY_ALLOW,
                          flags=L.POLICY_F_AUDIT if audit else 0, rule_ref=rule_ref)
    return Entry(L.POLICY, key, value)


def lb_service_entries(vip: str, port: int, proto: str | int, rev_nat_id: int,
                       backend_ids: Sequence[int], *, flags: int = 0, flags2: int = 0,
                       affinity_timeout: int = 0) -> list[Entry]:
    """One slot per backend id (1..n), then slot 0 (count, rev-NAT id, ``flags``
    / ``flags2`` (``SVC_FLAG_*``), and the affinity timeout in seconds in its
    ``backend_id``, as Cilium's lb4_service union).

    Slot 0 comes last so that, applied in order, the datapath never sees a
    count larger than the slots already written (Cilium's ordering). Shrinking
    a service is the reverse: write slot 0 first, then delete the extra slots.
    """
    p = proto_number(proto)

    def key(slot: int) -> L.Lb4Key:
        return L.Lb4Key(address=L.ip4(vip), dport=L.port(port), backend_slot=slot, proto=p)

    out = [Entry(L.LB4_SERVICES, key(slot), L.Lb4Service(backend_id=bid, rev_nat_index=rev_nat_id))
           for slot, bid in enumerate(backend_ids, start=1)]
    out.append(Entry(L.LB4_SERVICES, key(0),
                     L.Lb4Service(backend_id=affinity_timeout, count=len(backend_ids),
                                  rev_nat_index=rev_nat_id, flags=flags, flags2=flags2)))
    return out


def maglev_hash(saddr: str, sport: int, dport: int, proto: str | int,
                seed: int = L.LB_MAGLEV_SEED) -> int:
    """The datapath's Maglev hash of a flow (``lb4_hash``: jhash_3words over the
    client address, ``dport << 16 | sport`` of the raw __be16 fields, and proto)."""
    return jhash_3words(L.ip4(saddr), ((L.port(dport) << 16) | L.port(sport)) & 0xFFFFFFFF,
                        proto_number(proto), seed)


def _rol32(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & 0xFFFFFFFF


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """Linux ``jhash_3words`` (bpf/lib/jhash.h)."""
    m = 0xFFFFFFFF
    initval = (initval + 0xDEADBEEF + (3 << 2)) & m
    a, b, c = (a + initval) & m, (b + initval) & m, (c + initval) & m
    c ^= b; c = (c - _rol32(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - _rol32(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & m  # noqa: E702
    return c


def fit_maglev_table(table: Sequence[int], size: int) -> list[int]:
    """``table`` with exactly ``size`` entries: itself when it already has that length,
    else resampled (entry ``i`` is ``table[i * len(table) // size]``), so a table
    computed for another M keeps its proportions. Empty stays empty."""
    if not table or len(table) == size:
        return list(table)
    n = len(table)
    return [table[i * n // size] for i in range(size)]


def lb_maglev_entries(rev_nat_id: int, table: Sequence[int]) -> list[Entry]:
    """The Maglev lookup table of one service: index i -> backend id table[i]."""
    return [Entry(L.LB4_MAGLEV, L.Lb4MaglevKey(rev_nat_id=rev_nat_id, index=i),
                  L.Lb4MaglevValue(backend_id=bid)) for i, bid in enumerate(table)]


def lb_affinity_match_entries(rev_nat_id: int, backend_ids: Iterable[int]) -> list[Entry]:
    """{backend, service} pairs that a ClientIP affinity entry may still name."""
    return [Entry(L.LB_AFFINITY_MATCH, L.LbAffinityMatchKey(backend_id=bid, rev_nat_id=rev_nat_id),
                  L.LbAffinityMatchValue()) for bid in sorted(set(backend_ids))]


def lb_backend_entry(backend_id: int, ip: str, port: int, proto: str | int) -> Entry:
    return Entry(L.LB4_BACKENDS, L.Lb4BackendKey(backend_id=backend_id),
                 L.Lb4Backend(address=L.ip4(ip), port=L.port(port), proto=proto_number(proto)))


def lb_revnat_entry(rev_nat_id: int, vip: str, port: int) -> Entry:
    return Entry(L.LB4_REVERSE_NAT, L.Lb4ReverseNatKey(rev_nat_id=rev_nat_id),
                 L.Lb4ReverseNat(address=L.ip4(vip), port=L.port(port)))


def apply(ops: MapOps, entries: Iterable[Entry]) -> None:
    """Upsert ``entries`` with one batch per map, in first-seen map order and, within a
    map, in the given order (list backends and reverse-NAT before the services
    that reference them)."""
    by_map: dict[str, list[tuple[Layout, Layout]]] = {}
    for e in entries:
        by_map.setdefault(e.map, []).append((e.key, e.value))
    for name, items in by_map.items():
        ops.update_batch(name, items)


def remove(ops: MapOps, entries: Iterable[Entry]) -> None:
    by_map: dict[str, list[Layout]] = {}
    for e in entries:
        by_map.setdefault(e.map, []).append(e.key)
    for name, keys in by_map.items():
        ops.delete_batch(name, keys)


def gc_nat(ops: MapOps, now_ns: int | None = None) -> int:
    """Delete NodePort SNAT entries (``ciliary_nat4``) that expired before ``now_ns``."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    expired = [k for k, v in ops.dump(L.NAT4).items() if v.expires_ns <= now]
    ops.delete_batch(L.NAT4, expired)
    return len(expired)


def gc_conntrack(ops: MapOps, now_ns: int | None = None) -> int:
    """Delete conntrack entries that expired before ``now_ns`` (CLOCK_MONOTONIC,
    the clock of bpf_ktime_get_ns). Returns how many were deleted."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    expired = [k for k, v in ops.dump(L.CT).items() if v.expires_ns <= now]
    ops.delete_batch(L.CT, expired)
    return len(expired)


__all__ = [
    "BccMapOps", "Entry", "FakeMapOps", "FaultyMapOps", "MapOps", "MapOpsError", "apply", "dump_as_bytes",
    "endpoint_entry", "fit_maglev_table", "gc_conntrack", "gc_nat", "ipcache_entry", "jhash_3words",
    "lb_affinity_match_entries", "lb_backend_entry", "lb_maglev_entries",
    "lb_revnat_entry", "lb_service_entries", "maglev_hash", "policy_entry", "proto_number", "remove",
]
