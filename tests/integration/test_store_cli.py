"""apply / get / delete through the real CLI against a real instance's NATS server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ciliary import config, schema
from ciliary.bus import Bus
from tests.integration.conftest import REPO, ensure_buckets, run_cli

SHOP = REPO / "examples" / "shop"


@pytest.fixture
def instance(nats_server, tmp_path: Path) -> Path:
    """A data dir that points the CLI at the test's NATS server (no services needed)."""
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    asyncio.run(ensure_buckets(nats_server.url))  # as `ciliary up` does before anything else
    return data_dir


def _get_json(data_dir: Path, *args: str) -> dict:
    result = run_cli("get", *args, "-o", "json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_apply_get_round_trip(instance: Path) -> None:
    result = run_cli("apply", "-f", str(SHOP), data_dir=instance)
    assert result.returncode == 0, result.stderr
    assert "pod/payments -n default created" in result.stdout
    pods = _get_json(instance, "pods", "-A")
    assert pods["kind"] == "List"
    assert [p["metadata"]["name"] for p in pods["items"]] == ["checkout", "frontend", "payment-gateway", "payments", "coredns"]
    payments = next(p for p in pods["items"] if p["metadata"]["name"] == "payments")
    assert payments["metadata"]["labels"]["app"] == "payments"
    assert payments["metadata"]["generation"] == 1
    assert int(payments["metadata"]["resourceVersion"]) > 0
    assert payments["metadata"]["uid"]
    cnp = _get_json(instance, "cnp", "payments-ingress")
    assert cnp["spec"]["endpointSelector"]["matchLabels"] == {"app": "payments"}

    # re-applying changes nothing; a changed object bumps generation and resourceVersion
    again = run_cli("apply", "-f", str(SHOP), data_dir=instance)
    assert again.returncode == 0 and "created" not in again.stdout and "configured" not in again.stdout
    assert _get_json(instance, "pod", "payments")["metadata"] == payments["metadata"]
    changed = (SHOP / "10-workloads.yaml").read_text().replace('pci: "true"', 'pci: "false"')
    result = run_cli("apply", "-f", "-", data_dir=instance, stdin=changed)
    assert "pod/payments -n default configured" in result.stdout, result.stdout + result.stderr
    updated = _get_json(instance, "pod", "payments")
    assert updated["metadata"]["generation"] == 2
    assert updated["metadata"]["uid"] == payments["metadata"]["uid"]
    assert int(updated["metadata"]["resourceVersion"]) > int(payments["metadata"]["resourceVersion"])

    table = run_cli("get", "pods", "-A", data_dir=instance)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    wide = run_cli("get", "pods", "-A", "-o", "wide", data_dir=instance).stdout.splitlines()
    assert wide[0].split()[-6:] == ["IP", "NODE", "NOMINATED", "NODE", "READINESS", "GATES"]
    names = run_cli("get", "pods", "-A", "-o", "jsonpath={.items[*].metadata.name}", data_dir=instance)
    assert sorted(names.stdout.split()) == sorted(p["metadata"]["name"] for p in pods["items"])
    assert len(lines) == 6
    # columns are aligned: every row starts its NAME column at the same offset
    offset = lines[0].index("NAME ")
    assert all(line[offset - 1] == " " and line[offset] != " " for line in lines[1:])


def test_delete_by_name_and_by_file(instance: Path) -> None:
    assert run_cli("apply", "-f", str(SHOP), data_dir=instance).returncode == 0
    result = run_cli("delete", "pod", "frontend", data_dir=instance)
    assert result.returncode == 0 and "deleted" in result.stdout
    names = [p["metadata"]["name"] for p in _get_json(instance, "pods")["items"]]
    assert names == ["checkout", "payment-gateway", "payments"]
    missing = run_cli("delete", "pod", "frontend", data_dir=instance)
    assert missing.returncode == 1 and "not found" in missing.stderr
    result = run_cli("delete", "-f", str(SHOP / "30-policies.yaml"), data_dir=instance)
    assert result.returncode == 0, result.stderr
    assert _get_json(instance, "cnp")["items"] == []
    assert _get_json(instance, "netpol")["items"] == []
    assert len(_get_json(instance, "services")["items"]) == 3


def test_invalid_file_applies_nothing(instance: Path, tmp_path: Path) -> None:
    bad = tmp_path / "mixed.yaml"
    bad.write_text(
        (SHOP / "20-services.yaml").read_text()
        + "\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  ports:\n  - port: 70000\n"
    )
    result = run_cli("apply", "-f", str(bad), data_dir=instance)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "mixed.yaml" in result.stderr and "document 3" in result.stderr
    assert "spec.ports[0].port" in result.stderr
    assert _get_json(instance, "services")["items"] == []


def test_cli_errors_are_clear(instance: Path, tmp_path: Path) -> None:
    unknown = run_cli("get", "widgets", data_dir=instance)
    assert unknown.returncode == 1 and "widgets" in unknown.stderr and "Traceback" not in unknown.stderr
    nofile = run_cli("apply", "-f", str(tmp_path / "nope.yaml"), data_dir=instance)
    assert nofile.returncode == 1 and "nope.yaml" in nofile.stderr
    nothing = run_cli("get", "pods", data_dir=tmp_path / "empty")
    assert nothing.returncode == 1
    assert "no ciliary instance is running" in nothing.stderr and "ciliary up -d" in nothing.stderr


def _bulk_manifest(n: int, *, port: int = 80, changed: int = 0) -> str:
    """A Namespace, then per i a Service and its EndpointSlice; the first ``changed``
    Services carry ``port + 1``."""
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: bulk}\n"]
    for i in range(n):
        docs.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05d}, namespace: bulk}}\n"
                    f"spec:\n  ports:\n  - {{name: http, port: {port + (i < changed)}}}\n")
        docs.append(f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n"
                    f"  name: svc-{i:05d}-1\n  namespace: bulk\n"
                    f"  labels: {{kubernetes.io/service-name: svc-{i:05d}}}\n"
                    f"addressType: IPv4\nports:\n- {{name: http, port: 8080}}\n"
                    f"endpoints:\n- addresses: [10.208.{i // 250}.{i % 250 + 1}]\n")
    return "---\n".join(docs)


async def _stored(url: str) -> dict[str, tuple[int, schema.ResourceRecord]]:
    bus = await Bus.connect(url, "test-read")
    try:
        entries = await bus.kv_list(schema.BUCKET_RESOURCES)
    finally:
        await bus.close()
    return {key: (e.revision, schema.decode(e.value, schema.ResourceRecord)) for key, e in entries.items()}


def test_bulk_apply_writes_every_object_once_and_reapply_changes_only_what_changed(
        instance: Path, nats_server, tmp_path: Path) -> None:
    n = 1500
    path = tmp_path / "bulk.yaml"
    path.write_text(_bulk_manifest(n))
    result = run_cli("apply", "-f", str(path), "--progress", data_dir=instance)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "namespace/bulk created" and len(lines) == 2 * n + 1
    assert lines[1:3] == ["service/svc-00000 -n bulk created", "endpointslice/svc-00000-1 -n bulk created"]
    assert f"{2 * n + 1:,}/{2 * n + 1:,} written" in result.stderr and "created" not in result.stderr

    first = asyncio.run(_stored(nats_server.url))
    want = {"Namespace._.bulk"} | {f"Service.bulk.svc-{i:05d}" for i in range(n)} | {
        f"EndpointSlice.bulk.svc-{i:05d}-1" for i in range(n)}
    assert set(first) == want
    assert {record.generation for _, record in first.values()} == {1}
    assert sorted(revision for revision, _ in first.values()) == list(range(1, 2 * n + 2)), \
        "one write per object, nothing else"
    assert len({record.uid for _, record in first.values()}) == 2 * n + 1
    svc = first["Service.bulk.svc-01234"][1]
    assert (svc.kind, svc.namespace, svc.name) == ("Service", "bulk", "svc-01234")
    assert svc.manifest["spec"]["ports"] == [{"name": "http", "port": 80}]
    got = _get_json(instance, "service", "svc-01234", "-n", "bulk")
    assert got["metadata"]["resourceVersion"] == str(first["Service.bulk.svc-01234"][0])

    path.write_text(_bulk_manifest(n, changed=100))
    again = run_cli("apply", "-f", str(path), data_dir=instance)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "", "no progress off a terminal without --progress"
    configured = [line for line in again.stdout.splitlines() if line.endswith(" configured")]
    assert configured == [f"service/svc-{i:05d} -n bulk configured" for i in range(100)]
    second = asyncio.run(_stored(nats_server.url))
    assert set(second) == want
    for key, (revision, record) in second.items():
        old_revision, old = first[key]
        if key < "Service.bulk.svc-00100" and key.startswith("Service."):
            assert record.generation == 2 and revision > old_revision
            assert (record.uid, record.created) == (old.uid, old.created)
        else:
            assert (revision, record) == (old_revision, old), key
