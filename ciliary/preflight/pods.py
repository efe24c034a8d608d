"""A pod list (``kubectl get pods -A -o json``, or ``kubectl get pods,namespaces -A -o
json`` for namespace labels too) as the facts preflight needs.

Pure. Text is decoded and validated by ``ciliary.resources`` (the decoder ``ciliary
apply`` uses), so a malformed list fails with a ``ManifestError`` whose every problem names
the item (``document 0: item 3``) and the field (``metadata.labels[app]``).

Invariants:
- Input is a ``List`` (``kind: List``/``PodList`` with ``items``), a bare JSON array of
  objects (read as a ``List``), or single Pod documents. Pods and Namespaces are used;
  objects of other kinds are counted in ``skipped`` and otherwise ignored.
- A pod is an endpoint (gets an identity) unless it runs in the host network or has
  finished (phase ``Succeeded``/``Failed``): the identity service's rule.
- ``service_account`` defaults to ``default``, the namespace to ``default``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliary.resources import Resource, loads

FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PodFacts:
    namespace: str
    name: str
    node: str  # "" when not scheduled
    labels: Mapping[str, str]
    service_account: str
    endpoint: bool  # gets an identity


@dataclass
class PodList:
    pods: list[PodFacts] = field(default_factory=list)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> objects ignored

    @property
    def endpoints(self) -> list[PodFacts]:
        return [p for p in self.pods if p.endpoint]

    def per_node(self) -> dict[str, int]:
        """Endpoints per scheduled node."""
        return dict(Counter(p.node for p in self.endpoints if p.node))


def as_list_text(text: str) -> str:
    """A bare JSON array becomes a ``List`` document, so its items are numbered like one."""
    if text.lstrip().startswith("["):
        return '{"apiVersion": "v1", "kind": "List", "items": ' + text + "}"
    return text


def pod_facts(manifest: Mapping[str, Any]) -> PodFacts:
    """The facts of one (validated) Pod manifest."""
    meta = manifest.get("metadata") or {}
    spec = manifest.get("spec") or {}
    status = manifest.get("status") or {}
    endpoint = not spec.get("hostNetwork") and status.get("phase") not in FINISHED_PHASES
    return PodFacts(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        node=str(spec.get("nodeName") or ""),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        endpoint=bool(endpoint),
    )


def from_manifests(manifests: Iterable[tuple[str, Mapping[str, Any]]]) -> PodList:
    """``(kind, manifest)`` pairs (validated) to a ``PodList``."""
    out = PodList()
    for kind, manifest in manifests:
        if kind == "Pod":
            out.pods.append(pod_facts(manifest))
        elif kind == "Namespace":
            meta = manifest.get("metadata") or {}
            out.namespace_labels[str(meta.get("name") or "")] = {
                str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        else:
            out.skipped[kind] = out.skipped.get(kind, 0) + 1
    return out


def from_resources(resources: Iterable[Resource]) -> PodList:
    return from_manifests((r.kind, r.manifest) for r in resources)


def parse_pod_list(text: str, source: str = "<stdin>") -> PodList:
    """Pods and namespaces from a pod list's text; raises ``ManifestError``."""
    return from_resources(loads(as_list_text(text), source))
