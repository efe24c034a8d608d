"""Numeric settings from the environment: a bad value is reported and the default used."""

from __future__ import annotations

import logging

import pytest

from ciliary.config import env_number


@pytest.mark.parametrize(("raw", "kwargs", "expected"), [
    (None, {}, 5.0),
    ("", {}, 5.0),
    ("2.5", {}, 2.5),
    (" 7 ", {"integer": True}, 7),
    ("0", {"minimum": 0}, 0.0),
])
def test_valid_values_and_defaults(raw: str | None, kwargs: dict, expected: float) -> None:
    env = {} if raw is None else {"CILIARY_X": raw}
    assert env_number("CILIARY_X", 5.0, env=env, **kwargs) == expected


@pytest.mark.parametrize(("raw", "kwargs", "reason"), [
    ("abc", {}, "not a number"),
    ("2.5", {"integer": True}, "not an integer"),
    ("-1", {"minimum": 0}, "must be at least 0"),
    ("0", {"integer": True, "minimum": 1}, "must be at least 1"),
])
def test_bad_values_are_named_and_fall_back(raw: str, kwargs: dict, reason: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert env_number("CILIARY_X", 5, env={"CILIARY_X": raw}, **kwargs) == 5
    assert f"CILIARY_X={raw!r}: {reason}; using 5" in caplog.text


def test_node_map_sizes_ignore_a_bad_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.node.agent import map_sizes_from_env
    from services.node.datapath import MapSizes

    monkeypatch.setenv("CILIARY_MAP_CT", "lots")
    monkeypatch.setenv("CILIARY_MAP_LB", "1024")
    sizes = map_sizes_from_env()
    assert sizes.ct == MapSizes().ct and sizes.lb == 1024
