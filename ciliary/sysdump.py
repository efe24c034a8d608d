"""What ``ciliary sysdump`` puts into its archive, and what it keeps out (pure).

Invariants:
- Files of the data directory are chosen by ``select_files``: the process logs
  (``logs/``), the node executors' pod records and container logs (``nodes/<cluster>/
  <node>/``) and ``instance.json``; never the JetStream store (``nats/``) and never a
  credential: a file named ``*.creds``, ``*.nk``, ``*.jwt``, ``*.key``, ``*.pem``,
  ``*.seed``, or anything under a directory named ``secrets`` or ``auth`` (at any depth).
- Everything that goes in is redacted first: ``redact`` replaces the value of every
  mapping key that names a secret (password, token, secret, credential, API or private
  key, authorization) with ``REDACTED``, at any depth; ``redact_text`` does the same for
  ``key=value`` / ``key: value`` text, user:password in URLs, bearer tokens, JWTs and NATS
  nkey seeds. Redaction never fails on data of an unexpected shape: what it does not
  understand it leaves as it is.
- ``decode_entry`` turns a KV value into plain data: with the bucket's schema record
  where one fits the key, else as generic msgpack, else as JSON, else base64 — it never
  raises.
- ``Index`` lists every member of the archive (path, what it is, where it came from,
  its size, a note) and every part that could not be collected (with ``error``, and not
  in the archive); the index is itself a member.
- No I/O here but ``select_files`` walking the directory it is given.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from ciliary import schema

REDACTED = "[redacted]"

SECRET_SUFFIXES = (".creds", ".nk", ".jwt", ".key", ".pem", ".seed")
SECRET_DIRS = frozenset({"secrets", "auth"})

# data-dir relative globs of the files a sysdump carries (matched per path component)
INCLUDE_GLOBS = (
    "instance.json",
    "logs/*",
    "logs/**/*",
    "nodes/*/*/*.json",
    "nodes/*/*/logs/**/*",
)
EXCLUDE_DIRS = frozenset({"nats"})  # top-level: the JetStream store
MAX_FILE_BYTES = 8 * 1024 * 1024  # a larger file contributes its last MAX_FILE_BYTES
MAX_FILES = 5000

_SECRET_WORDS = r"password|passwd|passphrase|token|secret|credential|api[-_]?key|private[-_]?key|authorization"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
_TEXT_PATTERNS = (
    # scheme://user:password@host
    (re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]*@"), rf"\1{REDACTED}@"),
    # "password": "x"  /  token=x  /  secret: x
    (re.compile(rf"""(["']?[\w.-]*(?:{_SECRET_WORDS})[\w.-]*["']?\s*[:=]\s*)"""
                rf"""((?:Bearer|Basic)\s+)?("[^"]*"|'[^']*'|[^\s,;}}\]]+)""",
                re.IGNORECASE), rf"\1{REDACTED}"),
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\1 {REDACTED}"),
    (re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"), REDACTED),  # JWTs
    (re.compile(r"\bS[UAONCX][A-Z2-7]{50,}\b"), REDACTED),  # NATS nkey seeds
)


# ---------------------------------------------------------------- redaction


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def redact(data: Any) -> Any:
    """A copy of ``data`` with secret-named mapping values and secrets in strings replaced."""
    if isinstance(data, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "", [], {}) else redact(v))
                for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data


def redact_text(text: str) -> str:
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------- files of the data dir


def is_secret_path(relpath: str | PurePosixPath) -> bool:
    """Whether a data-dir relative path is (or lies under) a credential."""
    path = PurePosixPath(relpath)
    if any(part.lower() in SECRET_DIRS for part in path.parts[:-1]):
        return True
    name = path.name.lower()
    return name in SECRET_DIRS or name.endswith(SECRET_SUFFIXES)


def is_wanted(relpath: str | PurePosixPath) -> bool:
    """Whether a data-dir relative file belongs in a sysdump (before the secret rule)."""
    path = PurePosixPath(relpath)
    if not path.parts or path.parts[0] in EXCLUDE_DIRS:
        return False
    return any(_glob_match(path.parts, PurePosixPath(g).parts) for g in INCLUDE_GLOBS)


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


@dataclass(frozen=True)
class Selection:
    files: list[str]  # data-dir relative, sorted
    secret: list[str]  # left out as credentials
    over_limit: int = 0  # left out beyond MAX_FILES


def select_files(data_dir: Path, *, max_files: int = MAX_FILES) -> Selection:
    """The files of ``data_dir`` a sysdump carries (see the module invariants). Symbolic
    links are not followed; directories named like secrets are not even entered."""
    chosen: list[str] = []
    secret: list[str] = []
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        rel_root = PurePosixPath(Path(root).relative_to(data_dir).as_posix())
        if rel_root.parts and rel_root.parts[0] in EXCLUDE_DIRS:
            dirs[:] = []
            continue
        for d in list(dirs):
            if d.lower() in SECRET_DIRS:
                secret.append(str(rel_root / d) + "/")
                dirs.remove(d)
        dirs.sort()
        for name in sorted(files):
            rel = rel_root / name
            if Path(root, name).is_symlink():
                continue
            if is_secret_path(rel):
                secret.append(str(rel))
            elif is_wanted(rel):
                chosen.append(str(rel))
    chosen.sort()
    return Selection(chosen[:max_files], sorted(secret), max(0, len(chosen) - max_files))


# ---------------------------------------------------------------- buckets


BUCKET_RECORDS: dict[str, tuple[tuple[str, type], ...]] = {
    schema.BUCKET_RESOURCES: (("", schema.ResourceRecord),),
    schema.BUCKET_STATUS: (("", schema.StatusRecord),),
    schema.BUCKET_IDENTITIES: ((schema.IDENTITY_ID_PREFIX, schema.IdentityRecord),
                               (schema.IDENTITY_LABELS_PREFIX, schema.IdentityLabelsRecord)),
    schema.BUCKET_IPCACHE: (("", schema.IPCacheRecord),),
    schema.BUCKET_SERVICES: ((schema.LB_FRONTEND_PREFIX + ".", schema.LBFrontend),
                             (schema.LB_ENDPOINTS_PREFIX + ".", schema.LBEndpoints)),
    schema.BUCKET_POLICY: ((schema.POLICY_ID_PREFIX, schema.PolicyMapRecord),),
    schema.BUCKET_ALLOCATIONS: (("servicelb-", schema.LBAllocation),),
    schema.BUCKET_MESH_REMOTES: (("remote.", schema.MeshRemote),),
    schema.BUCKET_MESH_EXPORT: (("cluster", schema.MeshCluster), ("identity.", schema.IdentityRecord),
                                ("ipcache.", schema.IPCacheRecord), ("service.", schema.MeshService),
                                ("node.", schema.MeshNode)),
    schema.BUCKET_MESH: (("status.", schema.MeshRemoteStatus), ("identity.", schema.IdentityRecord),
                         ("ipcache.", schema.IPCacheRecord), ("service.", schema.MeshService),
                         ("node.", schema.MeshNode)),
}


def decode_entry(bucket: str, key: str, value: bytes) -> tuple[str, Any]:
    """``(encoding, plain data)`` of one KV value; encoding is the record type's name,
    ``msgpack``, ``json`` or ``base64`` (see the module invariants)."""
    for prefix, record_type in BUCKET_RECORDS.get(bucket, ()):
        if key.startswith(prefix):
            try:
                return record_type.__name__, msgspec.to_builtins(schema.decode(value, record_type))
            except (msgspec.DecodeError, msgspec.ValidationError):
                break
    try:
        return "msgpack", msgspec.to_builtins(msgspec.msgpack.decode(value))
    except (msgspec.DecodeError, TypeError, ValueError):
        pass
    try:
        return "json", msgspec.json.decode(value)
    except msgspec.DecodeError:
        return "base64", base64.b64encode(value).decode()


# ---------------------------------------------------------------- the index


@dataclass
class Member:
    path: str  # inside the archive, relative to its top directory
    what: str
    source: str  # the command or file it came from
    bytes: int = 0
    error: str = ""  # nothing was collected: the member is not in the archive
    note: str = ""  # collected, with something to know (a non-zero exit code, a node's error)
    truncated: bool = False


@dataclass
class Index:
    created: str
    data_dir: str
    cluster: str = ""
    members: list[Member] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # credentials, never read

    def add(self, member: Member) -> None:
        self.members.append(member)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "data_dir": self.data_dir,
            "cluster": self.cluster,
            "members": [{k: v for k, v in vars(m).items() if v != "" and v is not False}
                        for m in sorted(self.members, key=lambda m: m.path)],
            "left_out_as_credentials": self.left_out,
            "redaction": f"values of keys naming a password, token, secret, credential, API or private key, "
                         f"authorization; user:password in URLs; bearer tokens, JWTs, nkey seeds: replaced by {REDACTED}",
        }


def archive_name(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"ciliary-sysdump-{stamp}"
