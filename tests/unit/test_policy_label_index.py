"""The selector cache's label index: selection by index ≡ matching every identity."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy.label_index import LabelIndex
from services.policy.selectors import (
    IdentityView,
    Requirement,
    SelectorCache,
    labels_selector,
)

KEYS = ("app", "tier", "host")
VALUES = ("a", "b", "")
SOURCES = ("k8s", "container", "reserved", "any")

labels = st.frozensets(
    st.builds(lambda src, key, value: f"{src}:{key}={value}" if value else f"{src}:{key}",
              st.sampled_from(SOURCES), st.sampled_from(KEYS), st.sampled_from(VALUES)),
    max_size=5,
)
requirements = st.builds(
    Requirement,
    st.sampled_from(SOURCES),
    st.sampled_from(KEYS),
    st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")),
    st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True).map(
        lambda v: tuple(sorted(v))),
).map(lambda r: r if r.op in ("In", "NotIn") else Requirement(r.source, r.key, r.op))
# (add?, identity slot, labels): slot 0 is the reserved host identity (an implicit label)
changes = st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=5), labels),
                   max_size=15)


def ident_of(slot: int) -> int:
    return 1 if slot == 0 else 65791 + slot


@given(steps=changes, reqs=st.lists(st.lists(requirements, max_size=3), min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_selectors_registered_after_changes_select_as_a_scan(
    steps: list[tuple[bool, int, frozenset[str]]], reqs: list[list[Requirement]]
) -> None:
    cache = SelectorCache()
    for add, slot, lbls in steps:
        if add:
            cache.update({ident_of(slot): lbls}, ())
        else:
            cache.update({}, [ident_of(slot)])
    for group in reqs:
        sel = labels_selector(group)
        scan = {i for i, view in cache.identities.items() if sel.matches(view)}
        assert cache.selections(sel) == scan, sel


@given(steps=changes)
@settings(max_examples=200, deadline=None)
def test_index_after_removals_holds_only_current_identities(
    steps: list[tuple[bool, int, frozenset[str]]]
) -> None:
    index = LabelIndex()
    views: dict[int, IdentityView] = {}
    for add, slot, lbls in steps:
        ident = ident_of(slot)
        old = views.pop(ident, None)
        if old is not None:
            index.remove(ident, old.pairs)
        if add:
            views[ident] = IdentityView(ident, lbls)
            index.add(ident, views[ident].pairs)
    fresh = LabelIndex()
    for ident, view in views.items():
        fresh.add(ident, view.pairs)
    assert index.all == fresh.all == set(views)
    assert index._values == fresh._values
    assert index._present == fresh._present


def test_empty_requirements_select_every_identity_and_results_are_copies() -> None:
    index = LabelIndex()
    index.add(7, [("k8s", "app", "a")])
    everyone = index.select([])
    everyone.add(99)
    assert index.select([]) == {7}
    hits = index.select([Requirement("any", "app", "In", ("a",))])
    hits.clear()
    assert index.select([Requirement("k8s", "app", "Exists")]) == {7}
    assert index.select([Requirement("k8s", "app", "NotIn", ("a",))]) == set()
    assert index.select([Requirement("container", "app", "DoesNotExist")]) == {7}
