"""Finding a cluster's node cgroups from /proc/mounts text (ciliary.cgroups)."""

from __future__ import annotations

from pathlib import Path

from ciliary import cgroups


def test_every_cgroup2_mount_in_order_with_escapes_decoded() -> None:
    text = ("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
            "none /run/my\\040cg cgroup2 rw 0 0\n")
    assert cgroups.cgroup2_mounts(text) == ["/sys/fs/cgroup/unified", "/run/my cg"]
    assert cgroups.cgroup2_mounts("proc /proc proc rw 0 0\n") == []


def test_a_clusters_cgroups_are_its_prefix_under_each_mount(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a / "ciliary-east-node-1", a / "ciliary-eastern-node-1", b / "ciliary-east-node-2",
              b / "ciliary-west-node-1"):
        d.mkdir(parents=True)
    text = f"x {a} cgroup2 rw 0 0\nx {b} cgroup2 rw 0 0\n"
    assert cgroups.cluster_cgroups("east", text) == [a / "ciliary-east-node-1", b / "ciliary-east-node-2"]
