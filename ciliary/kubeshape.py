"""Objects as a Kubernetes API server shows them.

ciliary stores what the user wrote (``resources``) and, apart, what the services found
(``status``: a Service's allocated cluster IP and node ports, a Pod's IP and readiness).
An API server shows the allocations in ``spec`` and fills defaults; ``kubectl`` users and
their ``-o jsonpath`` scripts look there. `shape` turns a stored object (manifest, server
metadata and merged status, as ``StoredObject.to_manifest`` gives it) into that form.

Invariants:
- Pure and total: any dict in, a new dict out (the input is never modified); a field of
  an unexpected type is left as it is, never an exception.
- What the user wrote wins over what is derived: a ``spec.clusterIP`` or ``nodePort`` the
  manifest names is kept; allocations only fill what is absent.
- Service: ``spec.clusterIP``/``spec.clusterIPs`` and each port's ``nodePort`` come from the
  status servicelb wrote; ``status`` keeps ``loadBalancer`` (and ``conditions``), anything
  else ciliary reports moves under ``status.ciliary``. Defaults: ``type`` ClusterIP,
  ``sessionAffinity`` None, ``ipFamilies`` [IPv4], ``ipFamilyPolicy`` SingleStack,
  ``internalTrafficPolicy`` Cluster, a port's ``protocol`` TCP and ``targetPort`` = ``port``.
- Pod: ``status.podIP``/``podIPs``, ``hostIP``/``hostIPs`` and the conditions
  ``PodScheduled``, ``Initialized``, ``ContainersReady``, ``Ready`` (from the node's
  readiness report); spec defaults ``restartPolicy``, ``dnsPolicy``, ``schedulerName``,
  ``serviceAccountName``, ``terminationGracePeriodSeconds``; ``status.qosClass``.
- Node: ``spec.podCIDR``/``podCIDRs`` from the status the node executor reported.
- Namespace: ``status.phase`` Active and the ``kubernetes.io/metadata.name`` label.
- A ``List`` is ``{"apiVersion": "v1", "kind": "List", "items": [...], "metadata":
  {"resourceVersion": ""}}``, as ``kubectl get -o json`` prints several objects.
"""

from __future__ import annotations

import copy
from typing import Any

SERVICE_STATUS_FIELDS = ("loadBalancer", "conditions")


def shape(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as an API server would return it (see the module invariants)."""
    obj = copy.deepcopy(manifest)
    kind = obj.get("kind")
    shaper = _SHAPERS.get(kind if isinstance(kind, str) else "")
    if shaper is not None:
        shaper(obj)
    return obj


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "items": items, "kind": "List",
            "metadata": {"resourceVersion": ""}}


def _dict(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]`` when it is a dict (set to ``{}`` when absent)."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    return value if isinstance(value, dict) else {}


def _service(obj: dict[str, Any]) -> None:
    spec = _dict(obj, "spec")
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(status, dict)
    spec.setdefault("type", "ClusterIP")
    headless = spec.get("clusterIP") == "None"
    allocated = status.get("clusterIP")
    if spec.get("type") != "ExternalName":
        if not spec.get("clusterIP") and isinstance(allocated, str) and allocated:
            spec["clusterIP"] = allocated
        if spec.get("clusterIP") and not spec.get("clusterIPs"):
            found = status.get("clusterIPs")
            spec["clusterIPs"] = (list(found) if isinstance(found, list) and not headless
                                  and spec["clusterIP"] == allocated else [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("sessionAffinity", "None")
    node_ports = {}
    for entry in status.get("nodePorts") or []:
        if isinstance(entry, dict):
            node_ports[(entry.get("port"), entry.get("protocol", "TCP"))] = entry.get("nodePort")
    ports = spec.get("ports")
    if isinstance(ports, list):
        for port in ports:
            if not isinstance(port, dict):
                continue
            port.setdefault("protocol", "TCP")
            if "port" in port:
                port.setdefault("targetPort", port["port"])
            found = node_ports.get((port.get("port"), port.get("protocol")))
            if found and not port.get("nodePort"):
                port["nodePort"] = found
    if spec.get("type") in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    shaped: dict[str, Any] = {"loadBalancer": status.get("loadBalancer") or {}}
    if "conditions" in status:
        shaped["conditions"] = status["conditions"]
    moved = ("clusterIP", "clusterIPs", "nodePorts", *SERVICE_STATUS_FIELDS)
    rest = {k: v for k, v in status.items() if k not in moved}
    if rest:
        extra = rest.pop("ciliary", None)
        shaped["ciliary"] = {**(extra if isinstance(extra, dict) else {}), **rest}
    obj["status"] = shaped


POD_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                  "PodScheduled")


def _pod(obj: dict[str, Any]) -> None:
    spec = _dict(obj, "spec")
    for key, value in (("restartPolicy", "Always"), ("dnsPolicy", "ClusterFirst"),
                       ("schedulerName", "default-scheduler"), ("serviceAccountName", "default"),
                       ("terminationGracePeriodSeconds", 30), ("enableServiceLinks", True),
                       ("preemptionPolicy", "PreemptLowerPriority"), ("priority", 0)):
        spec.setdefault(key, value)
    for container in spec.get("containers") or []:
        if isinstance(container, dict):
            container.setdefault("imagePullPolicy", "IfNotPresent")
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("resources", {})
            for port in container.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
    status = _dict(obj, "status")
    status.setdefault("phase", "Pending")
    if status.get("podIP") and not status.get("podIPs"):
        status["podIPs"] = [{"ip": status["podIP"]}]
    if status.get("hostIP") and not status.get("hostIPs"):
        status["hostIPs"] = [{"ip": status["hostIP"]}]
    status.setdefault("qosClass", _qos_class(spec))
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        conditions = []
    given = {c.get("type"): c for c in conditions if isinstance(c, dict)}
    ready = given.get("Ready", {}).get("status", "False")
    started = status.get("phase") in ("Running", "Succeeded", "Failed") or bool(status.get("podIP"))
    derived = {
        "PodReadyToStartContainers": "True" if started else "False",
        "Initialized": "True" if started else "False",
        "Ready": ready,
        "ContainersReady": ready,
        "PodScheduled": "True" if spec.get("nodeName") else "False",
    }
    out = []
    for kind in POD_CONDITIONS:
        cond = {"type": kind, "status": derived[kind], "lastProbeTime": None,
                "lastTransitionTime": status.get("startTime")
                or (obj.get("metadata") or {}).get("creationTimestamp")}
        cond.update({k: v for k, v in given.get(kind, {}).items() if k != "type"})
        out.append(cond)
    out += [c for c in conditions if isinstance(c, dict) and c.get("type") not in POD_CONDITIONS]
    status["conditions"] = out
    if "startTime" not in status and started:
        created = (obj.get("metadata") or {}).get("creationTimestamp")
        if created:
            status["startTime"] = created


def _qos_class(spec: dict[str, Any]) -> str:
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources if isinstance(r, dict)):
        return "BestEffort"
    guaranteed = all(
        isinstance(r, dict) and {"cpu", "memory"} <= set(r.get("limits") or {})
        and (r.get("requests") or r.get("limits")) == r.get("limits")
        for r in resources
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _node(obj: dict[str, Any]) -> None:
    spec = _dict(obj, "spec")
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(status, dict)
    cidr = status.get("podCIDR")
    if not spec.get("podCIDR") and isinstance(cidr, str) and cidr:
        spec["podCIDR"] = cidr
    if spec.get("podCIDR") and not spec.get("podCIDRs"):
        spec["podCIDRs"] = [spec["podCIDR"]]


def _namespace(obj: dict[str, Any]) -> None:
    meta = _dict(obj, "metadata")
    labels = meta.get("labels")
    if labels is None:
        labels = meta["labels"] = {}
    if isinstance(labels, dict) and isinstance(meta.get("name"), str):
        labels.setdefault("kubernetes.io/metadata.name", meta["name"])
    spec = _dict(obj, "spec")
    spec.setdefault("finalizers", ["kubernetes"])
    status = _dict(obj, "status")
    status.setdefault("phase", "Active")


_SHAPERS = {"Service": _service, "Pod": _pod, "Node": _node, "Namespace": _namespace}
