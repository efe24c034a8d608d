"""The control plane's spans: names, attributes, and how a pass joins the trace of what
made it due.

A change travels as a KV write whose headers carry the writer's trace context. A mirror
past its initial state makes an entry's headers the *current change* while its listeners
run (``change``); a
loop that a listener marks dirty notes that context (``Causes.note``); the pass then runs
in a span whose parent is the first noted change, with a link to every other one
(``work_span``). The writes a pass makes carry the pass's span, so the next hop continues
the same trace: one ``ciliary apply`` is one trace.

Invariants:
- Span names and attribute names are the ones below and in docs/tracing.md; they are
  stable (dashboards and ``ciliary trace`` rely on them).
- A pass several changes made due is the child of the first change (in bus order) and
  links to the others (at most ``MAX_CAUSES`` distinct contexts; more are counted in
  ``ciliary.pass.causes_dropped``). Writes of one ``kv_put_many`` share one context, so
  an apply of many objects is one cause.
- A pass nothing traced made due (a timer, an untraced write) is a span of its own trace,
  and only when something marked the loop and this process exports spans; a pure
  wake-up with no mark has no span.
- Without an exported trace context nothing here allocates: ``change`` is a header
  lookup, ``note`` a context variable read, and no span is started (``wanted``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ciliary import telemetry

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_CAUSES = 32

# span names
SPAN_APPLY = "ciliary apply"
SPAN_DELETE = "ciliary delete"
SPAN_PASS = "{loop} pass"  # identity pass, policy pass, servicelb pass, peer-routes pass
SPAN_MAP_WRITE = "node map write"

# attribute names
ATTR_LOOP = "ciliary.pass.loop"  # the loop's name
ATTR_MARKS = "ciliary.pass.marks"  # events that marked the loop since its previous pass
ATTR_CAUSES = "ciliary.pass.causes"  # distinct traced changes behind the pass
ATTR_CAUSES_DROPPED = "ciliary.pass.causes_dropped"  # beyond MAX_CAUSES
ATTR_AGAIN = "ciliary.pass.again"  # the pass asked for another at once
ATTR_PART_MS = "ciliary.pass.ms.{part}"  # wall time of one part of the pass (PassClock)
ATTR_OBJECTS = "ciliary.apply.objects"  # objects in the applied manifests
ATTR_ACTION = "ciliary.apply.{action}"  # created / configured / unchanged / deleted count
ATTR_MAP_UPSERTED = "ciliary.maps.upserted"
ATTR_MAP_DELETED = "ciliary.maps.deleted"
ATTR_MAP_FAILED = "ciliary.maps.failed"
ATTR_MAP_BATCHES = "ciliary.maps.batches"

_tracer = trace.get_tracer("ciliary")
_change: ContextVar[Mapping[str, str] | None] = ContextVar("ciliary_change", default=None)
_w3c = TraceContextTextMapPropagator()


@contextlib.contextmanager
def change(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the change a KV entry with ``headers`` carries current (for ``Causes.note``)."""
    token = _change.set(headers)
    try:
        yield
    finally:
        _change.reset(token)


def carries_trace(headers: Mapping[str, str] | None) -> bool:
    return bool(headers) and TRACEPARENT in headers  # type: ignore[operator]


def span_context_of(headers: Mapping[str, str]) -> SpanContext | None:
    """The remote span context of W3C headers (None when absent or malformed)."""
    ctx = _w3c.extract(headers)
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


class Causes:
    """The traced changes that made a piece of work due, in the order they came."""

    __slots__ = ("_pending", "dropped")

    def __init__(self) -> None:
        self._pending: dict[str, Mapping[str, str] | SpanContext] = {}
        self.dropped = 0

    def note(self) -> None:
        """Note the current change (a mirror's entry, or a handled message's context)."""
        headers = _change.get()
        if headers is not None:
            key = headers.get(TRACEPARENT, "")
            if not key or key in self._pending:
                return
            self._add(key, headers)
            return
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            key = f"{span_context.trace_id:032x}-{span_context.span_id:016x}"
            if key not in self._pending:
                self._add(key, span_context)

    def _add(self, key: str, cause: Mapping[str, str] | SpanContext) -> None:
        if len(self._pending) < MAX_CAUSES:
            self._pending[key] = cause
        else:
            self.dropped += 1

    def take(self) -> tuple[list[SpanContext], int]:
        """The noted causes as span contexts (oldest first) and how many were dropped;
        starts over."""
        if not self._pending and not self.dropped:
            return [], 0
        contexts: list[SpanContext] = []
        for cause in self._pending.values():
            span_context = cause if isinstance(cause, SpanContext) else span_context_of(cause)
            if span_context is not None:
                contexts.append(span_context)
        dropped, self.dropped = self.dropped, 0
        self._pending = {}
        return contexts, dropped


@contextlib.contextmanager
def work_span(name: str, causes: list[SpanContext], dropped: int = 0,
              attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A current span for one piece of work: child of the first cause, linked to the
    rest (a new trace when there is none). An exception is recorded and re-raised."""
    # no cause: a root span, whatever context the running task inherited
    parent = trace.set_span_in_context(NonRecordingSpan(causes[0])) if causes else context.Context()
    attrs: dict[str, Any] = dict(attributes or {})
    attrs[ATTR_CAUSES] = len(causes)
    if dropped:
        attrs[ATTR_CAUSES_DROPPED] = dropped
    links = [Link(c) for c in causes[1:]]
    with _tracer.start_as_current_span(name, context=parent, links=links, attributes=attrs) as span:
        yield span


def wanted(causes: list[SpanContext]) -> bool:
    """Whether work with these causes gets a span: a traced cause to continue, or this
    process exports (a new trace). Otherwise the span would be a no-op: none is started."""
    return bool(causes) or telemetry.exporting()


def pass_span(loop: str, causes: list[SpanContext], dropped: int, marks: int) -> contextlib.AbstractContextManager[Span]:
    """The span of one pass of loop ``loop``."""
    return work_span(SPAN_PASS.format(loop=loop), causes, dropped, {ATTR_LOOP: loop, ATTR_MARKS: marks})


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span when it records (cheap otherwise)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(dict(attributes))


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits) when it records, else ''."""
    span = trace.get_current_span()
    if not span.is_recording():
        return ""
    return f"{span.get_span_context().trace_id:032x}"


def command_span(name: str) -> contextlib.AbstractContextManager[Span]:
    """The root span of one CLI command (``ciliary apply``)."""
    return _tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT)
