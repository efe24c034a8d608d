"""Hypothesis strategies for hostile input, shared by the ``test_fuzz_*`` tests.

Every fuzz test runs ``FUZZ`` (seeded: ``derandomize``), so a run is repeatable and its
count of generated inputs per entry point is fixed (``EXAMPLES``, at least 2,000; set
``CILIARY_FUZZ_EXAMPLES`` to go further locally).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = max(2000, int(os.environ.get("CILIARY_FUZZ_EXAMPLES", "2000") or 2000))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# strings that break naive code: empty, separators, wildcards, control and wide characters
NASTY = ["", " ", ".", "..", "*", ">", "a.b", "a b", "\x00", "\n", "\t", "é", "名前", "🙂",
         "-", "_", "a" * 300, "0", "-1", "1e309", "NaN", "null", "true", "{}", "[]", "${x}",
         "10.0.0.1", "10.0.0.0/8", "::1", "300.1.1.1/40", "k8s:app", "reserved:world", "any:",
         "TCP", "UDP", "ANY", "ICMP", "80", "65536", "http", "default", "kube-system"]
HUGE = [0, -1, 1, 2**31, 2**31 - 1, 2**32, 2**63, -(2**63), 2**64, 10**30, 65535, 65536]

strings = st.one_of(st.sampled_from(NASTY), st.text(max_size=20))
numbers = st.one_of(st.sampled_from(HUGE), st.integers(), st.floats(allow_nan=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)


def json_values(depth: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON/YAML-shaped value, nested up to about ``depth`` levels."""
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(strings, inner, max_size=3)),
        max_leaves=depth,
    )


def deep(value: Any, levels: int) -> Any:
    """``value`` wrapped in ``levels`` alternating lists and mappings."""
    for level in range(levels):
        value = [value] if level % 2 else {"x": value}
    return value


def shaped(vocabulary: list[str], depth: int = 4) -> st.SearchStrategy[Any]:
    """Values shaped like the real thing: mappings keyed mostly by ``vocabulary`` (the
    field names a schema knows), with hostile leaves, lists and nesting."""
    keys = st.one_of(st.sampled_from(vocabulary), strings)
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(keys, inner, max_size=4)),
        max_leaves=2 * depth,
    )
