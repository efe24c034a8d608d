"""Fuzzed manifests: any object or text given to ``ciliary apply`` is either accepted as a
valid resource or refused with a ``ManifestError`` whose every problem names where it is
(source, document, object, field) — never another exception, never a partial result."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ciliary.resources import ManifestError, loads, resource_from_manifest
from ciliary.resources.kinds import KINDS
from tests.unit.fuzz_strategies import FUZZ, deep, json_values, shaped, strings


def field_names() -> list[str]:
    """Every field name (as spelled in manifests) of every kind's model, at any depth."""
    names: set[str] = set()
    seen: set[Any] = set()

    def walk(info: Any) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                return
            seen.add(info.cls)
            for f in info.fields:
                names.add(f.encode_name)
                walk(f.type)
            return
        for attr in ("item_type", "key_type", "value_type"):
            if hasattr(info, attr):
                walk(getattr(info, attr))
        for sub in getattr(info, "types", ()) or ():
            walk(sub)

    for kind in KINDS.values():
        walk(msgspec.inspect.type_info(kind.model))
    return sorted(names)


VOCABULARY = field_names()


def manifests() -> st.SearchStrategy[dict[str, Any]]:
    kinds = st.sampled_from(sorted(KINDS))
    return st.builds(
        lambda kind, api, meta, spec, extra: {
            "apiVersion": KINDS[kind].api_version if api is None else api,
            "kind": kind, "metadata": meta, "spec": spec, **extra},
        kinds,
        st.one_of(st.none(), strings),
        st.one_of(st.fixed_dictionaries({"name": strings}, optional={
            "namespace": strings, "labels": st.dictionaries(strings, strings, max_size=3),
            "annotations": json_values()}), json_values()),
        shaped(VOCABULARY),
        st.dictionaries(st.sampled_from(["status", "data", "rules", "items", "extra"]), json_values(),
                        max_size=2),
    )


def check_refusal(err: ManifestError, source: str) -> None:
    assert err.problems
    for problem in err.problems:
        text = str(problem)
        assert text.startswith(source) and problem.message, text
        assert "Traceback" not in text


@FUZZ
@given(st.one_of(manifests(), json_values()))
@example({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": None,
          "spec": 2**64})  # once an OverflowError copying the object
@example({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"},
          "spec": {}, "specs": True})  # once a TypeError reading the rules
def test_any_object_is_a_resource_or_a_located_refusal(manifest: Any) -> None:
    try:
        resource = resource_from_manifest(manifest, source="fuzz")
    except ManifestError as err:
        check_refusal(err, "fuzz")
    else:
        assert resource.kind in KINDS and resource.name
        msgspec.msgpack.encode(resource.manifest)  # what the store writes: it must encode


@FUZZ
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["apiVersion: v1", "kind: Pod", "metadata:", "  name: a", "spec:",
                              "---", "- a", "  - b", "&a x", "*a", "!!python/object:os.system x",
                              "{", "}", "[", "]", ": :", "key: 'unterminated", "\t", "\x00",
                              "a: 1e999", "b: 0x7fffffffffffffffff"]),
             max_size=12).map("\n".join),
))
def test_any_text_is_resources_or_a_located_refusal(text: str) -> None:
    try:
        resources = loads(text, source="fuzz.yaml")
    except ManifestError as err:
        check_refusal(err, "fuzz.yaml")
    else:
        assert all(r.kind in KINDS for r in resources)


@pytest.mark.parametrize("levels", [50, 500, 5000])
def test_deep_nesting_is_refused_not_a_crash(levels: int) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "deep"},
                "spec": {"containers": deep("x", levels)}}
    with pytest.raises(ManifestError) as err:
        resource_from_manifest(manifest, source="deep")
    check_refusal(err.value, "deep")
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: deep}\nspec: " + "[" * levels + "]" * levels
    try:
        loads(text, source="deep.yaml")
    except ManifestError as refused:
        check_refusal(refused, "deep.yaml")
