"""The OTLP receiver inflates gzip bodies with a bound: no decompression bomb."""

from __future__ import annotations

import gzip

import pytest

from services.flows.otlp import OTLPError
from services.flows.otlpserver import TooLarge, gunzip_bounded


def test_a_body_within_the_bound_inflates_whole() -> None:
    data = b"span" * 1000
    assert gunzip_bounded(gzip.compress(data), 4000) == data


def test_a_body_that_inflates_past_the_bound_is_refused() -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)  # ~10 KB on the wire
    assert len(bomb) < 20_000
    with pytest.raises(TooLarge):
        gunzip_bounded(bomb, 1_000_000)


def test_a_broken_or_cut_stream_is_malformed() -> None:
    with pytest.raises(OTLPError):
        gunzip_bounded(b"not gzip at all", 1000)
    with pytest.raises(OTLPError):
        gunzip_bounded(gzip.compress(b"x" * 5000)[:20], 10_000)
