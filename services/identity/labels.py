"""Identity-relevant labels for the identity service: the shared definitions of
``ciliary.identitylabels`` (label patterns, Cilium's default filter, a pod's identity
labels), under the names the service and its tests use.

Invariant: nothing is defined here; the CLI (``ciliary preflight``) and this service
decide identities with the same code.
"""

from __future__ import annotations

from ciliary.identitylabels import (
    CILIUM_LABEL_PREFIX,
    CLUSTER_LABEL,
    DEFAULT_PATTERNS,
    NAMESPACE_LABELS_PREFIX,
    NAMESPACE_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
    SOURCE_ANY,
    SOURCE_CIDR,
    SOURCE_K8S,
    SOURCE_RESERVED,
    Label,
    LabelFilter,
    LabelPattern,
    PatternError,
    Verdict,
    cidr_labels,
    explain,
    identity_labels,
    label_set_hash,
    pod_identity_input,
)

__all__ = [
    "CILIUM_LABEL_PREFIX", "CLUSTER_LABEL", "DEFAULT_PATTERNS", "NAMESPACE_LABELS_PREFIX",
    "NAMESPACE_NAME_LABEL", "POD_NAMESPACE_LABEL", "SERVICE_ACCOUNT_LABEL", "SOURCE_ANY",
    "SOURCE_CIDR", "SOURCE_K8S", "SOURCE_RESERVED", "Label", "LabelFilter", "LabelPattern",
    "PatternError", "Verdict", "cidr_labels", "explain", "identity_labels", "label_set_hash",
    "pod_identity_input",
]
