"""End-to-end: ``ciliary preflight`` on this machine's kernel.

- As root on this kernel, every feature ciliary loads is available, and the maps the tc
  datapath really creates have the types, key and value sizes preflight sizes them with,
  and the memory the kernel charges for them (``memlock`` in fdinfo) is preflight's
  estimate.
- With bpffs not mounted (a private mount namespace where ``/sys/fs/bpf`` is unmounted),
  preflight says bpffs is missing and the datapath features with it, and advises upgrading
  the baseline first; without root the probes say unknown. Neither ends in a traceback.
- Nothing a probe creates is left behind (``ciliary-preflight-*`` namespaces, cgroups, pins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ciliary.preflight import kernel as K
from ciliary.preflight import probe
from ciliary.preflight.sizing import MAPS_BY_NAME, map_memory

from .conftest import require_privileges
from .instance import REPO
from .podnet import PIN_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LOADED = ("policy", "service_lb", "maglev", "flows", "fqdn", "socket_lb")
KIND_TYPES = {"hash": 1, "percpu_hash": 5, "lru_hash": 9, "lpm_trie": 11, "ringbuf": 27}
BPF_OBJ_GET = 7


def preflight(tmp_path: Path, *, prefix: tuple[str, ...] = (), data_dir: str | None = None) -> dict:
    argv = [*prefix, sys.executable, "-m", "ciliary.cli", "preflight", "-o", "json",
            "--data-dir", data_dir or str(tmp_path / "no-instance")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return json.loads(done.stdout)


def leftovers() -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in netns.splitlines() if line.startswith(probe.NAME_PREFIX)]
    left += [str(p) for p in Path("/sys/fs/bpf").glob(f"{probe.NAME_PREFIX}*")]
    for mount in probe.mount_points(Path("/proc/mounts").read_text(), "cgroup2"):
        left += [str(p) for p in Path(mount).glob(f"{probe.NAME_PREFIX}*")]
    return left


def test_preflight_says_every_feature_ciliary_loads_is_available(tmp_path: Path) -> None:
    require_privileges()
    report = preflight(tmp_path)
    features = {f["name"]: f["status"] for f in report["kernel"]["features"]}
    assert {name: features[name] for name in LOADED} == dict.fromkeys(LOADED, K.AVAILABLE), report["kernel"]
    assert features["encryption"] == K.NOT_BUILT
    not_ok = [c for c in report["kernel"]["checks"] if c["status"] != K.OK]
    assert not_ok == []
    assert len(report["kernel"]["checks"]) == len(K.CHECKS)
    assert report["decision"]["questions"]["kernel"]["answer"] == "yes"
    assert report["decision"]["verdict"] == "pilot"
    assert leftovers() == []


def _pinned_fdinfo(path: Path) -> dict[str, int]:
    import ctypes
    import struct

    bpf = probe.Bpf()
    name = ctypes.create_string_buffer(str(path).encode())
    attr = (ctypes.c_uint8 * probe.ATTR_SIZE)()
    struct.pack_into("<Q", attr, 0, ctypes.addressof(name))
    fd = bpf.call(BPF_OBJ_GET, attr, f"open {path}")
    try:
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    finally:
        os.close(fd)
    return {k: int(v.strip(), 0) for k, _, v in (line.partition(":") for line in info.splitlines())
            if k in ("map_type", "key_size", "value_size", "max_entries", "map_flags", "memlock")}


def test_the_datapaths_maps_are_the_ones_preflight_sizes(cluster) -> None:
    pins = Path(PIN_ROOT) / cluster.topo.cluster / "node-1"
    seen = []
    for path in sorted(pins.iterdir()):
        spec = MAPS_BY_NAME.get(path.name)
        assert spec is not None, f"the datapath pins {path.name}, which preflight does not size"
        info = _pinned_fdinfo(path)
        assert (info["map_type"], info["key_size"], info["value_size"]) == (
            KIND_TYPES[spec.kind], spec.key_size, spec.value_size), path.name
        assert bool(info["map_flags"] & 1) == (not spec.prealloc), path.name  # BPF_F_NO_PREALLOC
        if spec.prealloc:  # the estimate of what the kernel charges, within 2 %
            estimate = map_memory(spec, info["max_entries"], 0, os.cpu_count() or 1)
            assert abs(estimate - info["memlock"]) <= 0.02 * info["memlock"], (path.name, estimate, info)
        seen.append(path.name)
    assert "ciliary_policy" in seen and "ciliary_ct4_global" in seen


def test_without_bpffs_the_datapath_features_are_missing(tmp_path: Path) -> None:
    require_privileges()
    script = ("umount -l /sys/fs/bpf && ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts && "
              'exec "$@"')
    report = preflight(tmp_path, prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"))
    checks = {c["name"]: c for c in report["kernel"]["checks"]}
    assert checks["bpffs"]["status"] == K.MISSING
    assert checks["bpffs"]["detail"] == "not mounted at /sys/fs/bpf"
    assert checks["attach_tc_clsact"]["status"] == K.UNKNOWN
    features = {f["name"]: f for f in report["kernel"]["features"]}
    for name in LOADED:
        assert features[name]["status"] == K.MISSING
        assert features[name]["reasons"][0].startswith("bpffs missing: not mounted at /sys/fs/bpf")
    decision = report["decision"]
    assert decision["verdict"] == "upgrade-baseline-first"
    assert decision["questions"]["kernel"]["answer"] == "no"
    assert leftovers() == []


def test_without_root_the_probes_say_unknown(tmp_path: Path) -> None:
    require_privileges()
    report = preflight(tmp_path, prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
                       data_dir="/nonexistent/ciliary")
    checks = {c["name"]: c for c in report["kernel"]["checks"]}
    assert checks["bpf_syscall"] == {**checks["bpf_syscall"], "status": K.UNKNOWN,
                                     "detail": "not permitted: run ciliary preflight as root"}
    features = {f["name"]: f["status"] for f in report["kernel"]["features"]}
    assert {features[name] for name in LOADED} == {K.UNKNOWN}
    assert report["decision"]["questions"]["kernel"]["answer"] == "unknown"
