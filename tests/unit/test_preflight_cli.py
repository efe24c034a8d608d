"""``ciliary preflight`` without an instance: pod lists in, a report and a verdict out;
the probe's pure parts and its refusal to raise."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from ciliary.cli import app
from ciliary.preflight import kernel as K
from ciliary.preflight import probe

from .test_preflight_labels import deployments, pod_list


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        app.main(argv)
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def preflight(tmp_path: Path, *args: str) -> list[str]:
    return ["preflight", "--data-dir", str(tmp_path / "no-instance"), "--no-kernel", *args]


def test_json_report_of_a_pod_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pods.json"
    path.write_text(pod_list(deployments(3, 4)))
    code, out, _ = run(preflight(tmp_path, "--pods", str(path), "--services", "50", "--backends", "3",
                                 "--policy-entries", "20", "-o", "json"), capsys)
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"kernel", "labels", "sizing", "live", "operations", "decision", "notes"}
    assert report["kernel"] is None and report["live"] is None and report["operations"] is None
    assert report["labels"]["identities"] == 3 and report["labels"]["status"] == "ok"
    assert report["labels"]["source"] == str(path)
    maps = {m["name"]: m for m in report["sizing"]["maps"]}
    assert maps["ciliary_lb4_services"]["expected"] == 50 * 4
    assert maps["ciliary_lxc"]["expected"] == 6  # replicas 0 and 3 of each app are on worker-0
    assert maps["ciliary_policy"]["expected"] == 3 * 20
    assert report["decision"]["verdict"] == "pilot"
    assert report["decision"]["questions"]["kernel"]["answer"] == "unknown"


def test_table_report_from_stdin_with_exploding_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    items = deployments(2, 10, **{"build-id": lambda a, r: f"{a:04x}{r:08x}"})
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(items)))
    code, out, _ = run(preflight(tmp_path, "--pods", "-"), capsys)
    assert code == 0
    assert "LABELS from <stdin>: 20 pods, 20 endpoints -> 20 identities" in out
    assert 'suggested: CILIARY_IDENTITY_LABELS="k8s:!build\\-id$" -> 2 identities' in out
    assert "VERDICT: govern labels first" in out
    assert "KERNEL: not probed" in out


def test_a_malformed_pod_list_names_item_and_field_and_exits_2(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    items = deployments(1, 3)
    items[2]["metadata"]["labels"]["app"] = 7
    del items[1]["metadata"]["name"]
    path = tmp_path / "bad.json"
    path.write_text(pod_list(items))
    code, out, err = run(preflight(tmp_path, "--pods", str(path)), capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: pod list: ") for line in lines)
    assert "item 1" in lines[0] and "metadata.name" in lines[0]
    assert "item 2" in lines[1] and "metadata.labels[app]" in lines[1]
    assert "Traceback" not in err


def test_unreadable_and_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(preflight(tmp_path, "--pods", str(tmp_path / "missing.json")), capsys)
    assert code == 1 and err.startswith("error: cannot read") and "Traceback" not in err
    code, _, err = run(preflight(tmp_path, "--services", "-3"), capsys)
    assert code == 1 and "--services must not be negative" in err
    path = tmp_path / "pods.json"
    path.write_text(pod_list(deployments(1, 1)))
    code, _, err = run(preflight(tmp_path, "--pods", str(path), "--label-filter", "k8s:("), capsys)
    assert code == 1 and err.startswith("error: label filter:")
    code, _, err = run(preflight(tmp_path, "--pods", str(path), "--cluster-id", "300"), capsys)
    assert code == 1 and "cluster ID 300 out of range" in err


# ---------------------------------------------------------------- the probe's pure parts


def test_instructions_and_mount_parsing() -> None:
    assert probe.returning(1) == struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    assert probe.calling(131, 0)[:8] == struct.pack("<BBhi", 0x85, 0, 0, 131)
    mounts = ("sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nnone /my\\040cg cgroup2 rw 0 0\n")
    assert probe.mount_points(mounts, "bpf") == ["/sys/fs/bpf"]
    assert probe.mount_points(mounts, "cgroup2") == ["/sys/fs/cgroup/unified", "/my cg"]


def fake_proc(tmp_path: Path, mounts: str, filesystems: str = "nodev\tbpf\nnodev\tcgroup2\n",
              jit: str | None = "1") -> probe.Probe:
    proc = tmp_path / "proc"
    (proc / "sys/net/core").mkdir(parents=True)
    (proc / "mounts").write_text(mounts)
    (proc / "filesystems").write_text(filesystems)
    if jit is not None:
        (proc / "sys/net/core/bpf_jit_enable").write_text(jit + "\n")
    return probe.Probe(proc=str(proc), sys=str(tmp_path / "sys"), modules=str(tmp_path / "modules"))


def by_name(p: probe.Probe, name: str) -> K.CheckResult:
    return p.check(K.CHECKS_BY_NAME[name])


def test_probe_reads_the_node_from_its_paths(tmp_path: Path) -> None:
    p = fake_proc(tmp_path, "sysfs /sys sysfs rw 0 0\n", jit="0")
    assert by_name(p, "bpffs") == K.CheckResult("bpffs", K.MISSING, "not mounted at /sys/fs/bpf")
    cgroup = by_name(p, "cgroup2")
    assert cgroup.status == K.DEGRADED and "/run/ciliary/cgroup2" in cgroup.detail
    assert by_name(p, "jit").status == K.DEGRADED
    assert by_name(p, "btf").status == K.MISSING
    assert by_name(p, "kernel_headers").status == K.MISSING
    assert by_name(p, "attach_cgroup_connect4") == K.CheckResult(
        "attach_cgroup_connect4", K.UNKNOWN, "no cgroup v2 mounted to attach to")
    bare = fake_proc(tmp_path / "bare", "sysfs /sys sysfs rw 0 0\n", filesystems="nodev\tsysfs\n", jit=None)
    assert by_name(bare, "cgroup2").status == K.MISSING
    assert "no bpf filesystem" in by_name(bare, "bpffs").detail
    assert "no BPF JIT" in by_name(bare, "jit").detail


def test_a_probe_that_breaks_is_unknown_never_an_exception(tmp_path: Path) -> None:
    p = probe.Probe(proc=str(tmp_path / "absent"))
    result = by_name(p, "bpffs")
    assert result.status == K.UNKNOWN and result.detail.startswith("FileNotFoundError:")
    odd = p.check(K.CheckSpec("odd", "odd", "teleport", "nothing"))
    assert odd == K.CheckResult("odd", K.UNKNOWN, "no probe for kind 'teleport'")
