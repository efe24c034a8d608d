"""The settings of one Kubernetes installation (deploy/values.yaml), decoded and checked.

Invariants:
- Unknown keys and wrong types are errors naming the field (``$.services.identity.replicas``);
  a value file that decodes is complete: every field has a default.
- Every key under ``settings`` is a ``CILIARY_*`` variable; the process-wiring variables
  (NATS URL, cluster, node, instance, health, JetStream replicas) are set by the
  renderer and may not be overridden there.
- Pure: decoding only.
"""

from __future__ import annotations

import re

import msgspec
import yaml

SERVICES = ("identity", "servicelb", "policy", "flows", "mesh", "kubebridge")
MULTI_REPLICA = frozenset({"identity", "kubebridge"})  # safe with several replicas
WIRED = frozenset({"CILIARY_NATS_URL", "CILIARY_CLUSTER", "CILIARY_CLUSTER_ID", "CILIARY_NODE",
                   "CILIARY_INSTANCE", "CILIARY_HEALTH_PORT", "CILIARY_HEALTH_HOST",
                   "CILIARY_JS_REPLICAS"})
_CLUSTER_RE = re.compile(r"^[a-z0-9]{1,16}$")


class ValuesError(ValueError):
    """A values file that cannot be rendered; the message names the field."""


class _Spec(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    pass


class ResourceList(_Spec):
    cpu: str = "100m"
    memory: str = "128Mi"


class Resources(_Spec):
    requests: ResourceList = ResourceList()
    limits: ResourceList = ResourceList(cpu="1", memory="512Mi")


class Cluster(_Spec):
    name: str = "default"
    id: int = 1


class Nats(_Spec):
    replicas: int = 3
    storage: str = "2Gi"
    storage_class_name: str = ""
    host_addresses: list[str] = []
    resources: Resources = Resources()


class Service(_Spec):
    replicas: int = 1
    resources: Resources = Resources()
    metrics_port: int = 0


class Node(_Spec):
    resources: Resources = Resources()
    cni_bin_dir: str = "/opt/cni/bin"
    cni_conf_dir: str = "/etc/cni/net.d"


class Values(_Spec):
    namespace: str = "ciliary-system"
    image: str = "localhost/ciliary:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    cluster: Cluster = Cluster()
    health_port: int = 9879
    settings: dict[str, str] = {}
    nats: Nats = Nats()
    services: dict[str, Service] = {}
    node: Node = Node()
    service_monitor: bool = True

    def service(self, name: str) -> Service:
        return self.services.get(name, Service())


def check(values: Values) -> Values:
    if not _CLUSTER_RE.match(values.cluster.name):
        raise ValuesError(f"$.cluster.name: must match {_CLUSTER_RE.pattern}, got {values.cluster.name!r}")
    if not 1 <= values.cluster.id <= 255:
        raise ValuesError(f"$.cluster.id: must be 1-255, got {values.cluster.id}")
    if values.nats.replicas not in (1, 3, 5):
        raise ValuesError(f"$.nats.replicas: must be 1, 3 or 5 (a JetStream quorum), got {values.nats.replicas}")
    for name, svc in values.services.items():
        if name not in SERVICES:
            raise ValuesError(f"$.services.{name}: unknown service; expected one of {', '.join(SERVICES)}")
        if svc.replicas < 1 or (svc.replicas > 1 and name not in MULTI_REPLICA):
            raise ValuesError(f"$.services.{name}.replicas: {name} is a single writer and runs exactly "
                              "1 replica (identity coordinates replicas by compare-and-set, the kube "
                              "bridge by a leader Lease)")
    for key in values.settings:
        if not key.startswith("CILIARY_"):
            raise ValuesError(f"$.settings.{key}: settings are CILIARY_* variables")
        if key in WIRED:
            raise ValuesError(f"$.settings.{key}: set by the renderer from the other values")
    if not 1 <= values.health_port <= 65535:
        raise ValuesError(f"$.healthPort: must be a port, got {values.health_port}")
    return values


def load_values(text: str, source: str = "values") -> Values:
    """Decode and check a values file; ``ValuesError`` names the file and field."""
    try:
        raw = yaml.safe_load(text) or {}
        return check(msgspec.convert(raw, Values, str_keys=True))
    except yaml.YAMLError as err:
        raise ValuesError(f"{source}: not YAML: {err}") from None
    except msgspec.ValidationError as err:
        raise ValuesError(f"{source}: {err}") from None
    except ValuesError as err:
        raise ValuesError(f"{source}: {err}") from None
