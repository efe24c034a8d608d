"""Resource ceilings, short form: two minutes of churn on a 2-node instance (bench/soakload.py,
the same churn ``bench/soak.py`` runs for half an hour), then

- no process's own memory (RssAnon) grows from the middle third of the run to the last
  third by more than its allowance (``soakload.growth_allowance``: 4 MiB or 10 % of the
  middle third's mean, 16 MiB for nats-server, whose Go heap grows to twice its live
  data between collections; the first third is warm-up). The flows ring and the L7
  join are made small (256 flows per node, 512 flows) so that they are full before the
  middle third. A leak of 0.25 MiB/s
  (about 0.6 MiB per churn round) in one service fails this (tried: +6.7 MiB); the noise
  of the Python services under churn stays below 1 MiB;
- no process restarted during the churn;
- every cache a service reports (``detail.caches``) is within its cap;
- the instance converges: every live pod ready, no identity left for a deleted pod after
  the (shortened) identity GC grace, no kernel ipcache row for a deleted pod's address, no
  entry of bucket ``status`` for a deleted pod.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_privileges
from .instance import ciliary, embedded_instance
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import soakload as SL  # noqa: E402

CHURN_SECONDS = 72.0
PERIOD = 2.5  # seconds between round starts (a round's CLI calls take longer on 2 cores)
SAMPLE_EVERY = 2.0
GC_GRACE = "4"
MIB_FLOOR = 4.0
NATS_MIB_FLOOR = 16.0
SHARE = 0.10


@pytest.fixture
def soak_instance(tmp_path: Path, cluster_names: list[str]) -> Iterator[Path]:
    require_privileges()
    cluster = "t" + secrets.token_hex(2)
    cluster_names.append(cluster)
    with embedded_instance(tmp_path / "instance", cluster, nodes=2, cluster_id=29,
                           env={"CILIARY_IDENTITY_GC_GRACE": GC_GRACE, "CILIARY_FLOWS_RING_CAPACITY": "256",
                                "CILIARY_FLOWS_JOIN_MAX_FLOWS": "512"}) as data_dir:
        yield data_dir


def test_memory_and_caches_stay_bounded_under_churn(soak_instance: Path) -> None:
    data_dir = soak_instance

    def cli(*args: str, stdin: str | None = None) -> str:
        return ciliary(*args, data_dir=data_dir, stdin=stdin, timeout=60).stdout

    churn = SL.Churn(cli, ["node-1", "node-2"], live_pods=3)
    churn.setup()
    client = wait_for(lambda: SL.ready_pods(cli).get("soak-client"), 60, "the client pod ready")
    vip = wait_for(lambda: json.loads(cli("get", "svc", "churn-web", "-o", "json"))["spec"].get("clusterIP"),
                   20, "churn-web's cluster IP")
    sampler = SL.Sampler(data_dir, SAMPLE_EVERY).start()
    churn.start_traffic(client["ciliary"]["netns"], vip)
    end = time.monotonic() + CHURN_SECONDS
    try:
        while time.monotonic() < end:
            started = time.monotonic()
            churn.step()
            time.sleep(max(0.0, PERIOD - (time.monotonic() - started)))
    finally:
        answered, failed = churn.stop_traffic()
        sampler.stop()
    assert not churn.errors, churn.errors
    assert churn.round_no >= 10 and len(churn.deleted) >= 7, (churn.round_no, churn.deleted)
    assert answered > 0, (answered, failed)

    restarted = {name: pids for name, pids in sampler.pids_seen.items() if len(pids) > 1}
    assert not restarted, f"restarted during the churn: {restarted}"
    expected = {"supervisor", "nats-server", "identity", "servicelb", "policy", "flows", "mesh",
                "node/node-1", "node/node-2"}
    assert expected <= set(sampler.samples), sorted(sampler.samples)
    grown = {}
    for name, samples in sampler.samples.items():
        anon = [s[2] for s in samples]
        assert len(anon) >= 15, (name, len(anon))
        growth, allowance = SL.growth(anon), SL.growth_allowance(
            anon, floor_mib=NATS_MIB_FLOOR if name.startswith("nats-server") else MIB_FLOOR, share=SHARE)
        print(f"{name:14} anon {anon[0]:6.1f} .. {anon[-1]:6.1f} MiB  growth {growth:+5.1f}  allowance {allowance:.1f}")
        if growth > allowance:
            grown[name] = f"+{growth:.1f} MiB > {allowance:.1f} MiB ({anon[0]} .. {anon[-1]})"
    assert not grown, f"RssAnon grew from the middle to the last third of the churn: {grown}"

    caches = SL.cache_counts(json.loads(cli("status", "-o", "json")))
    reporting = {"identity", "policy", "servicelb", "flows", "mesh", "node/node-1", "node/node-2"}
    assert reporting <= set(caches), caches
    over = {f"{service}/{name}": c for service, named in caches.items() for name, c in named.items()
            if "cap" in c and c["size"] > c["cap"]}
    assert not over, over

    wait_for(lambda: len(SL.ready_pods(cli)) == churn.expected_pods(), 60, "every live pod ready")
    deadline = time.monotonic() + 45  # the identity GC grace, then a GC round
    while any((left := SL.leftovers(cli, churn, data_dir)).values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not any(left.values()), f"left by deleted pods: {left}"
