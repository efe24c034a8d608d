"""Host-local IPAM: no address twice, across restarts and concurrent processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from services.node.ipam import HostLocalIPAM, IPAMError


def test_allocates_round_robin_and_skips_reserved(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.200.1.0/29")
    ips = [ipam.allocate(f"c{i}") for i in range(5)]
    assert ips == ["10.200.1.2", "10.200.1.3", "10.200.1.4", "10.200.1.5", "10.200.1.6"]
    with pytest.raises(IPAMError, match="no free address"):
        ipam.allocate("c5")
    assert ipam.release("c1") == ["10.200.1.3"]
    # round robin: the freed address is reused only after the pool wraps around
    assert ipam.allocate("c6") == "10.200.1.3"


def test_same_container_gets_same_ip_and_release_is_idempotent(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.200.1.0/24")
    ip = ipam.allocate("abc")
    assert ipam.allocate("abc") == ip
    assert ipam.lookup("abc") == ip
    assert ipam.release("abc") == [ip]
    assert ipam.release("abc") == []
    assert ipam.lookup("abc") is None


def test_restart_never_hands_out_an_ip_twice(tmp_path: Path) -> None:
    first = HostLocalIPAM(tmp_path, "10.200.1.0/24")
    a = first.allocate("a")
    b = first.allocate("b")
    first.release("a")
    again = HostLocalIPAM(tmp_path, "10.200.1.0/24")
    c = again.allocate("c")
    assert c not in (b,) and c != a  # round robin continues after the last reserved
    assert again.allocations() == {b: "b", c: "c"}


def _allocate_many(args: tuple[str, str, int]) -> list[str]:
    state_dir, prefix, count = args
    ipam = HostLocalIPAM(state_dir, "10.200.0.0/22")
    return [ipam.allocate(f"{prefix}-{i}") for i in range(count)]


def test_concurrent_processes_never_collide(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_allocate_many, [(str(tmp_path), f"p{n}", 50) for n in range(4)])
    ips = [ip for chunk in results for ip in chunk]
    assert len(ips) == 200 and len(set(ips)) == 200


def test_bad_subnet(tmp_path: Path) -> None:
    with pytest.raises(IPAMError, match="invalid subnet"):
        HostLocalIPAM(tmp_path, "10.200.1.5/24")
    with pytest.raises(IPAMError, match="too small"):
        HostLocalIPAM(tmp_path, "10.200.1.0/31")
