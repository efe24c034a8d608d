"""CustomResourceDefinitions of the policy kinds, generated from the structs that decode them.

Invariants:
- The ``openAPIV3Schema`` of CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy
  (``cilium.io/v2``) is derived from ``ciliary.resources.cilium`` — the same structs
  ``ciliary apply`` and the kube bridge validate with — so the API server and ciliary
  accept the same fields. The schema is structural (Kubernetes' rules): every ``$ref``
  inlined, ``nullable`` instead of a null alternative, ``x-kubernetes-int-or-string``
  for number-or-name fields, opaque maps marked ``x-kubernetes-preserve-unknown-fields``.
- ``json_schema`` turns a CRD schema back into plain JSON Schema, so tests validate
  custom resources against exactly what the API server would.
- Pure: no I/O.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from ciliary.resources import cilium

GROUP = "cilium.io"
VERSION = "v2"

_DROP = ("title", "default", "$ref", "$defs")


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        types = sorted(o.get("type", "") for o in options)
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if types == ["integer", "string"]:
            out = {**_structural(rest, defs), "x-kubernetes-int-or-string": True}
        elif len(options) == 1:
            out = _structural({**rest, **options[0]}, defs)
        else:
            raise ValueError(f"no structural form for anyOf {types}")
        if nullable:
            out["nullable"] = True
        return out
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if (key == "additionalProperties" and value is False) or (key == "required" and not value):
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "description" in out:
        out["description"] = out["description"].replace("``", "").replace("`", "")
    return out


def policy_schema(kind: type) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of one policy kind."""
    generated = msgspec.json.schema(kind)
    defs = generated["$defs"]
    rule = _structural({"$ref": "#/$defs/Rule"}, defs)
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": rule,
            "specs": {"type": "array", "items": copy.deepcopy(rule)},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


def _crd(kind: str, plural: str, singular: str, short: list[str], scope: str) -> dict[str, Any]:
    struct = getattr(cilium, kind)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "ciliary"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": singular, "shortNames": short, "categories": ["cilium", "ciliumpolicy"]},
            "scope": scope,
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": policy_schema(struct)},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }


def policy_crds() -> list[dict[str, Any]]:
    return [
        _crd("CiliumNetworkPolicy", "ciliumnetworkpolicies", "ciliumnetworkpolicy", ["cnp", "ciliumnp"], "Namespaced"),
        _crd("CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies",
             "ciliumclusterwidenetworkpolicy", ["ccnp"], "Cluster"),
    ]


def json_schema(structural: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON Schema (draft 7) accepting what the API server accepts for ``structural``:
    unknown fields are pruned there, so they are allowed here."""
    if isinstance(structural, list):
        return [json_schema(s) for s in structural]  # type: ignore[return-value]
    if not isinstance(structural, dict):
        return structural
    out = {k: json_schema(v) for k, v in structural.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if structural.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if structural.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out
