"""Selector anchors: identity changes are matched only against the selectors filed under
their labels, and selections stay those of a scan over every identity."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy.selector_anchors import SelectorAnchors, anchors_of
from services.policy.selectors import (
    IdentityView,
    Requirement,
    Selector,
    SelectorCache,
    labels_selector,
)

from .test_policy_label_index import changes, ident_of, requirements


def test_a_selector_is_filed_under_its_narrowest_positive_requirement() -> None:
    sel = labels_selector([Requirement("k8s", "tier", "NotIn", ("db",)),
                           Requirement("k8s", "app", "In", ("web", "api")),
                           Requirement("any", "team", "In", ("pay",)),
                           Requirement("k8s", "zone", "Exists")])
    assert anchors_of(sel) == (("any", "team", "pay"),)
    assert anchors_of(labels_selector([Requirement("k8s", "zone", "Exists")])) == (("k8s", "zone"),)
    assert anchors_of(labels_selector([Requirement("k8s", "zone", "DoesNotExist")])) == ()
    assert anchors_of(Selector("all")) == ()


def test_candidates_leave_out_what_cannot_select_and_keep_the_rest() -> None:
    web = labels_selector([Requirement("k8s", "app", "In", ("web",))])
    any_web = labels_selector([Requirement("any", "app", "In", ("web",))])
    zoned = labels_selector([Requirement("k8s", "zone", "Exists")])
    not_db = labels_selector([Requirement("k8s", "app", "NotIn", ("db",))])
    anchors = SelectorAnchors()
    for sel in (web, any_web, zoned, not_db):
        anchors.add(sel)
    api = IdentityView(70000, frozenset({"k8s:app=api"}))
    assert anchors.candidates(api) == {not_db}
    web_view = IdentityView(70001, frozenset({"container:app=web", "k8s:zone=a"}))
    assert anchors.candidates(web_view) == {any_web, zoned, not_db}
    anchors.remove(zoned)
    anchors.remove(zoned)  # idempotent
    assert anchors.candidates(web_view) == {any_web, not_db}


@given(steps=changes, reqs=st.lists(st.lists(requirements, max_size=3), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_selections_registered_first_follow_every_change_as_a_scan_would(
    steps: list[tuple[bool, int, frozenset[str]]], reqs: list[list[Requirement]]
) -> None:
    cache = SelectorCache()
    selectors = [labels_selector(group) for group in reqs] + [Selector("all"), Selector("none")]
    for sel in selectors:
        cache.add_selector(sel)
    for add, slot, lbls in steps:  # an add to a slot that holds an identity relabels it
        before = {sel: set(cache.members(sel)) for sel in selectors}
        delta = cache.update_delta({ident_of(slot): lbls}, ()) if add else cache.update_delta({}, [ident_of(slot)])
        for sel in selectors:
            scan = {i for i, view in cache.identities.items() if sel.matches(view)}
            assert set(cache.members(sel)) == scan, sel
            gained, lost = delta.get(sel, (set(), set()))
            assert (gained, lost) == (scan - before[sel], before[sel] - scan), sel
