"""Exclusive claims: one instance per data directory, one instance per cluster name per machine.

Invariants:
- A claim is an ``flock(2)`` on a file. The supervisor takes its claims before it starts
  anything and every child it starts inherits them (the descriptors stay open across exec),
  so a claim lives as long as any process of the instance: a nats-server orphaned by a
  killed supervisor still holds its store, and no second server is started on it.
- The kernel releases a claim when the last process holding it exits: a crash never
  leaves a stale claim behind.
- A claim file names its holder (data directory, cluster, supervisor pid); a refused claim
  says who holds it.
- Cluster names are claimed machine-wide under ``CLAIM_DIR`` (``/run/ciliary``, or a
  per-user directory under the temp dir when that is not writable): two instances of one
  cluster name would share node namespaces and break each other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

CLAIM_DIR = Path("/run/ciliary")


class ClaimError(Exception):
    """Somebody else holds the claim."""


def claim_dir() -> Path:
    for candidate in (CLAIM_DIR, Path(tempfile.gettempdir()) / f"ciliary-claims-{os.getuid()}"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise ClaimError("no writable directory for instance claims")


def data_dir_claim(data_dir: Path) -> Path:
    return data_dir / "instance.lock"


def cluster_claim(cluster: str) -> Path:
    return claim_dir() / f"cluster-{cluster}.lock"


def take(path: Path, holder: str) -> int:
    """Claim ``path`` for ``holder``; the open descriptor (inheritable) holds the claim.
    Raises ``ClaimError`` naming the current holder when it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise ClaimError(f"{path} is held by {holder_of(path) or 'another process'}") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    os.set_inheritable(fd, True)
    return fd


def holder_of(path: Path) -> str:
    """Who the claim file says holds it ("" when unknown)."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def is_held(path: Path) -> bool:
    """Whether some process holds the claim now (probes without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False
