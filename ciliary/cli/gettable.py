"""``ciliary get`` tables with the columns ``kubectl get`` prints, plain and ``-o wide``.

Invariants:
- Input is objects as an API server shows them (``ciliary.kubeshape.shape``); each kind
  has kubectl's columns in kubectl's order, ``-o wide`` adds kubectl's wide columns; with
  ``-A`` a NAMESPACE column comes first; AGE is where kubectl puts it.
- Cell values follow kubectl's printers: ``<none>`` / ``<pending>`` / ``<unset>`` /
  ``<unknown>`` where kubectl prints them, a Pod's READY as ready/total containers,
  a Service's PORT(S) as ``port[:nodePort]/proto`` joined by commas, selectors as
  ``k=v`` joined by commas in key order.
- Kinds without kubectl columns of their own show NAME and AGE.
- Layout is kubectl's tabwriter (minimum cell width 6, padding 3, the last column
  unpadded); AGE is kubectl's ``HumanDuration`` (``90s``, ``5m12s``, ``3h20m``, ``4d2h``).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from typing import Any

Cell = Callable[[dict[str, Any]], Any]


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _status(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _labels_text(labels: Any) -> str:
    if not isinstance(labels, dict) or not labels:
        return "<none>"
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _label_selector_text(selector: Any) -> str:
    """``metav1.FormatLabelSelector``: matchLabels then expressions; ``<none>`` if empty."""
    if not isinstance(selector, dict):
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        if not isinstance(expr, dict):
            continue
        op, key, values = expr.get("operator"), expr.get("key"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts) or "<none>"


# ---------------------------------------------------------------- Pod


def _pod_ready(obj: dict[str, Any]) -> str:
    total = len(_spec(obj).get("containers") or [])
    ready = sum(1 for c in _status(obj).get("containerStatuses") or []
                if isinstance(c, dict) and c.get("ready"))
    return f"{ready}/{total}"


def _pod_status(obj: dict[str, Any]) -> str:
    status = _status(obj)
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    for c in status.get("containerStatuses") or []:
        state = (c.get("state") or {}) if isinstance(c, dict) else {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason"):
            return str(waiting["reason"])
        terminated = state.get("terminated") or {}
        if terminated.get("reason") and status.get("phase") not in ("Succeeded",):
            return str(terminated["reason"])
    return str(status.get("reason") or status.get("phase") or "Pending")


def _pod_restarts(obj: dict[str, Any]) -> str:
    return str(sum(int(c.get("restartCount") or 0)
                   for c in _status(obj).get("containerStatuses") or [] if isinstance(c, dict)))


def _readiness_gates(obj: dict[str, Any]) -> str:
    gates = _spec(obj).get("readinessGates") or []
    if not gates:
        return "<none>"
    conds = {c.get("type"): c.get("status") for c in _status(obj).get("conditions") or []}
    ready = sum(1 for g in gates if conds.get(g.get("conditionType")) == "True")
    return f"{ready}/{len(gates)}"


# ---------------------------------------------------------------- Service


def _service_external_ip(obj: dict[str, Any]) -> str:
    spec, status = _spec(obj), _status(obj)
    kind = spec.get("type", "ClusterIP")
    external = list(spec.get("externalIPs") or [])
    if kind == "ExternalName":
        return str(spec.get("externalName") or "<none>")
    if kind == "LoadBalancer":
        ingress = [i.get("ip") or i.get("hostname") for i in
                   (status.get("loadBalancer") or {}).get("ingress") or [] if isinstance(i, dict)]
        found = [x for x in ingress if x] + external
        return ",".join(found) if found else "<pending>"
    return ",".join(external) if external else "<none>"


def _service_ports(obj: dict[str, Any]) -> str:
    out = []
    for p in _spec(obj).get("ports") or []:
        if not isinstance(p, dict):
            continue
        node_port = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p.get('port')}{node_port}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


# ---------------------------------------------------------------- Node


def _node_status(obj: dict[str, Any]) -> str:
    conds = {c.get("type"): c.get("status") for c in _status(obj).get("conditions") or []
             if isinstance(c, dict)}
    ready = {"True": "Ready", "False": "NotReady"}.get(conds.get("Ready") or "", "Unknown")
    return ready + (",SchedulingDisabled" if _spec(obj).get("unschedulable") else "")


def _node_roles(obj: dict[str, Any]) -> str:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    roles = sorted({k.split("/", 1)[1] for k in labels
                    if k.startswith("node-role.kubernetes.io/") and "/" in k and k.split("/", 1)[1]})
    return ",".join(roles) or "<none>"


def _node_address(kind: str, missing: str) -> Cell:
    def cell(obj: dict[str, Any]) -> str:
        found = [a.get("address") for a in _status(obj).get("addresses") or []
                 if isinstance(a, dict) and a.get("type") == kind]
        return ",".join(str(a) for a in found if a) or missing
    return cell


def _node_info(key: str) -> Cell:
    return lambda obj: (_status(obj).get("nodeInfo") or {}).get(key) or "<unknown>"


# ---------------------------------------------------------------- EndpointSlice


def _slice_ports(obj: dict[str, Any]) -> str:
    ports = [p for p in obj.get("ports") or [] if isinstance(p, dict)]
    if not ports:
        return "<unset>"
    return ",".join(str(p.get("port")) if p.get("port") is not None else "<unset>"
                    for p in ports)


def _slice_endpoints(obj: dict[str, Any]) -> str:
    addrs = [a for e in obj.get("endpoints") or [] if isinstance(e, dict)
             for a in e.get("addresses") or []]
    if not addrs:
        return "<unset>"
    shown = ",".join(addrs[:3])
    return shown + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")


# kind -> (columns after NAME, before AGE), (columns after AGE), (wide columns at the end)
Column = tuple[str, Cell]
KUBECTL_COLUMNS: dict[str, tuple[list[Column], list[Column], list[Column]]] = {
    "Pod": (
        [("READY", _pod_ready), ("STATUS", _pod_status), ("RESTARTS", _pod_restarts)],
        [],
        [("IP", lambda o: _status(o).get("podIP") or "<none>"),
         ("NODE", lambda o: _spec(o).get("nodeName") or "<none>"),
         ("NOMINATED NODE", lambda o: _status(o).get("nominatedNodeName") or "<none>"),
         ("READINESS GATES", _readiness_gates)],
    ),
    "Service": (
        [("TYPE", lambda o: _spec(o).get("type", "ClusterIP")),
         ("CLUSTER-IP", lambda o: _spec(o).get("clusterIP") or "<none>"),
         ("EXTERNAL-IP", _service_external_ip),
         ("PORT(S)", _service_ports)],
        [],
        [("SELECTOR", lambda o: _labels_text(_spec(o).get("selector")))],
    ),
    "Node": (
        [("STATUS", _node_status), ("ROLES", _node_roles)],
        [("VERSION", lambda o: (_status(o).get("nodeInfo") or {}).get("kubeletVersion", ""))],
        [("INTERNAL-IP", _node_address("InternalIP", "<none>")),
         ("EXTERNAL-IP", _node_address("ExternalIP", "<none>")),
         ("OS-IMAGE", _node_info("osImage")),
         ("KERNEL-VERSION", _node_info("kernelVersion")),
         ("CONTAINER-RUNTIME", _node_info("containerRuntimeVersion"))],
    ),
    "Namespace": ([("STATUS", lambda o: _status(o).get("phase", "Active"))], [], []),
    "EndpointSlice": (
        [("ADDRESSTYPE", lambda o: o.get("addressType", "")), ("PORTS", _slice_ports),
         ("ENDPOINTS", _slice_endpoints)],
        [],
        [],
    ),
    "NetworkPolicy": (
        [("POD-SELECTOR", lambda o: _label_selector_text(_spec(o).get("podSelector")))], [], []),
}


def render(kind: str, objects: list[dict[str, Any]], *, show_namespace: bool,
           wide: bool = False, now: float | None = None) -> str:
    """The table ``kubectl get`` prints for ``objects`` (all of ``kind``, shaped);
    ``now`` (Unix time) is when ages are counted to."""
    when = time.time() if now is None else now
    before, after, extra = KUBECTL_COLUMNS.get(kind, ([], [], []))
    columns = before + [("AGE", lambda o: _age(o, when))] + after + (extra if wide else [])
    headers = (["NAMESPACE"] if show_namespace else []) + ["NAME"] + [h for h, _ in columns]
    rows = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        rows.append([*([meta.get("namespace", "")] if show_namespace else []),
                     meta.get("name", ""), *(cell(obj) for _, cell in columns)])
    return tabwriter(headers, rows)


MIN_WIDTH = 6
PADDING = 3


def tabwriter(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Go's ``tabwriter.NewWriter(out, 6, 4, 3, ' ', 0)`` as kubectl sets it up."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(MIN_WIDTH, max(len(row[i]) for row in cells) + PADDING)
              for i in range(len(headers) - 1)]
    return "\n".join("".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + row[-1]
                     for row in cells)


def _age(obj: dict[str, Any], now: float) -> str:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp", "")
    try:
        then = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (ValueError, TypeError):
        return "<unknown>"
    return human_duration(now - then)


def human_duration(seconds_float: float) -> str:
    """kubectl's ``duration.HumanDuration``."""
    seconds = int(seconds_float)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = seconds // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"
