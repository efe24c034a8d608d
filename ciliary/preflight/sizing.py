"""BPF map sizing: the entries a scale puts in each map of a node, against the map's
``max_entries``, with the setting that raises it and the kernel memory it costs.

Pure. The shared library cannot import the node executor, so the map catalogue (``MAPS``:
type, key and value sizes, the ``MapSizes`` field and default that size it) is stated here
and ``tests/unit/test_preflight_sizing.py`` checks it against the executor's own
definitions (``services.node.layouts`` ctypes sizes, ``services.node.datapath.MapSizes``
defaults, ``services.node.socklb`` layouts and sizes), so the two cannot drift apart. A
running instance's real sizes come from its node executors' health (``maps``: entries and
max per map), which reflects every ``CILIARY_MAP_<NAME>`` override.

Invariants:
- Expected entries per node, from ``Scale`` (``None`` where the scale does not say):
  ipcache = (endpoints + nodes) per cluster of the mesh + CIDR identities + 1 (world);
  lxc = endpoints on the node; policy = local identities (at most one per local endpoint)
  x entries per identity; lb4_services = frontends x (backends + 1) (a slot per backend
  plus slot 0), frontends = services x ports; lb4_backends = frontends x backends (an
  upper bound: a pod behind several services counts each time); lb4_reverse_nat =
  frontends; lb4_maglev = Maglev frontends x M. Maps the datapath fills from traffic (LRU:
  conntrack, NAT, affinity, socket rev-NAT) and the ring buffer have no expectation.
- Fill bands are those of map pressure (``ciliary.mappressure``): ``ok`` below warn,
  ``warn``, ``critical``, and ``over`` above 100 %. A map at ``warn`` or worse makes its
  setting's suggestion: the next power of two that brings the fill below the warn
  threshold; one setting (``CILIARY_MAP_LB``) sizes several maps, so its suggestion is the
  largest of theirs and every map it sizes shows it.
- Memory is the kernel's own accounting (``htab_map_mem_usage``, shown as ``memlock`` in
  a map's fdinfo) on x86-64 Linux 6.x: a hash map is its 896-byte ``bpf_htab``, then
  ``roundup_pow_of_two(max_entries)`` 16-byte buckets and elements of a 48-byte header
  plus key and value rounded to 8 bytes (per-CPU values once per CPU). Preallocated maps
  (hash, lru_hash, percpu_hash) pay for ``max_entries`` elements at creation, a plain hash
  one spare element and pointer per CPU more; the others (``BPF_F_NO_PREALLOC`` hash,
  lpm_trie: 64-byte nodes, about two per entry) pay per entry held; the ring buffer is
  its pages. The e2e test compares the estimate with ``memlock`` of the maps the datapath
  creates.
- Hard limits the settings cannot raise: 16-bit backend slots (65,535 backends per
  service) and 16-bit reverse-NAT ids (65,535 frontends).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ciliary import mappressure

HASH, LRU_HASH, PERCPU_HASH, LPM_TRIE, RINGBUF = "hash", "lru_hash", "percpu_hash", "lpm_trie", "ringbuf"
PAGE = 4096
HTAB_BYTES = 896  # struct bpf_htab
BUCKET_BYTES = 16
ELEM_HEADER_BYTES = 48
LPM_NODE_BYTES = 64
LPM_NODES_PER_ENTRY = 2
SLOT_MAX = 0xFFFF  # lb4_key.backend_slot, lb4_service.count
REV_NAT_MAX = 0xFFFF  # lb4_reverse_nat_key.rev_nat_id
ENV_PREFIX = "CILIARY_MAP_"

# MapSizes fields and their defaults (Cilium's sizes), the node executor's configuration.
DEFAULT_SIZES: dict[str, int] = {
    "ipcache": 512000, "lxc": 65535, "policy": 16384, "ct": 1048576, "lb": 65536,
    "metrics": 1024, "events_pages": 256, "maglev": 1048576, "maglev_table": 16381,
    "affinity": 65536, "nat": 65536,
}
# Socket-LB maps are sized by the socket layer itself (not settable).
FIXED_SIZES: dict[str, int] = {"sock_revnat": 262144, "sock_affinity": 65536}


@dataclass(frozen=True)
class MapSpec:
    name: str
    kind: str
    key_size: int
    value_size: int
    size: str  # a DEFAULT_SIZES field (settable) or a FIXED_SIZES name
    prealloc: bool
    holds: str  # what one entry is

    @property
    def setting(self) -> str:
        return f"{ENV_PREFIX}{self.size.upper()}" if self.size in DEFAULT_SIZES else ""


MAPS: tuple[MapSpec, ...] = (
    MapSpec("ciliary_ipcache", LPM_TRIE, 8, 8, "ipcache", False, "an IP prefix of a pod, node or CIDR"),
    MapSpec("ciliary_lxc", HASH, 4, 16, "lxc", True, "a local endpoint"),
    MapSpec("ciliary_policy", HASH, 12, 8, "policy", True, "{local identity, peer identity, port, proto, direction}"),
    MapSpec("ciliary_ct4_global", LRU_HASH, 16, 48, "ct", True, "a connection (LRU)"),
    MapSpec("ciliary_lb4_services", HASH, 12, 12, "lb", True, "a frontend's slot 0 or a backend slot"),
    MapSpec("ciliary_lb4_backends", HASH, 4, 8, "lb", True, "a backend address and port"),
    MapSpec("ciliary_lb4_reverse_nat", HASH, 2, 8, "lb", True, "a frontend"),
    MapSpec("ciliary_lb4_maglev", HASH, 8, 4, "maglev", False, "a Maglev table slot (M per Maglev frontend)"),
    MapSpec("ciliary_lb_affinity_match", HASH, 8, 4, "lb", False, "a backend of a ClientIP-affinity frontend"),
    MapSpec("ciliary_lb4_affinity", LRU_HASH, 8, 16, "affinity", True, "a client's affinity (LRU)"),
    MapSpec("ciliary_nat4", LRU_HASH, 16, 16, "nat", True, "a NodePort SNAT direction (LRU)"),
    MapSpec("ciliary_metrics", PERCPU_HASH, 4, 16, "metrics", True, "a {reason, direction} counter"),
    MapSpec("ciliary_events", RINGBUF, 0, 0, "events_pages", True, "ring buffer pages of flow events"),
    MapSpec("ciliary_lb4_reverse_sk", LRU_HASH, 16, 8, "sock_revnat", True, "a translated socket (LRU)"),
    MapSpec("ciliary_lb4_affinity_sock", LRU_HASH, 16, 16, "sock_affinity", True, "a socket-layer affinity (LRU)"),
)
MAPS_BY_NAME: dict[str, MapSpec] = {m.name: m for m in MAPS}


@dataclass(frozen=True)
class Scale:
    """The scale to size for; ``None`` where unknown."""

    services: int | None = None
    backends: int | None = None  # per service
    ports: int = 1  # per service
    maglev_services: int = 0
    endpoints: int | None = None  # cluster-wide
    endpoints_per_node: int | None = None  # the busiest node
    nodes: int | None = None
    identities: int | None = None  # cluster-wide
    policy_entries: int | None = None  # per local identity
    clusters: int = 1
    cidr_identities: int = 0

    @property
    def frontends(self) -> int | None:
        return None if self.services is None else self.services * max(1, self.ports)


def sizes_from_env(env: Mapping[str, str]) -> tuple[dict[str, int], list[str]]:
    """``DEFAULT_SIZES`` with the ``CILIARY_MAP_<NAME>`` overrides of ``env``; bad values
    are reported and the default kept (as the node executor reads them)."""
    sizes, errors = dict(DEFAULT_SIZES), []
    for name in DEFAULT_SIZES:
        raw = env.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is None or not raw.strip():
            continue
        try:
            value = int(raw)
            if value < 1:
                raise ValueError
        except ValueError:
            errors.append(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a positive integer; using {sizes[name]}")
            continue
        sizes[name] = value
    return sizes, errors


def max_entries(spec: MapSpec, sizes: Mapping[str, int]) -> int:
    if spec.size in FIXED_SIZES:
        return FIXED_SIZES[spec.size]
    return int(sizes.get(spec.size, DEFAULT_SIZES[spec.size]))


def expected_entries(scale: Scale, sizes: Mapping[str, int] = DEFAULT_SIZES) -> dict[str, int | None]:
    """Expected entries per map on the busiest node (``None``: not estimated)."""
    out: dict[str, int | None] = dict.fromkeys(MAPS_BY_NAME)
    clusters = max(1, scale.clusters)
    if scale.endpoints is not None:
        out["ciliary_ipcache"] = (scale.endpoints + (scale.nodes or 0)) * clusters + scale.cidr_identities + 1
    if scale.endpoints_per_node is not None:
        out["ciliary_lxc"] = scale.endpoints_per_node
    if scale.policy_entries is not None and scale.endpoints_per_node is not None:
        local = scale.endpoints_per_node if scale.identities is None else min(scale.identities, scale.endpoints_per_node)
        out["ciliary_policy"] = local * scale.policy_entries
    frontends = scale.frontends
    if frontends is not None:
        out["ciliary_lb4_reverse_nat"] = frontends
        out["ciliary_lb4_maglev"] = (scale.maglev_services * max(1, scale.ports)
                                     * int(sizes.get("maglev_table", DEFAULT_SIZES["maglev_table"])))
        if scale.backends is not None:
            out["ciliary_lb4_services"] = frontends * (scale.backends + 1)
            out["ciliary_lb4_backends"] = frontends * scale.backends
    return out


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def map_memory(spec: MapSpec, entries_max: int, held: int | None, ncpus: int = 1) -> int:
    """Estimated kernel bytes of ``spec`` sized ``entries_max`` holding ``held`` entries."""
    if spec.kind == RINGBUF:
        return entries_max * PAGE
    if spec.kind == LPM_TRIE:
        return min(held or 0, entries_max) * LPM_NODE_BYTES * LPM_NODES_PER_ENTRY
    cpus = max(1, ncpus)
    buckets = HTAB_BYTES + _pow2(entries_max) * BUCKET_BYTES
    if spec.kind == PERCPU_HASH:
        elem = ELEM_HEADER_BYTES + _round8(spec.key_size) + 8 + _round8(spec.value_size) * cpus
    else:
        elem = ELEM_HEADER_BYTES + _round8(spec.key_size) + _round8(spec.value_size)
    count = entries_max if spec.prealloc else min(held or 0, entries_max)
    if spec.kind == HASH and spec.prealloc:  # a spare element per CPU for updates, and its pointer
        count += cpus
        buckets += 8 * cpus
    return buckets + count * elem


def suggest(expected: int) -> int:
    """The next power of two that holds ``expected`` below the warn threshold."""
    return _pow2(int(expected / mappressure.WARN) + 1)


@dataclass(frozen=True)
class MapSizing:
    name: str
    kind: str
    holds: str
    expected: int | None
    max_entries: int
    fill: float | None
    band: str  # mappressure band, "over" above 100 %, "-" when not estimated
    setting: str  # env variable, "" when fixed
    suggested: int | None
    memory: int  # bytes at the current size (holding ``expected``)
    memory_suggested: int | None


@dataclass
class SizingReport:
    maps: list[MapSizing] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)  # hard limits exceeded
    settings: dict[str, int] = field(default_factory=dict)  # env variable -> suggested value

    @property
    def memory(self) -> int:
        return sum(m.memory for m in self.maps)

    @property
    def memory_suggested(self) -> int:
        return sum(m.memory if m.memory_suggested is None else m.memory_suggested for m in self.maps)

    def worst(self) -> str:
        order = {"-": 0, **{b: i + 1 for i, b in enumerate(mappressure.BANDS)}, "over": len(mappressure.BANDS) + 1}
        return max((m.band for m in self.maps), key=lambda b: order.get(b, 0), default="-")


def band_of(fill: float | None) -> str:
    if fill is None:
        return "-"
    return "over" if fill > 1.0 else mappressure.band(fill)


def size_maps(scale: Scale, sizes: Mapping[str, int] = DEFAULT_SIZES, *,
              live_max: Mapping[str, int] | None = None, ncpus: int = 1) -> SizingReport:
    """Every map of ``MAPS`` against the expectation of ``scale``. ``live_max`` (map name ->
    max entries, from a running node) wins over ``sizes``."""
    expected = expected_entries(scale, sizes)
    report = SizingReport()
    rows = []
    for spec in MAPS:
        cap = int((live_max or {}).get(spec.name) or max_entries(spec, sizes))
        want = expected.get(spec.name)
        fill = None if want is None or cap <= 0 else want / cap
        band = band_of(fill)
        if want is not None and band not in ("-", mappressure.OK) and spec.setting:
            report.settings[spec.setting] = max(report.settings.get(spec.setting, 0), suggest(want))
        rows.append((spec, cap, want, fill, band))
    for spec, cap, want, fill, band in rows:  # a setting raises every map it sizes
        suggested = report.settings.get(spec.setting) if spec.setting else None
        report.maps.append(MapSizing(
            name=spec.name, kind=spec.kind, holds=spec.holds, expected=want, max_entries=cap,
            fill=fill, band=band, setting=spec.setting, suggested=suggested,
            memory=map_memory(spec, cap, want, ncpus),
            memory_suggested=None if suggested is None else map_memory(spec, suggested, want, ncpus),
        ))
    if scale.backends is not None and scale.backends > SLOT_MAX:
        report.limits.append(f"{scale.backends:,} backends per service: a service holds at most "
                             f"{SLOT_MAX:,} (16-bit backend slots)")
    if scale.frontends is not None and scale.frontends > REV_NAT_MAX:
        report.limits.append(f"{scale.frontends:,} frontends (services x ports): at most {REV_NAT_MAX:,} "
                             "(16-bit reverse-NAT ids)")
    return report
