"""Table-driven policy resolution: YAML policies in, expected entries and verdicts out.

Cases live in tests/unit/data/policy/cases_*.yaml (format: see test_policy_harness).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_policy_harness import (
    check_flow,
    load_cases,
    options,
    render_entry,
    render_key,
    run_resolution,
)

CASES = load_cases()


def test_enough_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_case(case: dict[str, Any]) -> None:
    u, pols, res = run_resolution(case)
    expect = case.get("expect", {}) or {}
    got_names = sorted(u.name(i) for i in res.identities)
    assert got_names == sorted(expect), "identities with policy"
    for name, want in expect.items():
        ip = res.identities[u.names[name]]
        enforced = [d for d in ("ingress", "egress") if ip.enforced(d)]
        assert enforced == want.get("enforced", []), f"{name}: enforced directions"
        if "entries" in want:
            got = [render_entry(e, u) for e in ip.entries]
            assert got == want["entries"], f"{name}: entries"
        if "audit" in want:
            assert ip.audit == want["audit"]
        if "error" in want:
            assert want["error"] in ip.error
        else:
            assert not ip.error
    statuses = {render_key(k): s for k, s in res.statuses.items()}
    for key, want in (case.get("status") or {}).items():
        st = statuses[key]
        assert st.state == want.get("state", "ok"), f"{key}: {st.error}"
        if "error" in want:
            assert want["error"] in st.error
        if "selected" in want:
            assert [u.name(i) for i in st.selected] == want["selected"]
        for text in want.get("warnings", []):
            assert any(text in w for w in st.warnings), f"{key}: no warning with {text!r}: {st.warnings}"
        if want.get("warnings") == []:
            assert st.warnings == []
    if not case.get("status"):
        for key, st in statuses.items():
            assert st.state == "ok", f"{key}: {st.error}"
    for name, value in (case.get("counters") or {}).items():
        assert res.counters[name] == value
    opts = options(case, u)
    for flow in case.get("flows", []):
        check = check_flow(flow, u, pols, res, opts)
        assert check.traced.verdict == check.expected, f"trace {flow}:\n{check.traced}"
        assert check.looked_up == check.expected, f"lookup {flow}"
