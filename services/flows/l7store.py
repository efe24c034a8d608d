"""Recent L7 spans: one bounded ring, an index by trace id, and Hubble's HTTP metrics (pure).

Invariants:
- At most ``capacity`` spans are held; the oldest is dropped first and counted in
  ``overwritten``; the trace index never names a span the ring no longer holds.
- ``add`` takes the spans of one accepted request at once (a rejected request never
  reaches the store).
- ``L7Metrics`` counts every stored span once: ``hubble_http_requests_total`` and
  ``hubble_http_request_duration_seconds`` with Hubble's labels (``method``, ``protocol``,
  ``reporter`` = server for an inbound sidecar span, client for an outbound one, ``status``)
  plus ``source`` and ``destination`` workload (``namespace/name`` of the pod, or of the
  Service a ClusterIP belongs to, else the IP). ``render`` is Prometheus text 0.0.4 in a stable order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from ciliary import schema

DEFAULT_CAPACITY = 8192
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAMILIES = {
    "hubble_http_requests_total": ("counter", "Count of HTTP requests"),
    "hubble_http_request_duration_seconds": ("histogram", "Quantiles of HTTP request duration in seconds"),
}


class L7Store:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("L7 store capacity must be at least 1")
        self.capacity = capacity
        self._ring: deque[schema.L7Span] = deque()
        self._by_trace: dict[str, list[schema.L7Span]] = {}
        self.written = 0

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def overwritten(self) -> int:
        return self.written - len(self._ring)

    def add(self, spans: Iterable[schema.L7Span]) -> None:
        for span in spans:
            if len(self._ring) == self.capacity:
                old = self._ring.popleft()
                same = self._by_trace.get(old.trace_id)
                if same is not None:
                    same.remove(old)
                    if not same:
                        del self._by_trace[old.trace_id]
            self._ring.append(span)
            self._by_trace.setdefault(span.trace_id, []).append(span)
            self.written += 1

    def replace(self, old: schema.L7Span, new: schema.L7Span) -> None:
        """Swap a held span for its joined copy (same trace id)."""
        for i in range(len(self._ring) - 1, -1, -1):
            if self._ring[i] is old:
                self._ring[i] = new
                break
        else:
            return
        same = self._by_trace[old.trace_id]
        same[same.index(old)] = new

    def trace(self, trace_id: str) -> list[schema.L7Span]:
        return sorted(self._by_trace.get(trace_id.lower(), ()), key=lambda s: (s.start_ns, s.span_id))

    def recent(self, number: int = 0) -> list[schema.L7Span]:
        spans = list(self._ring)
        return spans[-number:] if number else spans

    def query(self, q: schema.L7Query) -> list[schema.L7Span]:
        spans = self.trace(q.trace_id) if q.trace_id else list(self._ring)
        if q.workload:
            spans = [s for s in spans if q.workload in (s.source_workload, s.destination_workload,
                                                        f"{s.namespace}/{s.pod}")]
        return spans[-q.number:] if q.number else spans


Resolve = Callable[[str], str]  # "ip:port" -> "namespace/pod" or the Service's "namespace/name" ("" when unknown)


def _ip(address: str) -> str:
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def workloads(span: schema.L7Span, resolve: Resolve) -> tuple[str, str]:
    """(source, destination) workload of a sidecar span."""
    own = f"{span.namespace}/{span.pod}" if span.pod else (span.canonical_service or span.service)
    if span.source_workload or span.destination_workload:
        return span.source_workload or own, span.destination_workload or own
    if span.direction == "inbound":
        peer = span.downstream_remote_address
        return resolve(peer) or _ip(peer) or "unknown", own
    peer = span.upstream_address or span.downstream_local_address
    return own, resolve(peer) or _ip(peer) or "unknown"


def _labels(pairs: dict[str, str]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return ",".join(f'{k}="{esc(v)}"' for k, v in sorted(pairs.items()))


class L7Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[tuple[str, str], ...], int] = {}
        self.durations: dict[tuple[tuple[str, str], ...], list[float]] = OrderedDict()

    def count(self, spans: Iterable[schema.L7Span], resolve: Resolve) -> None:
        for span in spans:
            if span.kind not in ("SERVER", "CLIENT", "") or not (span.method or span.status_code):
                continue
            source, destination = workloads(span, resolve)
            if span.direction:
                reporter = "server" if span.direction == "inbound" else "client"
            else:
                reporter = "server" if span.kind == "SERVER" else "client"
            base = {"source": source, "destination": destination, "method": span.method or "",
                    "reporter": reporter}
            key = tuple(sorted({**base, "protocol": span.attributes.get("http.protocol", "HTTP/1.1"),
                                "status": str(span.status_code)}.items()))
            self.requests[key] = self.requests.get(key, 0) + 1
            seconds = max(0, span.end_ns - span.start_ns) / 1e9
            hkey = tuple(sorted(base.items()))
            state = self.durations.setdefault(hkey, [0.0] * (len(DURATION_BUCKETS) + 2))
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    state[i] += 1
            state[-2] += 1  # count
            state[-1] += seconds  # sum

    def render(self) -> str:
        out: list[str] = []
        name = "hubble_http_requests_total"
        out += [f"# HELP {name} {FAMILIES[name][1]}", f"# TYPE {name} counter"]
        out += [f"{name}{{{_labels(dict(k))}}} {v}" for k, v in sorted(self.requests.items())]
        name = "hubble_http_request_duration_seconds"
        out += [f"# HELP {name} {FAMILIES[name][1]}", f"# TYPE {name} histogram"]
        for key, state in sorted(self.durations.items()):
            labels = dict(key)
            for bound, n in zip(DURATION_BUCKETS, state, strict=False):
                out.append(f"{name}_bucket{{{_labels({**labels, 'le': repr(bound)})}}} {int(n)}")
            out.append(f"{name}_bucket{{{_labels({**labels, 'le': '+Inf'})}}} {int(state[-2])}")
            out.append(f"{name}_sum{{{_labels(labels)}}} {state[-1]:.9g}")
            out.append(f"{name}_count{{{_labels(labels)}}} {int(state[-2])}")
        return "\n".join(out) + "\n"
