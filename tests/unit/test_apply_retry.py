"""``ciliary apply`` after a NATS timeout (a replicated bus electing a JetStream leader):
the whole apply runs again on a fresh connection until ``APPLY_RETRY_SECONDS``; a run
whose writes landed but whose answer was lost is read back as unchanged, nothing is
written twice; other errors are never retried."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from ciliary import schema, store
from ciliary.bus import BusError, BusTimeout
from ciliary.cli import common, objects
from ciliary.cli.app import build_parser
from ciliary.testing import FakeBus

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def run_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connections: list[Any]) -> tuple[int, str]:
    """``ciliary apply`` of one Namespace; each connection (attempt) takes the next entry of
    ``connections``: an exception raised before the work, ("after", exc) raised after it,
    or a FakeBus the work runs on."""
    path = tmp_path / "ns.yaml"
    path.write_text(NAMESPACE)
    bus = FakeBus()
    attempts = iter(connections)

    def run_with_bus(args: Any, work: Any) -> Any:
        step = next(attempts)
        if isinstance(step, BaseException):
            raise step
        result = asyncio.run(work(bus))
        if isinstance(step, tuple):
            raise step[1]
        return result

    err = io.StringIO()
    monkeypatch.setattr(common, "run_with_bus", run_with_bus)
    monkeypatch.setattr(common, "RETRY_PAUSE", 0.0)
    monkeypatch.setattr("sys.stderr", err)
    args = build_parser().parse_args(["apply", "-f", str(path)])
    code = args.func(args)
    assert len(bus.data.get(schema.BUCKET_RESOURCES, {})) == (1 if code == 0 else 0)
    return code, err.getvalue()


def timeout() -> BusTimeout:
    return BusTimeout("NATS did not answer in time ($JS.API.STREAM.INFO.KV_resources)")


def test_a_timeout_is_retried_until_the_apply_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_apply(tmp_path, monkeypatch, [timeout(), timeout(), "ok"])
    assert code == 0
    assert capsys.readouterr().out == "namespace/shop created\n"
    assert err.count("apply: NATS did not answer in time; retrying") == 2


def test_a_lost_answer_is_read_back_as_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    wrapped = BusError("apply failed, nothing changed: Namespace shop: timeout")
    wrapped.__cause__ = timeout()
    code, _ = run_apply(tmp_path, monkeypatch, [("after", wrapped), "ok"])
    assert code == 0
    assert capsys.readouterr().out == "namespace/shop unchanged\n"


def test_other_errors_are_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BusError, match="permission denied"):
        run_apply(tmp_path, monkeypatch, [BusError("permission denied: NATS user cli"), "ok"])


def test_timeouts_past_the_deadline_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "APPLY_RETRY_SECONDS", 0.0)
    with pytest.raises(BusTimeout):
        run_apply(tmp_path, monkeypatch, [timeout(), "ok"])


def test_timed_out_follows_causes_and_contexts() -> None:
    assert store.timed_out(TimeoutError())
    assert store.timed_out(timeout())
    outer = BusError("apply failed")
    outer.__cause__ = RuntimeError("inner")
    outer.__cause__.__context__ = TimeoutError()
    assert store.timed_out(outer)
    assert not store.timed_out(BusError("no"))
    looped = BusError("a")
    looped.__context__ = looped
    assert not store.timed_out(looped)
