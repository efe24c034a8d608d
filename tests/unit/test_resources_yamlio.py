"""The event-built YAML documents equal the reference safe loader's, error positions too."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.resources import yamlio

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted([*(REPO / "examples").rglob("*.yaml"),
                    *(Path(__file__).parent / "data" / "manifests").glob("*.yaml")])


def _canon(value: Any) -> Any:
    """Comparable form: NaN equal to itself, types kept apart (``1 != True != 1.0``)."""
    if isinstance(value, dict):
        return ("map", [(_canon(k), _canon(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("seq", [_canon(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value)


def _same_as_reference(text: str) -> None:
    expected = yamlio._reference_parse(text)
    got = yamlio.parse(text, json_input=False)
    assert (_canon(got[0]), got[1]) == (_canon(expected[0]), expected[1])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_built_from_events_as_the_reference_loader_builds_them(path: Path) -> None:
    text = path.read_text()
    assert _canon(yamlio._fast_documents(text)) == _canon(yamlio._reference_parse(text)[0])


SCALARS = """\
plain: text
quoted: "yes"
single: 'on'
bools: [yes, No, ON, off, true, False, y, n]
nulls: [~, null, Null, NULL, '']
ints: [0, -1, +3, 0x1F, 0o17, 017, 1_000, 190:20:30, 0b101]
floats: [1.5, -.inf, .NaN, 6.8523015e+5, 685_230.15, 190:20:30.15, 1e3]
strings: [1e, 0x, 10.96.0.1, 2001-12-14t21:59:43.10-05:00, 2002-12-14, "0x1F", 12:30]
empty:
keys: {1: a, "1": b, true: c, 1.5: d, ~: e}
"""

EXAMPLES = [
    SCALARS,
    "a: 1\n---\n---\nb: 2\n...\n---\n",
    "# only a comment\n",
    "",
    "--- |\n  literal\n  text\n--- >\n  folded\n  text\n",
    "%YAML 1.1\n---\na: b\n",
    "\ufeffa: b\n",
    "key: [a, {b: c}, [d, e]]\nnested:\n  - - x\n    - y\n  - k: v\n",
    "long: \"line one\n  line two\"\n",
    "unicode: \"caf\\u00e9 \u2713\"\n",
    "top-level scalar\n",
    "- just\n- a\n- list\n",
]

UNSUPPORTED = [  # built by the reference loader
    "base: &b {x: 1}\nother: *b\n",
    "base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n",
    "a: !!str 5\nb: !!int '7'\n",
    "a: ! 5\n",
    "? [a, b]\n: c\n",
    "? {a: b}\n: c\n",
    "set: !!set {a, b}\n",
    "omap: !!omap [a: 1, b: 2]\n",
    "when: !!timestamp 2001-12-14\n",
    "value: =\n",
]

ERRORS = [
    "a: 1\na: 2\n",
    "a: 1\n'a': 2\n",
    "x:\n  y: 1\n  y: 2\nx: 3\n",
    "ok: 1\n---\nbad: [1, 2\n---\nlater: 3\n",
    "a: b: c\n",
    "a:\n\t- tab\n",
    "a: *missing\n",
    "- a\nb: c\n",
    "a: 'unterminated\n",
    "a: !!python/object:os.system x\n",
    "? [a]\n: 1\n? [a]\n: 2\n",
    "good: 1\n---\na: 1\na: 2\n---\n{\n",
]


@pytest.mark.parametrize("text", EXAMPLES + UNSUPPORTED + ERRORS)
def test_documents_and_errors_are_the_reference_loaders(text: str) -> None:
    _same_as_reference(text)


def test_the_plain_subset_is_built_without_the_reference_loader() -> None:
    for text in EXAMPLES:
        yamlio._fast_documents(text)  # raises _Unsupported where it would fall back
    for text in UNSUPPORTED:
        with pytest.raises(yamlio._Unsupported):
            yamlio._fast_documents(text)


def test_errors_keep_their_document_line_and_column() -> None:
    docs, problem = yamlio.parse("ok: 1\n---\nx: 1\nx: 2\n")
    assert docs == [{"ok": 1}]
    assert problem == yamlio.SyntaxProblem(
        1, 4, 1, "found duplicate key 'x' (while constructing a mapping)")


scalar_text = st.one_of(
    st.sampled_from(["yes", "no", "on", "Off", "null", "~", "", "0x10", "0o7", "017", "1_0",
                     "1:30", "1.5e3", ".inf", ".nan", "-", "--- x", "...", "#", "a: b",
                     "10.96.0.1", "2020-01-01", "<<", "=", "'", '"', "!x", "&a", "*a"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), scalar_text)
keys = st.one_of(scalar_text, st.integers(-3, 3), st.booleans(), st.none())
data = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(data, min_size=1, max_size=3), flow=st.sampled_from([None, True, False]),
       explicit=st.booleans(), style=st.sampled_from([None, "'", '"', "|", ">"]))
def test_generated_documents_equal_the_reference(docs: list[Any], flow: bool | None,
                                                 explicit: bool, style: str | None) -> None:
    text = yaml.safe_dump_all(docs, default_flow_style=flow, explicit_start=explicit,
                              default_style=style, allow_unicode=True)
    _same_as_reference(text)


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(EXAMPLES + UNSUPPORTED + ERRORS), cut=st.integers(0, 200),
       insert=st.sampled_from(["", ":", "- ", "\n", "  ", "{", "]", "'", "a: 1\n", "---\n", "&x ", "*x"]))
def test_edited_texts_give_the_reference_documents_or_error(base: str, cut: int, insert: str) -> None:
    cut = min(cut, len(base))
    _same_as_reference(base[:cut] + insert + base[cut:])
