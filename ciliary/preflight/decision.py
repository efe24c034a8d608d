"""The seed's four migration questions and its decision tree, from preflight's findings.

Pure. The questions, in order:
1. ``kernel``: can our kernels and images support the features? ``no`` when a core feature
   (policy, per-packet service LB, flows) is missing on the probed kernel, ``unknown`` when
   one could not be probed (or the kernel was not probed: ``features`` is None), else ``yes`` (degraded or missing optional features are named).
2. ``upgrade_cost``: can we accept the one-time upgrade cost? The cost is stated: kernel
   or package changes (what brings each missing check), map settings to raise with the
   memory they add, maps a live node already fills. ``no`` when it includes a kernel or
   image change (question 1 is ``no``) or the scale passes a limit no setting raises.
3. ``labels``: is our label design clean enough for identities? ``no`` when the label
   hygiene fails (over the identity ceiling, or labels that multiply identities),
   ``unknown`` without a pod list or when none of its pods gets an identity, else ``yes``.
4. ``operations``: can our operations troubleshoot with flows, maps and identities?
   ``no`` when an operations check failed, ``unknown`` when none ran (no instance), else
   ``yes``; checks that did not run are named.

Decision tree (first match): question 1 or 2 ``no`` -> upgrade the baseline first;
question 3 ``no`` -> govern labels first; question 4 ``no`` -> train first; else pilot. The
verdict's reasons are the deciding question's; a pilot also lists what was not verified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ciliary import mappressure
from ciliary.preflight import kernel, labels, sizing

YES, NO, UNKNOWN = "yes", "no", "unknown"
PASS, FAIL, NOT_RUN = "pass", "fail", "not run"

UPGRADE_BASELINE = "upgrade-baseline-first"
GOVERN_LABELS = "govern-labels-first"
TRAIN = "train-first"
PILOT = "pilot"
VERDICTS: dict[str, str] = {
    UPGRADE_BASELINE: "upgrade the baseline first",
    GOVERN_LABELS: "govern labels first",
    TRAIN: "train first",
    PILOT: "pilot",
}
QUESTIONS: dict[str, str] = {
    "kernel": "can our kernels and images support the features?",
    "upgrade_cost": "can we accept the one-time upgrade cost?",
    "labels": "is our label design clean enough for identities?",
    "operations": "can our operations troubleshoot with flows, maps and identities?",
}


@dataclass(frozen=True)
class OpsCheck:
    name: str
    status: str  # PASS | FAIL | NOT_RUN
    detail: str = ""


@dataclass
class Answer:
    question: str
    answer: str  # YES | NO | UNKNOWN
    reasons: list[str] = field(default_factory=list)


@dataclass
class Decision:
    verdict: str
    answers: dict[str, Answer]
    reasons: list[str]

    @property
    def title(self) -> str:
        return VERDICTS[self.verdict]


def _topic(answer: Answer) -> str:
    return answer.question.replace("_", " ")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def answer_kernel(features: Sequence[kernel.FeatureVerdict] | None) -> Answer:
    if features is None:
        return Answer("kernel", UNKNOWN, ["the kernel was not probed"])
    core = [f for f in features if f.core]
    missing = [f for f in core if f.status == kernel.MISSING]
    unknown = [f for f in core if f.status == kernel.UNKNOWN]
    reasons = []
    for f in features:
        if f.status in (kernel.MISSING, kernel.UNKNOWN, kernel.DEGRADED):
            first = f.reasons[0] if f.reasons else ""
            more = f" (+{len(f.reasons) - 1} more)" if len(f.reasons) > 1 else ""
            reasons.append(f"{f.name} {f.status}: {first}{more}")
    optional_missing = [f.name for f in features if not f.core and f.status == kernel.MISSING]
    if "socket_lb" in optional_missing:
        reasons.append("without socket LB, set CILIARY_SOCKET_LB=off: services are balanced per packet")
    answer = NO if missing else UNKNOWN if unknown else YES
    if not reasons:
        reasons.append("every feature ciliary builds is available")
    return Answer("kernel", answer, reasons)


def answer_upgrade_cost(kernel_answer: Answer, checks: Sequence[kernel.CheckResult],
                        sizing_report: sizing.SizingReport | None,
                        live: Sequence[mappressure.MapFill] = ()) -> Answer:
    reasons: list[str] = []
    for result in checks:
        if result.status in (kernel.MISSING, kernel.DEGRADED) and result.name in kernel.CHECKS_BY_NAME:
            reasons.append(f"{result.name}: {kernel.CHECKS_BY_NAME[result.name].brings}")
    limits = list(sizing_report.limits) if sizing_report else []
    reasons += [f"limit: {text}" for text in limits]
    if sizing_report and sizing_report.settings:
        settings = " ".join(f"{k}={v}" for k, v in sorted(sizing_report.settings.items()))
        reasons.append(f"map settings: {settings} ({_mib(sizing_report.memory)} -> "
                       f"{_mib(sizing_report.memory_suggested)} of map memory per node)")
    elif sizing_report:
        reasons.append(f"maps fit their default sizes ({_mib(sizing_report.memory)} of map memory per node)")
    for fill in live:
        if fill.band != mappressure.OK:
            spec = sizing.MAPS_BY_NAME.get(fill.map)
            reasons.append(f"live map pressure {mappressure.alert_line(fill, spec.setting if spec else '')}")
    answer = NO if kernel_answer.answer == NO or limits else YES
    return Answer("upgrade_cost", answer, reasons)


def answer_labels(hygiene: labels.LabelHygiene | None) -> Answer:
    if hygiene is None:
        return Answer("labels", UNKNOWN, ["no pod list: give --pods FILE (kubectl get pods -A -o json) "
                                          "or run against an instance"])
    if hygiene.endpoints == 0:
        return Answer("labels", UNKNOWN, ["the pod list has no pods that get an identity"])
    reasons = list(hygiene.reasons)
    if hygiene.suggested_patterns:
        reasons.append("suggested filter: CILIARY_IDENTITY_LABELS=\"" + " ".join(hygiene.suggested_patterns) + "\"")
    if not reasons:
        reasons.append(f"{hygiene.identities:,} identities from {hygiene.endpoints:,} endpoints, "
                       f"ceiling {hygiene.ceiling.per_cluster:,}")
    return Answer("labels", NO if hygiene.status == labels.FAIL else YES, reasons)


def answer_operations(checks: Sequence[OpsCheck] | None) -> Answer:
    if not checks or all(c.status == NOT_RUN for c in checks):
        why = [f"{c.name}: {c.detail}" for c in checks or ()] or ["no running instance to check"]
        return Answer("operations", UNKNOWN, why)
    failed = [c for c in checks if c.status == FAIL]
    reasons = [f"{c.name} {c.status}: {c.detail}" if c.detail else f"{c.name} {c.status}"
               for c in checks if c.status != PASS]
    return Answer("operations", NO if failed else YES, reasons)


def decide(features: Sequence[kernel.FeatureVerdict] | None, checks: Sequence[kernel.CheckResult],
           hygiene: labels.LabelHygiene | None, sizing_report: sizing.SizingReport | None,
           operations: Sequence[OpsCheck] | None, live: Sequence[mappressure.MapFill] = ()) -> Decision:
    q_kernel = answer_kernel(features)
    answers = {
        "kernel": q_kernel,
        "upgrade_cost": answer_upgrade_cost(q_kernel, checks, sizing_report, live),
        "labels": answer_labels(hygiene),
        "operations": answer_operations(operations),
    }
    if q_kernel.answer == NO or answers["upgrade_cost"].answer == NO:
        deciding = [a for a in (q_kernel, answers["upgrade_cost"]) if a.answer == NO]
        verdict = UPGRADE_BASELINE
    elif answers["labels"].answer == NO:
        deciding, verdict = [answers["labels"]], GOVERN_LABELS
    elif answers["operations"].answer == NO:
        deciding, verdict = [answers["operations"]], TRAIN
    else:
        deciding, verdict = [], PILOT
    if deciding:
        reasons = [r for a in deciding for r in a.reasons]
    else:
        reasons = [f"{_topic(a)}: {a.answer}" + (f" ({a.reasons[0]})" if a.reasons else "")
                   for a in answers.values() if a.answer == YES]
        reasons += [f"not verified: {_topic(a)} ({'; '.join(a.reasons) or 'no data'})"
                    for a in answers.values() if a.answer == UNKNOWN]
    return Decision(verdict, answers, reasons)
