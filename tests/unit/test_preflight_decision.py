"""Feature verdicts from kernel checks, and every branch of the migration decision tree."""

from __future__ import annotations

from ciliary import mappressure
from ciliary.preflight import decision as D
from ciliary.preflight import kernel as K
from ciliary.preflight import labels, pods, sizing


def results(**overrides: tuple[str, str]) -> dict[str, K.CheckResult]:
    """Every check ok, except ``name=(status, detail)``."""
    out = {c.name: K.CheckResult(c.name, K.OK) for c in K.CHECKS}
    for name, (status, detail) in overrides.items():
        out[name] = K.CheckResult(name, status, detail)
    return out


def verdicts(**overrides: tuple[str, str]) -> dict[str, K.FeatureVerdict]:
    return {v.name: v for v in K.feature_verdicts(results(**overrides))}


# ---------------------------------------------------------------- features


def test_every_feature_ciliary_builds_is_available_when_every_check_is_ok() -> None:
    v = verdicts()
    assert {n: f.status for n, f in v.items()} == {
        "policy": K.AVAILABLE, "service_lb": K.AVAILABLE, "maglev": K.AVAILABLE, "flows": K.AVAILABLE,
        "fqdn": K.AVAILABLE, "socket_lb": K.AVAILABLE, "encryption": K.NOT_BUILT}
    assert "not built" in v["encryption"].reasons[0]
    assert {n for n, f in v.items() if f.core} == {"policy", "service_lb", "flows"}


def test_a_missing_ring_buffer_takes_the_whole_tc_datapath_and_names_the_kernel() -> None:
    v = verdicts(map_ringbuf=(K.MISSING, "map create (type 27): Invalid argument"))
    assert all(v[n].status == K.MISSING for n in ("policy", "service_lb", "maglev", "flows", "fqdn", "socket_lb"))
    assert v["flows"].reasons == ("map_ringbuf missing: map create (type 27): Invalid argument; brought by Linux 5.8",)


def test_socket_lb_alone_goes_missing_with_its_hook() -> None:
    v = verdicts(attach_cgroup_getpeername4=(K.MISSING, "attach: Invalid argument"))
    assert v["socket_lb"].status == K.MISSING and v["policy"].status == K.AVAILABLE
    assert "Linux 5.8" in v["socket_lb"].reasons[0]


def test_degraded_and_unknown() -> None:
    v = verdicts(jit=(K.DEGRADED, "net.core.bpf_jit_enable=0"))
    assert v["policy"].status == K.DEGRADED and "bpf_jit_enable" in v["policy"].reasons[0]
    v = verdicts(cgroup2=(K.DEGRADED, "not mounted"))
    assert v["socket_lb"].status == K.DEGRADED and v["policy"].status == K.AVAILABLE
    not_root = {name: (K.UNKNOWN, "not permitted: run ciliary preflight as root")
                for name in ("bpf_syscall", "map_hash", "map_lru_hash", "prog_sched_cls", "bpffs")}
    v = verdicts(**not_root)
    assert v["policy"].status == K.UNKNOWN
    assert v["policy"].reasons == ("bpf_syscall, bpffs, map_hash and 2 more unknown: "
                                   "not permitted: run ciliary preflight as root",)
    # missing beats unknown; a check with no result is unknown
    v = verdicts(bpf_syscall=(K.UNKNOWN, "x"), bpffs=(K.MISSING, "not mounted at /sys/fs/bpf"))
    assert v["policy"].status == K.MISSING
    partial = {name: r for name, r in results().items() if name != "attach_tc_clsact"}
    assert K.feature_verdict(K.FEATURES_BY_NAME["policy"], partial).reasons == ("attach_tc_clsact unknown: not probed",)


# ---------------------------------------------------------------- the decision tree


def clean_labels() -> labels.LabelHygiene:
    facts = [pods.PodFacts("ns", f"p{i}", "w1", {"app": f"a{i % 3}"}, "default", True) for i in range(30)]
    return labels.analyse(facts, {})


def exploding_labels() -> labels.LabelHygiene:
    facts = [pods.PodFacts("ns", f"p{i}", "w1", {"app": "a", "run": f"{i:012x}"}, "default", True)
             for i in range(30)]
    return labels.analyse(facts, {})


PASSING_OPS = [D.OpsCheck("flows visible (observe)", D.PASS), D.OpsCheck("metrics endpoint", D.PASS),
               D.OpsCheck("connectivity test", D.NOT_RUN, "add --connectivity")]


def decide(checks: dict[str, K.CheckResult] | None = None, hygiene: labels.LabelHygiene | None = None,
           scale: sizing.Scale | None = None, ops: list[D.OpsCheck] | None = None,
           live: list[mappressure.MapFill] = ()) -> D.Decision:
    checks = results() if checks is None else checks
    report = sizing.size_maps(scale or sizing.Scale(services=100, backends=3))
    return D.decide(K.feature_verdicts(checks), list(checks.values()), hygiene, report, ops, live)


def test_pilot_when_every_question_is_yes() -> None:
    d = decide(hygiene=clean_labels(), ops=PASSING_OPS)
    assert d.verdict == D.PILOT and d.title == "pilot"
    assert {k: a.answer for k, a in d.answers.items()} == dict.fromkeys(D.QUESTIONS, D.YES)
    assert any(r.startswith("kernel: yes") for r in d.reasons)
    assert "connectivity test not run: add --connectivity" in d.answers["operations"].reasons


def test_pilot_names_what_was_not_verified() -> None:
    d = decide(hygiene=None, ops=None)
    assert d.verdict == D.PILOT
    assert d.answers["labels"].answer == D.UNKNOWN and d.answers["operations"].answer == D.UNKNOWN
    assert any(r.startswith("not verified: labels") for r in d.reasons)
    assert any(r.startswith("not verified: operations (no running instance") for r in d.reasons)
    no_endpoints = labels.analyse([pods.PodFacts("ns", "agent", "w1", {}, "default", False)], {})
    assert D.answer_labels(no_endpoints).answer == D.UNKNOWN
    not_probed = D.decide(None, [], clean_labels(), sizing.size_maps(sizing.Scale()), PASSING_OPS)
    assert not_probed.verdict == D.PILOT and not_probed.answers["kernel"].answer == D.UNKNOWN


def test_upgrade_the_baseline_first_when_a_core_feature_is_missing() -> None:
    d = decide(results(bpffs=(K.MISSING, "not mounted at /sys/fs/bpf")), clean_labels(), ops=PASSING_OPS)
    assert d.verdict == D.UPGRADE_BASELINE and d.title == "upgrade the baseline first"
    assert d.answers["kernel"].answer == D.NO and d.answers["upgrade_cost"].answer == D.NO
    assert any("bpffs missing: not mounted at /sys/fs/bpf" in r for r in d.reasons)
    assert any(r.startswith("bpffs: mount -t bpf") for r in d.reasons)


def test_upgrade_the_baseline_first_beats_bad_labels_and_failed_operations() -> None:
    d = decide(results(map_lpm_trie=(K.MISSING, "Invalid argument")), exploding_labels(),
               ops=[D.OpsCheck("metrics endpoint", D.FAIL, "refused")])
    assert d.verdict == D.UPGRADE_BASELINE


def test_upgrade_the_baseline_first_when_the_scale_passes_a_hard_limit() -> None:
    d = decide(hygiene=clean_labels(), scale=sizing.Scale(services=10, backends=100_000), ops=PASSING_OPS)
    assert d.answers["kernel"].answer == D.YES and d.answers["upgrade_cost"].answer == D.NO
    assert d.verdict == D.UPGRADE_BASELINE
    assert any("16-bit backend slots" in r for r in d.reasons)


def test_an_optional_feature_missing_does_not_block() -> None:
    d = decide(results(prog_sock_getpeername4=(K.MISSING, "Invalid argument")), clean_labels(), ops=PASSING_OPS)
    assert d.verdict == D.PILOT and d.answers["kernel"].answer == D.YES
    assert any("CILIARY_SOCKET_LB=off" in r for r in d.answers["kernel"].reasons)


def test_unknown_kernel_does_not_decide() -> None:
    d = decide(results(bpf_syscall=(K.UNKNOWN, "not permitted: run ciliary preflight as root")),
               clean_labels(), ops=PASSING_OPS)
    assert d.answers["kernel"].answer == D.UNKNOWN and d.verdict == D.PILOT
    assert any(r.startswith("not verified: kernel") for r in d.reasons)


def test_govern_labels_first() -> None:
    d = decide(hygiene=exploding_labels(), ops=PASSING_OPS)
    assert d.verdict == D.GOVERN_LABELS and d.title == "govern labels first"
    assert any("k8s:run" in r for r in d.reasons)
    assert any(r.startswith('suggested filter: CILIARY_IDENTITY_LABELS="k8s:!run$"') for r in d.reasons)


def test_govern_labels_first_beats_failed_operations() -> None:
    d = decide(hygiene=exploding_labels(), ops=[D.OpsCheck("policy trace", D.FAIL, "no answer")])
    assert d.verdict == D.GOVERN_LABELS


def test_train_first_when_an_operations_check_fails() -> None:
    ops = [*PASSING_OPS, D.OpsCheck("policy trace", D.FAIL, "no answer: timeout")]
    d = decide(hygiene=clean_labels(), ops=ops)
    assert d.verdict == D.TRAIN and d.title == "train first"
    assert "policy trace fail: no answer: timeout" in d.reasons


def test_live_map_pressure_is_a_cost_not_a_branch() -> None:
    hot = mappressure.MapFill("node-1", "ciliary_policy", 15_900, 16_384, 15_900 / 16_384)
    d = decide(hygiene=clean_labels(), ops=PASSING_OPS, live=[hot])
    assert d.verdict == D.PILOT
    assert any(r.startswith("live map pressure critical: node-1 ciliary_policy") for r in d.answers["upgrade_cost"].reasons)


def test_the_cost_names_settings_and_memory() -> None:
    d = decide(hygiene=clean_labels(), scale=sizing.Scale(services=20_000, backends=5), ops=PASSING_OPS)
    cost = d.answers["upgrade_cost"]
    assert cost.answer == D.YES
    assert any(r.startswith("map settings: CILIARY_MAP_LB=262144 (") and "MiB" in r for r in cost.reasons)
