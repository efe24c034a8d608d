"""Recorded API objects, as ``kubectl get -o json`` shows them, for the API-server double."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DIR = Path(__file__).parent / "fixtures"
NAMES = ("namespace", "node", "pod", "service", "endpointslice", "networkpolicy", "cnp", "ccnp")


def load(name: str) -> dict[str, Any]:
    return json.loads((DIR / f"{name}.json").read_text())


def all_objects() -> list[dict[str, Any]]:
    return [load(name) for name in NAMES]


def variant(obj: dict[str, Any], name: str, **labels: str) -> dict[str, Any]:
    """A copy of ``obj`` under another name (server fields dropped, labels added)."""
    out = copy.deepcopy(obj)
    meta = out["metadata"]
    meta["name"] = name
    for key in ("uid", "resourceVersion", "creationTimestamp", "generateName", "ownerReferences"):
        meta.pop(key, None)
    if labels:
        meta["labels"] = {**meta.get("labels", {}), **labels}
    return out
