"""Identity-relevant labels: which of a pod's labels decide its security identity.

Pure code (no I/O). Follows Cilium's ``pkg/labelsfilter`` and ``k8s.SanitizePodLabels``:

- A pod's identity labels are its own labels with source ``k8s`` (minus any key starting
  with ``io.cilium.k8s``, which only Cilium may set), plus the injected labels
  ``io.kubernetes.pod.namespace=<ns>``, ``io.cilium.k8s.namespace.labels.<k>=<v>`` for each
  namespace label, ``io.cilium.k8s.policy.serviceaccount=<sa>`` and
  ``io.cilium.k8s.policy.cluster=<cluster>``.
- A label pattern is ``[source:][!]regex``; the regex is anchored at the start of the key
  and matches keys only. ``!`` makes it an exclusion. Source ``""``/``any`` matches every
  source.
- A label is kept when (no user inclusion pattern is configured and no exclusion matches)
  or the longest matching inclusion is longer than the shortest matching exclusion. Once a
  user adds an inclusion pattern, labels no inclusion matches are excluded.
- ``explain`` reports, for every input label, kept/excluded and the deciding pattern; the
  kept set it implies is exactly ``LabelFilter.identity_labels``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_ANY = "any"

CILIUM_LABEL_PREFIX = "io.cilium.k8s"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# Cilium's default label prefix configuration (pkg/labelsfilter defaultLabelPrefixCfg plus
# the controller-uid exclusions listed in "Limiting Identity-Relevant Labels"), in order.
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"reserved:.*",
    r"io\.kubernetes\.pod\.namespace",
    r"io\.cilium\.k8s\.namespace\.labels",
    r"app\.kubernetes\.io",
    r"io\.cilium\.k8s\.policy\.cluster",
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    r"!statefulset\.kubernetes\.io/pod-name",
    r"!apps\.kubernetes\.io/pod-index",
    r"!batch\.kubernetes\.io/job-completion-index",
    r"!batch\.kubernetes\.io/controller-uid",
    r"!.*beta\.kubernetes\.io",
    r"!k8s\.io",
    r"!pod-template-generation",
    r"!pod-template-hash",
    r"!controller-revision-hash",
    r"!annotation.*",
    r"!controller-uid",
    r"!etcd_node",
)


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"

    @classmethod
    def parse(cls, text: str) -> Label:
        """``source:key=value`` (source defaults to ``k8s``, value to ``""``)."""
        source, key = SOURCE_K8S, text
        head, sep, rest = text.partition(":")
        if sep and "=" not in head and "/" not in head:
            source, key = head, rest
        key, _, value = key.partition("=")
        return cls(source, key, value)


class PatternError(ValueError):
    """A label pattern that does not parse or compile."""


@dataclass(frozen=True)
class LabelPattern:
    text: str  # as configured, e.g. ``k8s:!job-name``
    source: str  # "" matches every source
    regex: re.Pattern[str]
    ignore: bool
    default: bool = False

    @classmethod
    def parse(cls, text: str, *, default: bool = False) -> LabelPattern:
        source, sep, prefix = text.partition(":")
        if not sep:
            source, prefix = "", text
        if source == SOURCE_ANY:
            source = ""
        ignore = prefix.startswith("!")
        if ignore:
            prefix = prefix[1:]
        if not prefix:
            raise PatternError(f"label pattern {text!r}: empty prefix")
        try:
            regex = re.compile(prefix)
        except re.error as err:
            raise PatternError(f"label pattern {text!r}: {err}") from err
        return cls(text, source, regex, ignore, default)

    def match_length(self, label: Label) -> int:
        """Length of the match anchored at the start of the key, or -1 for no match."""
        if self.source and self.source != label.source:
            return -1
        m = self.regex.match(label.key)
        return -1 if m is None else m.end()


@dataclass(frozen=True)
class Verdict:
    label: Label
    origin: str  # "pod" | "namespace" | "injected"
    kept: bool
    rule: str
    reason: str


@dataclass
class LabelFilter:
    """Cilium's label prefix configuration: defaults plus user patterns."""

    patterns: list[LabelPattern] = field(default_factory=list)
    whitelist: bool = False  # a user inclusion pattern exists
    _memo: dict[tuple[str, str], tuple[bool, str, str]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, extra: Iterable[str] = ()) -> LabelFilter:
        """Defaults plus ``extra`` (Cilium ``labels`` option syntax, one pattern each)."""
        flt = cls([LabelPattern.parse(p, default=True) for p in DEFAULT_PATTERNS])
        for text in extra:
            if not text.strip():
                continue
            pattern = LabelPattern.parse(text.strip())
            flt.patterns.append(pattern)
            if not pattern.ignore:
                flt.whitelist = True
        flt._memo.clear()
        return flt

    @classmethod
    def from_string(cls, config: str) -> LabelFilter:
        """From a space-separated pattern list, as in ``CILIARY_IDENTITY_LABELS``."""
        return cls.from_config(config.split())

    def decide(self, label: Label) -> tuple[bool, str, str]:
        """``(kept, deciding pattern, reason)`` for one label (patterns match the source and
        key only, so the decision is remembered per source and key)."""
        memo_key = (label.source, label.key)
        found = self._memo.get(memo_key)
        if found is None:
            if len(self._memo) > 100_000:
                self._memo.clear()
            found = self._memo[memo_key] = self._decide(label)
        return found

    def _decide(self, label: Label) -> tuple[bool, str, str]:
        included, include_rule = 0, None
        ignored, ignore_rule = 0, None
        for p in self.patterns:
            n = p.match_length(label)
            if n <= 0:  # as in Cilium, an empty match neither includes nor excludes
                continue
            if p.ignore:
                if ignore_rule is None or n < ignored:
                    ignored, ignore_rule = n, p
            elif include_rule is None or n > included:
                included, include_rule = n, p
        if ignore_rule is None and include_rule is None:
            if self.whitelist:
                return False, "", "inclusion patterns are configured and none matches"
            return True, "", "no pattern matches; labels are identity-relevant by default"
        if ignore_rule is None:
            assert include_rule is not None
            return True, include_rule.text, f"included by {_kind(include_rule)} pattern"
        if include_rule is not None and included > ignored:
            return True, include_rule.text, (
                f"included by {_kind(include_rule)} pattern, whose match ({included} chars) "
                f"outranks exclusion {ignore_rule.text!s} ({ignored} chars)"
            )
        return False, ignore_rule.text, f"excluded by {_kind(ignore_rule)} pattern"

    def keeps(self, label: Label) -> bool:
        return self.decide(label)[0]


def _kind(p: LabelPattern) -> str:
    return "default" if p.default else "configured"


# ---------------------------------------------------------------- building a pod's labels


def pod_identity_input(
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    service_account: str,
    cluster: str,
) -> list[tuple[Label, str, str]]:
    """Every candidate label of a pod as ``(label, origin, note)``.

    ``note`` is non-empty for pod labels that are dropped before filtering
    (``io.cilium.k8s.*`` keys a user may not set).
    """
    out: list[tuple[Label, str, str]] = []
    injected_keys = {POD_NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL, CLUSTER_LABEL}
    for key, value in sorted(pod_labels.items()):
        note = ""
        if key.startswith(CILIUM_LABEL_PREFIX) or key in injected_keys:
            note = f"{key} is set by ciliary itself; the pod's own value is ignored"
        out.append((Label(SOURCE_K8S, key, str(value)), "pod", note))
    ns_labels = dict(namespace_labels)
    ns_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)  # the API server always sets it
    for key, value in sorted(ns_labels.items()):
        out.append((Label(SOURCE_K8S, f"{NAMESPACE_LABELS_PREFIX}.{key}", str(value)), "namespace", ""))
    out.append((Label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace), "injected", ""))
    if service_account:
        out.append((Label(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, service_account), "injected", ""))
    out.append((Label(SOURCE_K8S, CLUSTER_LABEL, cluster), "injected", ""))
    return out


def explain(
    flt: LabelFilter,
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    service_account: str,
    cluster: str,
) -> list[Verdict]:
    """Kept/excluded and why, for every candidate label of a pod."""
    verdicts = []
    for label, origin, note in pod_identity_input(
        pod_labels, namespace, namespace_labels, service_account, cluster
    ):
        if note:
            verdicts.append(Verdict(label, origin, False, "sanitize", note))
            continue
        kept, rule, reason = flt.decide(label)
        verdicts.append(Verdict(label, origin, kept, rule, reason))
    return verdicts


def identity_labels(
    flt: LabelFilter,
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    service_account: str,
    cluster: str,
) -> tuple[str, ...]:
    """The sorted identity label set (``source:key=value`` strings) of a pod: the labels
    ``explain`` keeps."""
    return tuple(sorted(
        str(label)
        for label, _origin, note in pod_identity_input(
            pod_labels, namespace, namespace_labels, service_account, cluster)
        if not note and flt.decide(label)[0]
    ))


def label_set_hash(labels: Iterable[str]) -> str:
    """Stable key of a label set: sha256 over the sorted labels, one per line."""
    return hashlib.sha256("\n".join(sorted(labels)).encode()).hexdigest()


def cidr_labels(prefix: str) -> tuple[str, ...]:
    """Identity labels of a policy CIDR (as Cilium: the prefix plus ``reserved:world``)."""
    return tuple(sorted((f"{SOURCE_CIDR}:{prefix}", f"{SOURCE_RESERVED}:world")))
