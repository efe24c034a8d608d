"""Kubernetes NetworkPolicy conformance matrix on the real embedded stack (issue 6).

The model is the upstream e2e suite's (test/e2e/network/netpol): namespaces x, y, z with
pods a, b, c each serving TCP and UDP on ports 80 and 81, spread over two nodes. Every
case in ``netpol_cases/*.yaml`` applies policies, waits until they are in force (policy
state ok and the endpoints' enforcement flags in the datapath as the policies demand),
probes all 81 ordered pod pairs with real packets and compares the whole 9×9 matrix with
the expected one; ``ciliary policy trace`` must agree with what was observed for a sample
of pairs. One stack serves every case; each case deletes its policies and waits until no
endpoint is enforced any more.

Invariants:
- Only the stack's namespaces carry traffic; probes target pod IPs of this cluster only.
- The module fixture always runs ``ciliary down`` and checks that no namespace or pin of
  its cluster is left (the module-scoped ``no_leaks`` below replaces the per-test one,
  which would see the shared cluster still running after each case).
- Loopback (a pod to its own IP) never crosses the datapath and is always allowed, as
  upstream's ``AllowLoopback``.
- A UDP probe is "denied" when no answer arrives within the timeout; every answer must
  name the pod that was probed.
- Speed: one prober process probes all 81 pairs at once, each from a thread that joined
  the source pod's namespace (setns is per thread; a thread that cannot join never
  probes); CLI commands (apply, policy get, endpoint list, policy trace) run through
  ``ciliary.cli.main`` in batches, one interpreter per batch. A case takes ~3-5 s.

Case format (a YAML document per case)::

    name: default-deny-ingress
    upstream: "should support a 'default-deny-ingress' policy"
    steps:                       # run in order, each probed after it is in force
      - apply: [manifest, ...]   # policies, or Namespaces to relabel
        delete: ["NetworkPolicy/x/name", ...]
        probes:
          - {port: 80, protocol: TCP, default: true,
             rules: [[FROM, TO, allowed], ...]}   # FROM/TO: x/a, x/*, */a, *; later rules win
    restore: [manifest, ...]     # applied after the case (e.g. original Namespace labels)

Pod IPs are known only once the model runs: ``{ip:x/a}`` anywhere in a step (manifests
and rules) is x/a's pod IP, and a rule side ``cidr:PREFIX`` names every pod whose IP lies
inside PREFIX (host bits allowed, as in ``{ip:x/a}/24``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliary import config

from .conftest import require_privileges
from .instance import ciliary, leftovers
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = Path(__file__).resolve().parent / "netpol_cases"
MODEL = CASES_DIR / "00-model.yaml"
NAMESPACES = ("x", "y", "z")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in ("a", "b", "c"))
PROBE_TIMEOUT = 0.8
PIN_ROOT = "/sys/fs/bpf/ciliary"
TRACE_SAMPLE = 6

PROBER = r"""
import ctypes, json, os, socket, sys, threading
# pairs: [[source netns, target key, target ip], ...]; each probe runs in its own thread,
# which first joins the source pod's network namespace (setns is per thread)
pairs = json.loads(sys.argv[1])
port, udp, timeout = int(sys.argv[2]), sys.argv[3] == "UDP", float(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
out = {}
def probe(i, netns, key, ip):
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:  # never probe from the root namespace
            out[i] = "setns failed: " + os.strerror(ctypes.get_errno())
            return
    finally:
        os.close(fd)
    ok = False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.sendall(b"ping\n")
            ok = s.recv(200).decode(errors="replace").split()[:1] == [key]
    except OSError:
        ok = False
    out[i] = ok
threads = [threading.Thread(target=probe, args=(i, *p)) for i, p in enumerate(pairs)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps([out.get(i, "no result") for i in range(len(pairs))]))
"""

# Runs several CLI invocations (``ciliary.cli.main``) in one process: each is exactly the
# command a user types, without paying the interpreter start-up once per command.
CLI_BATCH = r"""
import contextlib, io, json, sys
from ciliary import cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code or 0
    results.append({"argv": argv, "rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


# ---- case data ------------------------------------------------------------------------------


def load_cases() -> list[dict[str, Any]]:
    cases = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        if path == MODEL:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                cases.append(doc)
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


CASES = load_cases()


def substitute_ips(value: Any, ips: dict[str, str]) -> Any:
    """``value`` with every ``{ip:ns/pod}`` replaced by that pod's IP."""
    if isinstance(value, str):
        return re.sub(r"\{ip:([a-z*]+/[a-z*]+)\}", lambda m: ips[m.group(1)], value)
    if isinstance(value, list):
        return [substitute_ips(v, ips) for v in value]
    if isinstance(value, dict):
        return {k: substitute_ips(v, ips) for k, v in value.items()}
    return value


def _match(pattern: str, pod: str, ips: dict[str, str] | None = None) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("cidr:"):
        assert ips is not None, f"{pattern}: pod IPs unknown"
        net = ipaddress.ip_network(pattern[5:], strict=False)
        return ipaddress.ip_address(ips[pod]) in net
    pns, _, ppod = pattern.partition("/")
    ns, _, name = pod.partition("/")
    return pns in ("*", ns) and ppod in ("*", name)


def expected_matrix(probe: dict[str, Any], ips: dict[str, str] | None = None
                    ) -> dict[tuple[str, str], bool]:
    m = {(f, t): bool(probe.get("default", True)) for f in PODS for t in PODS}
    for src, dst, allowed in probe.get("rules", []):
        for f in PODS:
            for t in PODS:
                if _match(src, f, ips) and _match(dst, t, ips):
                    m[(f, t)] = bool(allowed)
    for p in PODS:
        m[(p, p)] = True  # loopback never leaves the pod
    return m


def truth_table(m: dict[tuple[str, str], bool], title: str) -> str:
    """Upstream's layout: rows are clients, columns servers, ``.`` allowed, ``X`` denied."""
    lines = [title, "-\t" + "\t".join(PODS)]
    for f in PODS:
        lines.append(f + "\t" + "\t".join("." if m[(f, t)] else "X" for t in PODS))
    return "\n".join(lines)


# ---- the stack --------------------------------------------------------------------------------


cli = ciliary


def cli_json(*args: str, data_dir: Path) -> Any:
    return json.loads(cli(*args, "-o", "json", data_dir=data_dir).stdout)




@dataclass
class Model:
    data_dir: Path
    cluster: str
    ips: dict[str, str]  # "x/a" -> pod IP
    netns: dict[str, str]  # "x/a" -> pod network namespace

    def probe(self, port: int, proto: str) -> dict[tuple[str, str], bool]:
        pairs = [(src, dst) for src in PODS for dst in PODS]
        arg = json.dumps([[self.netns[src], dst, self.ips[dst]] for src, dst in pairs])
        proc = subprocess.run(
            [sys.executable, "-c", PROBER, arg, str(port), proto, str(PROBE_TIMEOUT)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, f"prober: {proc.stderr}"
        results = json.loads(proc.stdout)
        bad = [r for r in results if not isinstance(r, bool)]
        assert not bad, f"prober: {bad[:3]}"
        return dict(zip(pairs, results, strict=True))

    def batch(self, *argvs: list[str]) -> list[dict[str, Any]]:
        """Several ``ciliary`` commands in one interpreter; every one must succeed."""
        proc = subprocess.run(
            [sys.executable, "-c", CLI_BATCH, json.dumps([list(a) for a in argvs])],
            capture_output=True,
            text=True,
            env=dict(os.environ, CILIARY_DATA_DIR=str(self.data_dir)),
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 0, f"cli batch: {proc.stderr}"
        results = json.loads(proc.stdout)
        for r in results:
            assert r["rc"] == 0, f"ciliary {' '.join(r['argv'])}: {r['stdout']}{r['stderr']}"
        return results


def _ready_pods(data_dir: Path) -> dict[str, dict] | None:
    items = cli_json("get", "pods", "-A", data_dir=data_dir)["items"]
    ready = {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["status"]
        for p in items
        if p.get("status", {}).get("phase") == "Running"
        and p["status"].get("podIP")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    }
    return ready if set(ready) == set(PODS) else None


def _leak_check(cluster: str) -> None:
    left = leftovers(cluster)
    assert not left, f"cluster {cluster} left: {left}"


@pytest.fixture(scope="module")
def cluster_names() -> Iterator[list[str]]:
    names: list[str] = []
    yield names


@pytest.fixture(scope="module", autouse=True)
def no_leaks(cluster_names: list[str]) -> Iterator[None]:
    """Module-scoped: runs after the shared stack below was torn down."""
    yield
    for name in cluster_names:
        _leak_check(name)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, cluster_names: list[str]) -> Iterator[Model]:
    require_privileges()
    cluster = "n" + secrets.token_hex(2)
    cluster_names.append(cluster)
    data_dir = tmp_path_factory.mktemp("netpol") / "instance"
    try:
        cli(
            "up",
            "-d",
            "--nodes",
            "2",
            "--cluster",
            cluster,
            "--cluster-id",
            "11",
            data_dir=data_dir,
            timeout=120,
        )
        cli("apply", "-f", str(MODEL), data_dir=data_dir)
        pods = wait_for(lambda: _ready_pods(data_dir), 90, "nine ready pods", interval=0.5)
        m = Model(
            data_dir,
            cluster,
            {k: v["podIP"] for k, v in pods.items()},
            {k: v["ciliary"]["netns"] for k, v in pods.items()},
        )
        # every pod answers on every port before any policy exists
        for port, proto in ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")):
            wait_for(
                lambda port=port, proto=proto: all(m.probe(port, proto).values()),
                30,
                f"full connectivity on {port}/{proto} without policy",
            )
        yield m
    finally:
        state = config.read_instance(data_dir)
        cli("down", data_dir=data_dir, check=False, timeout=120)
        if state is not None:
            assert not any(config.pid_alive(p.pid) for p in state.processes), "process left behind"
        _leak_check(cluster)


# ---- in force --------------------------------------------------------------------------------


def _directions(manifest: dict[str, Any]) -> set[str]:
    spec = manifest.get("spec", {})
    types = spec.get("policyTypes")
    if types is None:
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    return {t.lower() for t in types}


POLICY_GET = ("policy", "get", "-A", "-o", "json")
ENDPOINT_LIST = ("endpoint", "list", "-o", "json")


def wait_in_force(
    m: Model, active: dict[tuple[str, str], dict[str, Any]], *first: list[str]
) -> None:
    """Run ``first`` (apply / delete commands), then wait until every active policy is ok
    and each endpoint's enforcement flags are exactly what the policies demand."""
    pending = list(first)

    def check():
        results = m.batch(*pending, POLICY_GET, ENDPOINT_LIST)
        pending.clear()
        policies, endpoints = (json.loads(r["stdout"]) for r in results[-2:])
        rows = {(r["namespace"], r["name"]): r for r in policies}
        if set(rows) != set(active):
            return f"policies {sorted(rows)} != {sorted(active)}"
        want: dict[int, set[str]] = {}
        for key, manifest in active.items():
            if rows[key]["state"] != "ok":
                return f"{key}: {rows[key]}"
            for identity in rows[key]["selected_identities"]:
                want.setdefault(identity, set()).update(_directions(manifest))
        eps = {r["pod"]: r for node in endpoints for r in node["rows"] if r["pod"] in PODS}
        if set(eps) != set(PODS):
            return f"endpoints {sorted(eps)}"
        for pod, ep in eps.items():
            dirs = want.get(ep["identity"], set())
            if ep["ingress_enforcement"] != ("ingress" in dirs) or ep["egress_enforcement"] != (
                "egress" in dirs
            ):
                return f"{pod}: {ep} != {sorted(dirs)}"
        return True

    wait_for(check, 30, "policies in force", interval=0.1)
    time.sleep(0.3)  # the flags are set after the entries; let the last map writes land


# ---- the cases ---------------------------------------------------------------------------------


def _write(tmp: Path, name: str, docs: list[dict[str, Any]]) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def check_matrix(m: Model, probe: dict[str, Any], where: str) -> dict[tuple[str, str], bool]:
    want = expected_matrix(probe, m.ips)
    port, proto = int(probe["port"]), probe.get("protocol", "TCP").upper()
    got = m.probe(port, proto)
    tries = 1
    # convergence is level-triggered: give a late map write a few more chances before failing
    while got != want and tries < 4:
        time.sleep(1.0)
        got = m.probe(port, proto)
        tries += 1
    if tries > 1:
        print(f"{where} {port}/{proto}: matched only on probe {tries}")
    wrong = sorted(k for k in want if want[k] != got.get(k))
    assert not wrong, (
        f"{where} {port}/{proto}: {len(wrong)} of 81 pairs differ after {tries} probes: "
        f"{[f'{a}->{b}' for a, b in wrong]}\n"
        + truth_table(want, "expected:")
        + "\n"
        + truth_table(got, "observed:")
    )
    return got


def trace_sample(got: dict[tuple[str, str], bool], seed: str) -> list[tuple[str, str]]:
    """Half allowed, half denied pairs (loopback excluded: it never meets the datapath)."""
    rng = random.Random(seed)
    pairs = [k for k in got if k[0] != k[1]]
    allowed = [k for k in pairs if got[k]]
    denied = [k for k in pairs if not got[k]]
    sample = rng.sample(allowed, min(len(allowed), TRACE_SAMPLE // 2))
    return sample + rng.sample(denied, min(len(denied), TRACE_SAMPLE - len(sample)))


def check_traces(m: Model, observed: list[tuple[str, str, int, str, bool]]) -> None:
    """``ciliary policy trace`` gives the verdict the packets saw, for every sampled pair."""
    argvs = [
        ["policy", "trace", "--from", src, "--to", dst, "--port", f"{port}/{proto}", "-o", "json"]
        for src, dst, port, proto, _ in observed
    ]
    for (src, dst, port, proto, passed), r in zip(observed, m.batch(*argvs), strict=True):
        out = json.loads(r["stdout"])
        assert (out["verdict"] == "allow") == passed, (
            f"trace {src} -> {dst} {port}/{proto} says {out['verdict']}, "
            f"packets {'passed' if passed else 'were dropped'}: {out}"
        )


def _policy_key(manifest: dict[str, Any]) -> tuple[str, str] | None:
    if manifest["kind"] not in ("NetworkPolicy", "CiliumNetworkPolicy"):
        return None
    return manifest["metadata"].get("namespace", "default"), manifest["metadata"]["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_netpol_case(model: Model, case: dict[str, Any], tmp_path: Path) -> None:
    m = model
    active: dict[tuple[str, str], dict[str, Any]] = {}
    applied: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for i, step in enumerate(substitute_ips(case["steps"], m.ips)):
            where = f"{case['name']} step {i}"
            commands = []
            if step.get("apply"):
                commands.append(
                    ["apply", "-f", str(_write(tmp_path, f"step{i}.yaml", step["apply"]))]
                )
                for doc in step["apply"]:
                    key = _policy_key(doc)
                    if key:
                        active[key] = applied[key] = doc
            for ref in step.get("delete", []):
                kind, ns, name = ref.split("/")
                commands.append(["delete", kind, name, "-n", ns])
                active.pop((ns, name), None)
            wait_in_force(m, active, *commands)
            observed = []
            for probe in step["probes"]:
                port, proto = int(probe["port"]), probe.get("protocol", "TCP").upper()
                got = check_matrix(m, probe, where)
                observed += [
                    (a, b, port, proto, got[(a, b)])
                    for a, b in trace_sample(got, f"{where}/{port}/{proto}")
                ]
            check_traces(m, observed)
    finally:
        cleanup = []
        if applied:
            cleanup.append(
                ["delete", "-f", str(_write(tmp_path, "cleanup.yaml", list(applied.values())))]
            )
        if case.get("restore"):
            cleanup.append(["apply", "-f", str(_write(tmp_path, "restore.yaml", case["restore"]))])
        wait_in_force(m, {}, *cleanup)


def test_cases_cover_upstream() -> None:
    """At least 20 upstream policies, TCP and UDP, named ports and endPort among them."""
    assert len(CASES) >= 20
    text = yaml.safe_dump(CASES)
    assert "UDP" in text and "endPort" in text and "serve-8" in text
