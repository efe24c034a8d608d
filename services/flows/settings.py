"""The flows service's settings from the environment.

Invariants:
- A bad value never stops the service: it is logged naming the variable, and the default
  (or the feature off, for HTTP ports and history reads) is used instead.
"""

from __future__ import annotations

import logging
import os

from .history import HistoryLimits
from .names import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MIN_TTL_S,
    ENV_MAX_ENTRIES,
    ENV_MIN_TTL,
    EndpointNameCache,
)

log = logging.getLogger(__name__)

ENV_METRICS_PORT = "CILIARY_FLOWS_METRICS_PORT"
ENV_UI_PORT = "CILIARY_FLOWS_UI_PORT"  # unset: same server as metrics; 0: no UI
ENV_HTTP_HOST = "CILIARY_FLOWS_HTTP_HOST"  # default 127.0.0.1
ENV_RING_CAPACITY = "CILIARY_FLOWS_RING_CAPACITY"
ENV_STREAM_MAX_MB = "CILIARY_FLOWS_STREAM_MAX_MB"  # 0 = no JetStream stream FLOWS
ENV_STREAM_MAX_AGE = "CILIARY_FLOWS_STREAM_MAX_AGE"  # seconds
DEFAULT_STREAM_MAX_MB = 64.0
DEFAULT_STREAM_MAX_AGE = 3600.0


def name_cache_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> EndpointNameCache:
    """The DNS name cache from the environment; defaults (logged) for bad settings."""
    try:
        size_text = env.get(ENV_MAX_ENTRIES, "") or str(DEFAULT_MAX_ENTRIES)
        ttl_text = env.get(ENV_MIN_TTL, "") or str(DEFAULT_MIN_TTL_S)
        if not size_text.isdigit():
            raise ValueError(f"{ENV_MAX_ENTRIES}: expected a whole number of entries, got {size_text!r}")
        try:
            min_ttl = float(ttl_text)
        except ValueError:
            raise ValueError(f"{ENV_MIN_TTL}: expected seconds, got {ttl_text!r}") from None
        return EndpointNameCache(int(size_text), min_ttl)
    except ValueError as err:
        log.error("flows: DNS name cache uses its defaults, bad setting: %s", err)
        return EndpointNameCache()


def history_limits(stream_on: bool) -> HistoryLimits:
    """History query limits from the environment; reading the stream is off without it."""
    if not stream_on:
        return HistoryLimits(max_scan=0)
    try:
        return HistoryLimits.from_env()
    except ValueError as err:
        log.error("flows: history queries read the rings only, bad setting: %s", err)
        return HistoryLimits(max_scan=0)


def http_plan(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[int, tuple[bool, bool]]:
    """{port: (serves metrics, serves UI)} from ``CILIARY_FLOWS_METRICS_PORT`` and
    ``CILIARY_FLOWS_UI_PORT`` (unset UI port: the UI shares the metrics server)."""
    metrics_port = int(env.get(ENV_METRICS_PORT, "0") or 0)
    ui_text = env.get(ENV_UI_PORT, "")
    ui_port = metrics_port if ui_text == "" else int(ui_text)
    plan: dict[int, tuple[bool, bool]] = {}
    if metrics_port:
        plan[metrics_port] = (True, ui_port == metrics_port)
    if ui_port and ui_port != metrics_port:
        plan[ui_port] = (False, True)
    return plan
