"""``ciliary sysdump`` without an instance: redaction, the files it takes from the data
directory (never credentials), bucket decoding, the index, and an archive that holds
what its index lists."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import msgspec
import pytest

from ciliary import schema
from ciliary import sysdump as S
from ciliary.cli import sysdump as cli

# ---------------------------------------------------------------- redaction


def test_secret_named_values_are_redacted_at_any_depth() -> None:
    data = {
        "password": "hunter2", "db": {"Password": "x", "user": "alice"}, "api_token": "t0k",
        "items": [{"clientSecret": "s", "name": "a"}, {"privateKey": "k", "API-KEY": "k2"}],
        "authorization": "Basic abc", "credentials": {"nested": "whole value"},
        "tokenless": None, "token": "", "labels": {"app": "web"}, "count": 3,
    }
    assert S.redact(data) == {
        "password": S.REDACTED, "db": {"Password": S.REDACTED, "user": "alice"}, "api_token": S.REDACTED,
        "items": [{"clientSecret": S.REDACTED, "name": "a"}, {"privateKey": S.REDACTED, "API-KEY": S.REDACTED}],
        "authorization": S.REDACTED, "credentials": S.REDACTED,
        "tokenless": None, "token": "", "labels": {"app": "web"}, "count": 3,
    }
    assert data["password"] == "hunter2"  # a copy, the input is untouched


@pytest.mark.parametrize(("text", "expected"), [
    ("connecting to nats://alice:hunter2@127.0.0.1:4222 ok", f"connecting to nats://{S.REDACTED}@127.0.0.1:4222 ok"),
    ("nats://127.0.0.1:4222 has no user", "nats://127.0.0.1:4222 has no user"),
    ("login password=hunter2 user=alice", f"login password={S.REDACTED} user=alice"),
    ('{"token": "abc", "name": "x"}', f'{{"token": {S.REDACTED}, "name": "x"}}'),
    ("client_secret: s3cr3t\nnext: line", f"client_secret: {S.REDACTED}\nnext: line"),
    ("Authorization: Bearer abc.def", f"Authorization: {S.REDACTED}"),
    ("header Bearer abcdef123", f"header Bearer {S.REDACTED}"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig end", f"jwt {S.REDACTED} end"),
    ("seed SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY here", f"seed {S.REDACTED} here"),
    ("pod default/web running at 10.200.1.2", "pod default/web running at 10.200.1.2"),
])
def test_secrets_in_text_are_redacted(text: str, expected: str) -> None:
    assert S.redact_text(text) == expected


def test_strings_inside_structures_are_redacted_too() -> None:
    assert S.redact({"args": ["--url", "nats://u:p@h:1"]}) == {"args": ["--url", f"nats://{S.REDACTED}@h:1"]}


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(("path", "secret"), [
    ("user.creds", True), ("logs/x.nk", True), ("a/b.jwt", True), ("tls/server.key", True), ("c.pem", True),
    ("op.seed", True), ("secrets/anything.log", True), ("nodes/auth/x.json", True), ("AUTH/token", True),
    ("logs/identity.log", False), ("instance.json", False), ("logs/keys.log", False),
])
def test_credential_paths(path: str, secret: bool) -> None:
    assert S.is_secret_path(path) is secret


def make_data_dir(root: Path) -> Path:
    files = {
        "instance.json": "{}", "instance.lock": "",
        "logs/identity.log": "hello", "logs/supervisor.log": "password=hunter2",
        "logs/old/identity.log.1": "rotated",
        "logs/admin.creds": "-----BEGIN NATS USER JWT-----",
        "nats/jetstream/ciliary/streams/KV_resources/msgs/1.blk": "binary",
        "nodes/c1/node-1/pods.json": "[]", "nodes/c1/node-1/endpoints.json": "[]",
        "nodes/c1/node-1/logs/default_web/web.log": "serving",
        "nodes/c1/node-1/ipam/c1/node-1/10.200.1.2": "x",
        "secrets/nats.nk": "SUA...", "auth/users.json": "{}",
        "nodes/c1/node-1/secrets/token": "t",
        "tls/server.key": "k",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "logs" / "link.log").symlink_to(root / "tls" / "server.key")
    return root


def test_select_files_takes_logs_and_node_records_never_credentials(tmp_path: Path) -> None:
    selection = S.select_files(make_data_dir(tmp_path))
    assert selection.files == [
        "instance.json", "logs/identity.log", "logs/old/identity.log.1", "logs/supervisor.log",
        "nodes/c1/node-1/endpoints.json", "nodes/c1/node-1/logs/default_web/web.log", "nodes/c1/node-1/pods.json",
    ]
    assert selection.secret == ["auth/", "logs/admin.creds", "nodes/c1/node-1/secrets/", "secrets/", "tls/server.key"]


def test_select_files_has_a_limit(tmp_path: Path) -> None:
    selection = S.select_files(make_data_dir(tmp_path), max_files=2)
    assert selection.files == ["instance.json", "logs/identity.log"] and selection.over_limit == 5


# ---------------------------------------------------------------- buckets and index


def test_bucket_values_are_decoded_with_the_schema_where_possible() -> None:
    record = schema.IPCacheRecord(prefix="10.0.0.5/32", identity=7, source="pod", cluster="c", cluster_id=1)
    encoding, value = S.decode_entry(schema.BUCKET_IPCACHE, "10.0.0.5_32", schema.encode(record))
    assert encoding == "IPCacheRecord" and value["identity"] == 7 and value["prefix"] == "10.0.0.5/32"
    encoding, value = S.decode_entry(schema.BUCKET_ALLOCATIONS, "node-index.1", msgspec.msgpack.encode({"node": "n"}))
    assert (encoding, value) == ("msgpack", {"node": "n"})
    # a value that does not fit its record type still comes out as plain msgpack
    encoding, value = S.decode_entry(schema.BUCKET_IPCACHE, "x", msgspec.msgpack.encode({"what": 1}))
    assert (encoding, value) == ("msgpack", {"what": 1})
    assert S.decode_entry("other", "k", b'{"a": 1}') == ("json", {"a": 1})
    assert S.decode_entry("other", "k", b"\xc1") == ("base64", "wQ==")


def test_index_lists_members_sorted_and_what_was_left_out() -> None:
    index = S.Index(created="2026-01-01T00:00:00Z", data_dir="/d", cluster="c1")
    index.add(S.Member("status.json", "status", "ciliary status -o json", 10))
    index.add(S.Member("buckets/ipcache.json", "bucket", "kv_list ipcache", 0, error="timeout"))
    index.left_out = ["secrets/"]
    doc = index.to_dict()
    assert [m["path"] for m in doc["members"]] == ["buckets/ipcache.json", "status.json"]
    assert doc["members"][0] == {"path": "buckets/ipcache.json", "what": "bucket", "source": "kv_list ipcache",
                                 "bytes": 0, "error": "timeout"}
    assert doc["left_out_as_credentials"] == ["secrets/"] and doc["cluster"] == "c1"


def test_archive_name_is_utc_time() -> None:
    assert S.archive_name(0) == "ciliary-sysdump-19700101-000000"


# ---------------------------------------------------------------- the archive


def test_without_an_instance_the_archive_holds_files_versions_and_an_honest_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    out = tmp_path / "out" / "dump.tar.gz"
    args = argparse.Namespace(data_dir_path=data_dir, output=str(out))
    assert cli.cmd_sysdump(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        contents = {n.removeprefix(top + "/"): tar.extractfile(n).read() for n in names if tar.getmember(n).isfile()}
    index = json.loads(contents["index.json"])
    listed = {m["path"]: m for m in index["members"]}
    assert set(contents) == {p for p, m in listed.items() if "error" not in m}
    for path, member in listed.items():
        if "error" not in member and path != "index.json":
            assert member["bytes"] == len(contents[path]), path
    assert "no ciliary instance is running" in listed["status.json"]["error"]
    versions = json.loads(contents["versions.json"])
    assert set(versions) >= {"ciliary", "python", "kernel", "bcc", "nats_server"}
    assert contents["data-dir/logs/supervisor.log"] == f"password={S.REDACTED}".encode()
    assert not [n for n in contents if n.endswith((".creds", ".nk", ".key")) or "secrets" in n or "auth/" in n]
    assert b"BEGIN NATS USER JWT" not in b"".join(contents.values())
    assert index["left_out_as_credentials"] == [
        "auth/", "logs/admin.creds", "nodes/c1/node-1/secrets/", "secrets/", "tls/server.key"]


def test_an_output_directory_gets_the_default_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(data_dir_path=tmp_path / "nothing", output=str(tmp_path / "dumps") + "/")
    assert cli.cmd_sysdump(args) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.parent == tmp_path / "dumps" and written.name.startswith("ciliary-sysdump-")
    assert written.name.endswith(".tar.gz") and tarfile.is_tarfile(written)


def test_a_view_with_output_is_kept_with_a_note_and_one_without_is_an_error() -> None:
    buffer = io.BytesIO()
    index = S.Index(created="", data_dir="/d")
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        dump = cli.Dump(tar, "top", index)
        dump.add_view("status.json", "status", ("status", "-o", "json"), 1, b'{"healthy": false, "token": "t"}',
                      b"error: unhealthy\n")
        dump.add_view("metrics.txt", "metrics", ("metrics",), 1, b"", b"error: no answer on ciliary.flows.metrics\n")
        nodes = [{"node": "node-1", "ok": True, "rows": [1]}, {"node": "node-2", "ok": False, "error": "timeout"}]
        dump.add_view("nodes/bpf-ct.json", "ct", ("bpf", "ct", "list", "-o", "json"), 1,
                      json.dumps(nodes).encode(), b"")
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        names = sorted(n.removeprefix("top/") for n in tar.getnames())
        status = json.loads(tar.extractfile("top/status.json").read())
    assert names == ["nodes/node-1/bpf-ct.json", "nodes/node-2/bpf-ct.json", "status.json"]
    assert status == {"healthy": False, "token": S.REDACTED}
    members = {m.path: m for m in index.members}
    assert members["status.json"].note == "exit code 1: error: unhealthy" and not members["status.json"].error
    assert members["metrics.txt"].error == "exit code 1: error: no answer on ciliary.flows.metrics"
    assert members["nodes/node-2/bpf-ct.json"].note == "the node did not answer: timeout"
    assert members["nodes/node-1/bpf-ct.json"].note == ""
