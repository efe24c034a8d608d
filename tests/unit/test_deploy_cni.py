"""The installed ciliary-cni (bash) and the executor's relay, over a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from services.node import cniinstall, cnirelay
from services.node.cni_protocol import parse_netconf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _call(plugin: Path, env: dict[str, str], stdin: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(plugin), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"], **env})
    out, _ = await proc.communicate(stdin.encode())
    return proc.returncode or 0, out.decode()


async def test_the_installed_plugin_hands_the_call_to_the_relay_and_prints_its_answer(tmp_path: Path) -> None:
    port = _free_port()
    plugin = cniinstall.install_plugin(tmp_path / "bin", port)
    assert os.access(plugin, os.X_OK)
    calls: list[tuple[dict[str, str], str]] = []

    async def run(env: dict[str, str], stdin: str) -> tuple[int, dict | None]:
        calls.append((env, stdin))
        if env["CNI_COMMAND"] == "DEL":
            return 0, None
        return 1 if env["CNI_COMMAND"] == "CHECK" else 0, {"cniVersion": "1.0.0", "echo": json.loads(stdin)}

    conf = cniinstall.conflist(cluster="c1", node="n1", subnet="10.200.3.0/24", nats_url="nats://x:4222")
    stdin = json.dumps({**conf["plugins"][0], "cniVersion": "1.0.0", "name": "ciliary", "note": "naïve ✓"})
    server = await cnirelay.serve(run, port)
    try:
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x",
               "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}
        code, out = await _call(plugin, env, stdin)
        assert code == 0 and json.loads(out)["echo"]["note"] == "naïve ✓"
        assert calls[0][0] == env and json.loads(calls[0][1]) == json.loads(stdin)
        code, out = await _call(plugin, {**env, "CNI_COMMAND": "CHECK"}, stdin)
        assert code == 1 and json.loads(out)["cniVersion"] == "1.0.0"
        code, out = await _call(plugin, {**env, "CNI_COMMAND": "DEL"}, stdin)
        assert (code, out) == (0, "")
    finally:
        server.close()
        await server.wait_closed()
    # no executor: a CNI "try again later" error, not a hang or a shell message
    code, out = await _call(plugin, {"CNI_COMMAND": "ADD"}, stdin)
    assert code == 1 and json.loads(out)["code"] == 11 and str(port) in json.loads(out)["msg"]


async def test_a_malformed_request_gets_a_cni_error() -> None:
    async def run(env: dict[str, str], stdin: str) -> tuple[int, dict | None]:
        raise AssertionError("not reached")

    server = await cnirelay.serve(run, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for raw, code in ((b"CNI_COMMAND=ADD\nnonsense\n\n", 4), (b"CNI_COMMAND=ADD\n\n", 6),
                          (b"LENGTH=99\n\n{}", 6)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            first, _, body = answer.decode().partition("\n")
            assert first == "1" and json.loads(body)["code"] == code, raw
    finally:
        server.close()
        await server.wait_closed()


def test_the_conflist_is_what_the_plugin_parses_in_host_mode(tmp_path: Path) -> None:
    doc = cniinstall.conflist(cluster="c1", node="n1", subnet="10.200.3.0/24", nats_url="nats://x:4222",
                              ipam_dir=str(tmp_path))
    path = cniinstall.write_conflist(tmp_path / "net.d", doc)
    written = json.loads(path.read_text())
    net = parse_netconf(json.dumps({"cniVersion": written["cniVersion"], "name": written["name"],
                                    **written["plugins"][0]}))
    assert net.host_mode and (net.cluster, net.node, net.subnet) == ("c1", "n1", "10.200.3.0/24")
    cniinstall.remove(tmp_path / "net.d")
    assert not path.exists()
    cniinstall.remove(tmp_path / "net.d")  # idempotent


def test_a_bad_mode_is_named() -> None:
    from services.node.cni_protocol import CNIError

    with pytest.raises(CNIError, match="mode"):
        parse_netconf(json.dumps({"cniVersion": "1.0.0", "cluster": "c", "node": "n", "mode": "hots",
                                  "ipam": {"subnet": "10.0.0.0/24"}}))
