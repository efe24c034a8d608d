"""The cgroup v2 directories a cluster's node executors create (socket LB), found the same
way by the executor, by ``ciliary down``'s safety net and by the tests' leak check.

Invariants:
- ``cgroup2_mounts`` parses ``/proc/mounts`` text only (pure); octal escapes in mount
  points (``\\040`` for a space) are decoded.
- A cluster's cgroups are ``ciliary-<cluster>-*`` directly under a cgroup2 mount point.
"""

from __future__ import annotations

from pathlib import Path


def cgroup2_mounts(mounts: str) -> list[str]:
    """Every cgroup2 mount point in ``/proc/mounts`` text, in order."""
    out = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            out.append(parts[1].replace("\\040", " "))
    return out


def cluster_cgroups(cluster: str, mounts: str | None = None) -> list[Path]:
    """The ``ciliary-<cluster>-*`` cgroups under every cgroup2 mount (sorted)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return []
    return sorted(p for m in cgroup2_mounts(mounts) for p in Path(m).glob(f"ciliary-{cluster}-*"))


__all__ = ["cgroup2_mounts", "cluster_cgroups"]
