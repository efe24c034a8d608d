"""Preflight map sizing: the catalogue matches the node executor's maps, and the arithmetic."""

from __future__ import annotations

import ctypes

import pytest

from ciliary import mappressure
from ciliary.preflight import sizing
from ciliary.preflight.sizing import MAPS_BY_NAME, Scale, size_maps


def test_the_catalogue_is_the_node_executors_maps() -> None:
    from services.node import layouts as L
    from services.node import socklb
    from services.node.datapath import MapSizes

    for name, (key, value) in L.ALL_MAPS.items():
        spec = MAPS_BY_NAME[name]
        assert (spec.key_size, spec.value_size) == (ctypes.sizeof(key), ctypes.sizeof(value)), name
    for name, (key, value) in socklb.MAP_LAYOUTS.items():
        spec = MAPS_BY_NAME[name]
        assert (spec.key_size, spec.value_size) == (ctypes.sizeof(key), ctypes.sizeof(value)), name
    assert L.EVENTS in MAPS_BY_NAME
    assert set(MAPS_BY_NAME) == set(L.ALL_MAPS) | set(socklb.MAP_LAYOUTS) | {L.EVENTS}
    defaults = MapSizes()
    assert sizing.DEFAULT_SIZES == {f: getattr(defaults, f) for f in MapSizes.__dataclass_fields__}
    fields = socklb.SockLB.__dataclass_fields__
    assert sizing.FIXED_SIZES == {"sock_revnat": fields["revnat_size"].default,
                                  "sock_affinity": fields["affinity_size"].default}


def test_expected_entries_of_a_scale() -> None:
    scale = Scale(services=1_000, backends=4, ports=2, maglev_services=10, endpoints=5_000,
                  endpoints_per_node=110, nodes=50, identities=300, policy_entries=40, clusters=2,
                  cidr_identities=7)
    e = sizing.expected_entries(scale)
    assert e["ciliary_ipcache"] == (5_000 + 50) * 2 + 7 + 1
    assert e["ciliary_lxc"] == 110
    assert e["ciliary_policy"] == 110 * 40  # at most one local identity per local endpoint
    assert e["ciliary_lb4_reverse_nat"] == 2_000
    assert e["ciliary_lb4_services"] == 2_000 * 5
    assert e["ciliary_lb4_backends"] == 2_000 * 4
    assert e["ciliary_lb4_maglev"] == 10 * 2 * 16_381
    assert e["ciliary_ct4_global"] is None and e["ciliary_events"] is None
    few = sizing.expected_entries(Scale(endpoints_per_node=110, identities=3, policy_entries=40))
    assert few["ciliary_policy"] == 3 * 40
    assert sizing.expected_entries(Scale())["ciliary_lb4_services"] is None


def test_one_setting_raises_every_map_it_sizes_to_below_the_warn_band() -> None:
    report = size_maps(Scale(services=20_000, backends=5))
    rows = {m.name: m for m in report.maps}
    assert rows["ciliary_lb4_services"].band == "over" and rows["ciliary_lb4_services"].expected == 120_000
    assert rows["ciliary_lb4_reverse_nat"].band == mappressure.OK
    assert report.settings == {"CILIARY_MAP_LB": 262_144}
    for name in ("ciliary_lb4_services", "ciliary_lb4_backends", "ciliary_lb4_reverse_nat",
                 "ciliary_lb_affinity_match"):
        assert rows[name].suggested == 262_144 and rows[name].setting == "CILIARY_MAP_LB"
    assert 120_000 / 262_144 < mappressure.WARN
    assert rows["ciliary_policy"].suggested is None
    assert report.worst() == "over"
    assert report.memory_suggested > report.memory


@pytest.mark.parametrize(("fill", "band"), [(0.5, "ok"), (0.8, "warn"), (0.949, "warn"), (0.95, "critical"),
                                            (1.0, "critical"), (1.01, "over")])
def test_bands(fill: float, band: str) -> None:
    assert sizing.band_of(fill) == band


def test_suggestion_is_a_power_of_two_below_warn() -> None:
    for expected in (1, 13_108, 13_107, 100_000, 1_000_000):
        s = sizing.suggest(expected)
        assert s & (s - 1) == 0 and expected / s < mappressure.WARN


def test_memory_of_each_kind() -> None:
    htab = sizing.HTAB_BYTES
    hash_ = MAPS_BY_NAME["ciliary_policy"]  # 12-byte key, 8-byte value, preallocated, a spare per CPU
    assert sizing.map_memory(hash_, 16_384, 0, ncpus=2) == (
        htab + 16_384 * 16 + 2 * 8 + (16_384 + 2) * (48 + 16 + 8))
    assert sizing.map_memory(hash_, 16_384, 10, ncpus=2) == sizing.map_memory(hash_, 16_384, 0, ncpus=2)
    lxc = MAPS_BY_NAME["ciliary_lxc"]  # 65,535 entries: the buckets round up to 65,536
    assert sizing.map_memory(lxc, 65_535, 0) == htab + 65_536 * 16 + 8 + 65_536 * (48 + 8 + 16)
    ct = MAPS_BY_NAME["ciliary_ct4_global"]  # LRU: no spare elements
    assert sizing.map_memory(ct, 65_536, 0, ncpus=2) == htab + 65_536 * 16 + 65_536 * (48 + 16 + 48)
    maglev = MAPS_BY_NAME["ciliary_lb4_maglev"]  # no prealloc: buckets now, elements per entry
    assert sizing.map_memory(maglev, 1024, 0) == htab + 1024 * 16
    assert sizing.map_memory(maglev, 1024, 100) == htab + 1024 * 16 + 100 * (48 + 8 + 8)
    metrics = MAPS_BY_NAME["ciliary_metrics"]  # per-CPU values
    assert sizing.map_memory(metrics, 1024, 0, ncpus=4) == htab + 1024 * 16 + 1024 * (48 + 8 + 8 + 16 * 4)
    ipcache = MAPS_BY_NAME["ciliary_ipcache"]
    assert sizing.map_memory(ipcache, 512_000, 1_000) == 1_000 * 128
    assert sizing.map_memory(MAPS_BY_NAME["ciliary_events"], 256, None) == 256 * 4096


def test_hard_limits() -> None:
    report = size_maps(Scale(services=40_000, backends=70_000, ports=2))
    assert len(report.limits) == 2
    assert "65,535 (16-bit backend slots)" in report.limits[0]
    assert "80,000 frontends" in report.limits[1]
    assert size_maps(Scale(services=100, backends=3)).limits == []


def test_sizes_from_env_and_live_max() -> None:
    sizes, errors = sizing.sizes_from_env({"CILIARY_MAP_POLICY": "65536", "CILIARY_MAP_LB": "lots",
                                           "CILIARY_MAP_CT": "0"})
    assert sizes["policy"] == 65_536 and sizes["lb"] == 65_536 and sizes["ct"] == 1_048_576
    assert len(errors) == 2 and any("CILIARY_MAP_LB='lots'" in e for e in errors)
    scale = Scale(endpoints_per_node=100, policy_entries=200)
    rows = {m.name: m for m in size_maps(scale, sizes).maps}
    assert rows["ciliary_policy"].max_entries == 65_536 and rows["ciliary_policy"].band == "ok"
    live = {m.name: m for m in size_maps(scale, sizes, live_max={"ciliary_policy": 20_000}).maps}
    assert live["ciliary_policy"].max_entries == 20_000 and live["ciliary_policy"].band == "critical"
    assert live["ciliary_lb4_reverse_sk"].setting == "" and live["ciliary_lb4_reverse_sk"].max_entries == 262_144
