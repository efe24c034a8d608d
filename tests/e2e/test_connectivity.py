"""``ciliary connectivity test`` and ``ciliary sysdump`` against a real 2-node instance.

One instance (two nodes, the shop's cluster DNS) serves the module:

- ``connectivity test`` passes every test (none skipped: two nodes and a cluster DNS),
  each with the flows that prove it, and leaves nothing of ``ciliary-test`` behind;
- Ctrl-C (SIGINT) in the middle of a run exits 130 and removes what it deployed;
- with a deny-all NetworkPolicy applied to ``ciliary-test`` first, every test fails, the
  exit code is 1, the failing tests are named, and the namespace (the deny-all included)
  is gone afterwards;
- ``sysdump`` writes one archive whose index lists exactly what it contains, with the
  instance's status, buckets, per-node maps, flows and logs, and no credential file.

Everything runs through the public CLI; nothing is routed through the root namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary import connectivity as C
from ciliary import schema

from .conftest import require_privileges
from .instance import ciliary, embedded_instance
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
DNS = REPO / "examples" / "shop" / "15-dns.yaml"
DENY_ALL = f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: {C.NAMESPACE}
spec:
  podSelector: {{}}
  policyTypes: [Ingress, Egress]
"""


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_privileges()
    cluster = "ct" + secrets.token_hex(2)
    base = tmp_path_factory.mktemp("connectivity")
    with embedded_instance(base / "instance", cluster, nodes=2, cluster_id=19) as data_dir:
        ciliary("apply", "-f", str(DNS), data_dir=data_dir)
        wait_for(lambda: dns_ready(data_dir), 60, "the cluster DNS pod")
        yield data_dir


def dns_ready(data_dir: Path) -> bool:
    pods = json.loads(ciliary("get", "pods", "-n", "kube-system", "-o", "json", data_dir=data_dir).stdout)["items"]
    return any(c["type"] == "Ready" and c["status"] == "True"
               for p in pods for c in p.get("status", {}).get("conditions", []))


def namespace_gone(data_dir: Path) -> None:
    for kind in ("pods", "services", "cnp", "netpol"):
        listed = json.loads(ciliary("get", kind, "-n", C.NAMESPACE, "-o", "json", data_dir=data_dir).stdout)
        assert listed["items"] == [], (kind, listed["items"])
    namespaces = json.loads(ciliary("get", "ns", "-o", "json", data_dir=data_dir).stdout)["items"]
    assert C.NAMESPACE not in [n["metadata"]["name"] for n in namespaces]

    def endpoints_left() -> list[str]:
        nodes = json.loads(ciliary("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
        return [r["pod"] for n in nodes for r in n["rows"] if r["pod"].startswith(C.NAMESPACE + "/")]

    # the nodes remove endpoints asynchronously; none may stay
    deadline = time.monotonic() + 30
    while (left := endpoints_left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


def test_connectivity_test_passes_then_fails_under_deny_all(instance: Path) -> None:
    run = ciliary("connectivity", "test", "-o", "json", data_dir=instance, check=False, timeout=240)
    print(run.stderr)
    report = json.loads(run.stdout)
    assert run.returncode == 0, run.stdout
    assert report["ok"] and report["failed"] == 0 and report["skipped"] == 0
    tests = {t["name"]: t for t in report["tests"]}
    assert list(tests) == C.names() and all(t["status"] == C.PASS for t in tests.values())
    assert all(t["flows"] for t in tests.values()), [n for n, t in tests.items() if not t["flows"]]
    denied = [f for f in tests["policy/deny"]["flows"] if f["verdict"] == "DROPPED"
              and any(p["name"] == C.DENY_POLICY and p["namespace"] == C.NAMESPACE
                      for p in f.get("ingress_denied_by", []))]
    assert denied, tests["policy/deny"]["flows"]
    allowed = [f for f in tests["policy/allow"]["flows"]
               if any(p["name"] == C.ALLOW_POLICY for p in f.get("ingress_allowed_by", []))]
    assert allowed, tests["policy/allow"]["flows"]
    assert tests["pod-to-pod/cross-node"]["reason"].startswith("echo-other answered")
    namespace_gone(instance)

    ciliary("apply", "-f", "-", stdin=DENY_ALL, data_dir=instance)
    run = ciliary("connectivity", "test", "--timeout", "2", data_dir=instance, check=False, timeout=240)
    print(run.stdout, run.stderr)
    assert run.returncode == 1
    failed = [line.split()[0] for line in run.stdout.splitlines()[1:] if line.split()[1:2] == ["fail"]]
    assert failed == C.names(), run.stdout  # every test, by name
    assert "0 passed, 8 failed, 0 skipped" in run.stdout
    assert "POLICY_DENIED" in run.stdout  # the drops are shown
    namespace_gone(instance)  # the deny-all went with it


def test_ctrl_c_during_the_run_cleans_up(instance: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ciliary.cli", "connectivity", "test"], cwd=REPO,
                            env={**os.environ, "CILIARY_DATA_DIR": str(instance)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: json.loads(ciliary("get", "pods", "-n", C.NAMESPACE, "-o", "json",
                                            data_dir=instance).stdout)["items"], 30, "the test pods")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and f"removed 8 objects and namespace {C.NAMESPACE}" in err, err
    namespace_gone(instance)


def test_sysdump_contains_what_its_index_lists_and_no_credentials(instance: Path, tmp_path: Path) -> None:
    (instance / "secrets").mkdir(exist_ok=True)
    (instance / "secrets" / "user.nk").write_text("SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY")
    (instance / "logs" / "operator.creds").write_text("-----BEGIN NATS USER JWT-----")
    target = tmp_path / "dump.tar.gz"
    run = ciliary("sysdump", "-o", str(target), data_dir=instance, timeout=180)
    assert run.stdout.strip() == str(target)
    with tarfile.open(target) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        top = members[0].name.split("/")[0]
        contents = {m.name.removeprefix(top + "/"): tar.extractfile(m).read() for m in members}
    index = json.loads(contents["index.json"])
    listed = {m["path"]: m for m in index["members"]}
    present = {p for p, m in listed.items() if "error" not in m}
    assert set(contents) == present, (set(contents) ^ present)
    for path in present - {"index.json"}:
        assert listed[path]["bytes"] == len(contents[path]), path
    errors = {p: m["error"] for p, m in listed.items() if "error" in m}
    assert errors == {}, errors
    assert json.loads(contents["preflight.json"])["kernel"]["features"]  # the preflight report

    status = json.loads(contents["status.json"])
    assert status["healthy"] and {s["name"] for s in status["services"]} >= set(schema.SERVICE_NAMES) - {"mesh"}
    for bucket in schema.ALL_BUCKETS:
        assert f"buckets/{bucket}.json" in contents
    resources = json.loads(contents["buckets/resources.json"])
    assert resources["Pod.kube-system.coredns"]["encoding"] == "ResourceRecord"
    for node in ("node-1", "node-2"):
        for view in ("endpoints", "bpf-ct", "bpf-ipcache", "bpf-lb", "bpf-policy", "bpf-metrics"):
            assert json.loads(contents[f"nodes/{node}/{view}.json"])["ok"], (node, view)
    assert json.loads(contents["nodes/node-2/endpoints.json"])["rows"]  # coredns runs there
    flows = [json.loads(line) for line in contents["flows.jsonl"].decode().splitlines()]
    assert flows and all("flow" in f for f in flows)
    assert {"data-dir/logs/identity.log", "data-dir/logs/nats-server.log", "data-dir/instance.json"} <= set(contents)
    versions = json.loads(contents["versions.json"])
    assert versions["nats_server"].startswith("nats-server: v") and versions["kernel"]["release"]

    assert "secrets/" in index["left_out_as_credentials"]
    assert "logs/operator.creds" in index["left_out_as_credentials"]
    everything = b"".join(contents.values())
    assert b"SUACSSL3UAHUDXKFSNVUZRF5" not in everything and b"BEGIN NATS USER JWT" not in everything
