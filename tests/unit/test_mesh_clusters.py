"""Clusters side by side: names, ids and pod CIDRs are checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary import clusters
from ciliary.cli import app


def run_up(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        app.main(["up", "-d", "--data-dir", str(tmp_path / "data"), *args])
    return int(done.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("name", ["east", "a", "c1-west", "x" * 32, "0zone9"])
def test_cilium_cluster_names(name: str) -> None:
    assert clusters.name_error(name) is None


@pytest.mark.parametrize(("name", "words"), [
    ("", "empty"), ("x" * 33, "33 characters"), ("East", "lower-case"), ("-east", "start and end"),
    ("east-", "start and end"), ("ea_st", "lower-case"), ("e.st", "lower-case"),
])
def test_bad_cluster_names_are_named(name: str, words: str) -> None:
    error = clusters.name_error(name)
    assert error is not None and words in error and (repr(name) in error or not name)


def test_sandbox_names_hold_no_dash() -> None:
    assert clusters.sandbox_name_error("east") is None
    assert "no '-'" in (clusters.sandbox_name_error("c1-west") or "")
    assert clusters.name_error("c1-west") is None


@pytest.mark.parametrize(("cluster_id", "ok"), [(0, False), (1, True), (255, True), (256, False), (-3, False)])
def test_cluster_id_range(cluster_id: int, ok: bool) -> None:
    assert (clusters.id_error(cluster_id) is None) is ok


def test_default_pod_cidrs_never_overlap() -> None:
    cidrs = [clusters.default_pod_cidr(i) for i in range(1, 256)]
    assert cidrs[0] == "10.1.0.0/16" and cidrs[-1] == "10.255.0.0/16"
    assert not any(clusters.overlap(a, b) for n, a in enumerate(cidrs) for b in cidrs[n + 1:])
    with pytest.raises(ValueError, match="out of range"):
        clusters.default_pod_cidr(0)


def test_pod_cidr_must_hold_the_nodes() -> None:
    assert clusters.pod_cidr_error("10.7.0.0/16", 254) is None
    assert clusters.pod_cidr_error("10.7.0.0/23", 1) is None
    assert "holds 1 node" in (clusters.pod_cidr_error("10.7.0.0/23", 2) or "")
    assert "/22" in (clusters.pod_cidr_error("10.7.0.0/23", 3) or "")
    assert "not an IPv4 network" in (clusters.pod_cidr_error("10.7.0.1/16") or "")
    assert "not an IPv4 network" in (clusters.pod_cidr_error("fd00::/64") or "")


@pytest.mark.parametrize(("args", "words"), [
    (["--cluster", "East"], "--cluster: cluster name 'East'"),
    (["--cluster", "c1-west"], "no '-'"),
    (["--cluster", "east", "--cluster-id", "0"], "--cluster-id: cluster id 0 is out of range 1..255"),
    (["--cluster", "east", "--cluster-id", "300"], "out of range"),
    (["--cluster", "east", "--pod-cidr", "10.9.0.0/24"], "--pod-cidr: pod CIDR 10.9.0.0/24 holds 0 node"),
    (["--cluster", "east", "--pod-cidr", "banana"], "not an IPv4 network"),
    (["--cluster", "east", "--cluster-id", "100"], "10.100.0.0/16 (derived from cluster id 100) overlaps the service CIDR"),
    (["--cluster", "east", "--nodes", "0"], "--nodes must be at least 1"),
])
def test_up_refuses_bad_clusters_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, args: list[str], words: str) -> None:
    monkeypatch.delenv("CILIARY_CLUSTER_CIDR", raising=False)
    monkeypatch.delenv("CILIARY_SERVICE_CIDR", raising=False)
    code, err = run_up(tmp_path, capsys, *args)
    assert code == 1 and words in err, err
    assert "Traceback" not in err and not (tmp_path / "data").exists()
