"""``ciliary sysdump``: one ``.tar.gz`` to attach to an incident.

Invariants:
- What goes in, what stays out and how it is redacted is ``ciliary.sysdump`` (pure);
  this module collects: the CLI's own JSON views (``status``, ``endpoint list``, every
  ``bpf … list``, ``service list``, ``identity list``, ``observe --last N``, ``metrics``
  and, when the command exists, ``preflight``) each run as ``python -m ciliary.cli``
  against the instance, so the archive holds exactly what an operator would have seen;
  every KV bucket read over the bus and decoded with the schema; the chosen files of the
  data directory; versions (ciliary, Python, kernel, bcc, nats-server).
- A part that cannot be collected (a command without output, a bucket that cannot be
  read, the instance not running at all) is recorded in the index with its ``error`` and
  is not in the archive; a part collected with something to know (a non-zero exit code,
  a node that did not answer) is in the archive with a ``note``. The archive is always
  written; only an unwritable output path is a failure.
- Credential files are never opened. Every member is redacted before it is written.
- Progress goes to stderr; stdout gets the archive's path and nothing else.
- Never imports a service package or another command module.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from ciliary import __version__, config, schema
from ciliary import sysdump as S
from ciliary.bus import Bus, BusError
from ciliary.cli import common
from ciliary.config import NatsCredential

FLOWS_LAST = 1000
COMMAND_TIMEOUT = 60.0
PARALLEL_COMMANDS = 3
PREFLIGHT_MODULE = "ciliary.cli.preflight"  # `ciliary preflight -o json` joins the dump once it exists

# (archive path, what, CLI arguments); views answered per node are split into nodes/<node>/…
VIEWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("status.json", "ciliary status -o json: every service, its health and detail", ("status", "-o", "json")),
    ("services.json", "load-balancer frontends and backends", ("service", "list", "-o", "json")),
    ("identities.json", "every identity with its labels", ("identity", "list", "-o", "json")),
    ("flows.jsonl", f"the last {FLOWS_LAST} flows (hubble observe -o json)",
     ("observe", "--last", str(FLOWS_LAST), "-o", "json")),
    ("metrics.txt", "flow and node metrics (Prometheus text)", ("metrics",)),
)
NODE_VIEWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("endpoints.json", "endpoints of the node", ("endpoint", "list", "-o", "json")),
    ("bpf-ct.json", "conntrack map", ("bpf", "ct", "list", "-o", "json")),
    ("bpf-ipcache.json", "ipcache map", ("bpf", "ipcache", "list", "-o", "json")),
    ("bpf-lb.json", "load-balancer maps", ("bpf", "lb", "list", "-o", "json")),
    ("bpf-policy.json", "policy map", ("bpf", "policy", "list", "-o", "json")),
    ("bpf-metrics.json", "forward/drop counters", ("bpf", "metrics", "list", "-o", "json")),
)
PREFLIGHT_VIEW = ("preflight.json", "ciliary preflight -o json: kernel, labels, map sizing, readiness",
                  ("preflight", "-o", "json"))


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``sysdump`` to the ``ciliary`` parser."""
    p = subparsers.add_parser("sysdump", parents=[common_parent],
                              help="collect status, buckets, maps, flows, logs and versions into one archive")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="archive path (default ./ciliary-sysdump-<UTC time>.tar.gz)")
    p.set_defaults(func=cmd_sysdump)


def cmd_sysdump(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    name = S.archive_name()
    target = Path(args.output) if args.output else Path.cwd() / f"{name}.tar.gz"
    if target.is_dir() or (args.output or "").endswith("/"):
        target = target / f"{name}.tar.gz"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target, "wb")  # noqa: SIM115 — closed by the tarfile's owner below
    except OSError as err:
        raise common.CliError(f"cannot write {target}: {err}") from err
    state = config.read_instance(data_dir)
    running = state is not None and config.pid_alive(state.supervisor_pid)
    index = S.Index(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), data_dir=str(data_dir),
                    cluster=state.cluster if state else "")
    with handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        dump = Dump(tar, name, index)
        dump.add_json("versions.json", "versions of ciliary, Python, the kernel, bcc, nats-server", "sysdump",
                      versions())
        if running:
            asyncio.run(dump.views(data_dir))
            say("reading every KV bucket")
            try:
                asyncio.run(dump.buckets(state.nats_url, common.cli_credential(data_dir)))
            except (BusError, OSError) as err:
                index.add(S.Member("buckets/", "KV buckets", "bus", error=str(err)))
        else:
            index.add(S.Member("status.json", "instance state", "ciliary status",
                               error=f"no ciliary instance is running for {data_dir}: only files and versions"))
        say("copying logs and node records")
        dump.files(data_dir)
        index.add(S.Member("index.json", "this index: every member, its source and size", "sysdump"))
        dump.add_json("index.json", "", "", index.to_dict(),
                      record=False, redact=False)
    failed = [m for m in index.members if m.error]
    say(f"{len(index.members) - len(failed)} members, {len(failed)} parts not collected" + (
        f" ({', '.join(m.path for m in failed[:5])}{', …' if len(failed) > 5 else ''})" if failed else ""))
    print(target)
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Dump:
    """Writes members into the archive under ``<top>/`` and records each in the index."""

    def __init__(self, tar: tarfile.TarFile, top: str, index: S.Index) -> None:
        self.tar = tar
        self.top = top
        self.index = index

    def add_bytes(self, path: str, what: str, source: str, data: bytes, *, note: str = "",
                  truncated: bool = False, record: bool = True) -> None:
        info = tarfile.TarInfo(f"{self.top}/{path}")
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))
        if record:
            self.index.add(S.Member(path, what, source, len(data), note=note, truncated=truncated))

    def add_json(self, path: str, what: str, source: str, data: Any, *, note: str = "", record: bool = True,
                 redact: bool = True) -> None:
        text = json.dumps(S.redact(data) if redact else data, indent=2, default=str) + "\n"
        self.add_bytes(path, what, source, text.encode(), note=note, record=record)

    # ---------------------------------------------------------------- CLI views

    async def views(self, data_dir: Path) -> None:
        jobs: list[tuple[str, str, tuple[str, ...]]] = list(VIEWS)
        if importlib.util.find_spec(PREFLIGHT_MODULE) is not None:
            jobs.append(PREFLIGHT_VIEW)
        else:
            self.index.add(S.Member(PREFLIGHT_VIEW[0], PREFLIGHT_VIEW[1], "ciliary preflight",
                                    error="this ciliary has no preflight command"))
        jobs += [(f"nodes/{path}", what, argv) for path, what, argv in NODE_VIEWS]
        limit = asyncio.Semaphore(PARALLEL_COMMANDS)

        async def one(path: str, what: str, argv: tuple[str, ...]) -> None:
            async with limit:
                say(f"collecting {path}: ciliary {' '.join(argv)}")
                code, out, err = await run_cli(data_dir, argv)
            self.add_view(path, what, argv, code, out, err)

        await asyncio.gather(*(one(*job) for job in jobs))

    def add_view(self, path: str, what: str, argv: tuple[str, ...], code: int, out: bytes, err: bytes) -> None:
        source = "ciliary " + " ".join(argv)
        stderr = S.redact_text(err.decode(errors="replace").strip())
        note = "" if code == 0 else f"exit code {code}" + (f": {stderr.splitlines()[-1]}" if stderr else "")
        if not out.strip():
            self.index.add(S.Member(path, what, source, error=note or "no output"))
            return
        if path.startswith("nodes/"):
            try:
                per_node = json.loads(out)
            except ValueError:
                per_node = None
            if isinstance(per_node, list) and all(isinstance(n, dict) and "node" in n for n in per_node):
                for reply in per_node:
                    self.add_json(f"nodes/{reply['node']}/{path.removeprefix('nodes/')}", f"{what} ({reply['node']})",
                                  source, reply, note="" if reply.get("ok", True) else
                                  f"the node did not answer: {reply.get('error', '')}")
                return
        if path.endswith(".json"):
            try:
                self.add_json(path, what, source, json.loads(out), note=note)
                return
            except ValueError:
                pass
        if path.endswith(".jsonl"):
            lines = []
            for line in out.decode(errors="replace").splitlines():
                try:
                    lines.append(json.dumps(S.redact(json.loads(line))))
                except ValueError:
                    lines.append(S.redact_text(line))
            data = ("\n".join(lines) + "\n").encode() if lines else b""
        else:
            data = S.redact_text(out.decode(errors="replace")).encode()
        self.add_bytes(path, what, source, data, note=note)

    # ---------------------------------------------------------------- buckets

    async def buckets(self, nats_url: str, credential: NatsCredential | None = None) -> None:
        bus = await Bus.connect(nats_url, "ciliary-sysdump", allow_reconnect=False, credential=credential)
        try:
            for bucket in schema.ALL_BUCKETS:
                try:
                    entries = await bus.kv_list(bucket)
                except BusError as err:
                    self.index.add(S.Member(f"buckets/{bucket}.json", f"KV bucket {bucket}", "bus", error=str(err)))
                    continue
                decoded: dict[str, Any] = {}
                for key in sorted(entries):
                    entry = entries[key]
                    if entry.value is None:
                        continue
                    encoding, value = S.decode_entry(bucket, key, entry.value)
                    decoded[key] = {"revision": entry.revision, "encoding": encoding, "value": value}
                self.add_json(f"buckets/{bucket}.json",
                              f"KV bucket {bucket}: {len(decoded)} keys (writer: {schema.BUCKET_WRITERS[bucket]})",
                              f"kv_list {bucket}", decoded)
        finally:
            await bus.close()

    # ---------------------------------------------------------------- files

    def files(self, data_dir: Path) -> None:
        selection = S.select_files(data_dir)
        self.index.left_out = selection.secret
        for rel in selection.files:
            path = data_dir / rel
            try:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    if size > S.MAX_FILE_BYTES:
                        f.seek(size - S.MAX_FILE_BYTES)
                    data = f.read(S.MAX_FILE_BYTES)
            except OSError as err:
                self.index.add(S.Member(f"data-dir/{rel}", "file of the data directory", str(path), error=str(err)))
                continue
            text = S.redact_text(data.decode(errors="replace"))
            self.add_bytes(f"data-dir/{rel}", _describe(rel), str(path), text.encode(),
                           truncated=size > S.MAX_FILE_BYTES)
        if selection.over_limit:
            self.index.add(S.Member("data-dir/", "files of the data directory", str(data_dir),
                                    error=f"{selection.over_limit} more files left out (limit {S.MAX_FILES})"))


def _describe(rel: str) -> str:
    if rel.startswith("logs/"):
        return "process log"
    if "/logs/" in rel:
        return "container log"
    if rel == "instance.json":
        return "the running instance: NATS URL, pids"
    return "node executor record"


async def run_cli(data_dir: Path, argv: tuple[str, ...]) -> tuple[int, bytes, bytes]:
    """``python -m ciliary.cli ARGV --data-dir DIR``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ciliary.cli", *argv, "--data-dir", str(data_dir),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CILIARY_DATA_DIR": str(data_dir)})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, b"", f"no answer within {COMMAND_TIMEOUT:.0f}s".encode()
    return proc.returncode if proc.returncode is not None else -1, out, err


def versions() -> dict[str, Any]:
    uname = platform.uname()
    return {
        "ciliary": __version__,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "kernel": {"release": uname.release, "version": uname.version, "machine": uname.machine},
        "os": _os_release(),
        "bcc": _package_version("python3-bpfcc") or _package_version("libbpfcc") or "not installed",
        "nats_server": _command_output(_nats_server_argv()) or "not found",
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _package_version(package: str) -> str:
    return _command_output(["dpkg-query", "-W", "-f", "${Version}", package])


def _nats_server_argv() -> list[str]:
    beside = Path(sys.executable).parent / "nats-server"
    return [str(beside) if beside.exists() else "nats-server", "--version"]


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
