"""``ciliary apply`` over ``ciliary.testing.FakeBus``: results on stdout in input order,
progress on stderr only (a terminal above the threshold, or ``--progress``)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from ciliary import schema
from ciliary.cli import common
from ciliary.cli.app import build_parser
from ciliary.testing import FakeBus


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def manifest(n: int) -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n"]
    docs += [f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:04d}, namespace: bench}}\n"
             f"spec:\n  ports:\n  - {{port: 80}}\n" for i in range(n)]
    return "---\n".join(docs)


def apply(argv: list[str], bus: FakeBus, monkeypatch: pytest.MonkeyPatch, stderr: Any) -> int:
    args = build_parser().parse_args(["apply", *argv])
    monkeypatch.setattr(common, "run_with_bus", lambda args, work: asyncio.run(work(bus)))
    monkeypatch.setattr("sys.stderr", stderr)
    return args.func(args)


def test_results_in_input_order_and_no_progress_off_a_terminal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(manifest(600))
    bus, err = FakeBus(), io.StringIO()
    assert apply(["-f", str(path)], bus, monkeypatch, err) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "namespace/bench created"
    assert out[1:] == [f"service/svc-{i:04d} -n bench created" for i in range(600)]
    assert err.getvalue() == ""
    assert len(bus.data[schema.BUCKET_RESOURCES]) == 601


def test_progress_on_a_terminal_is_rewritten_in_place_and_cleared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(manifest(600))
    err = Terminal()
    assert apply(["-f", str(path)], FakeBus(), monkeypatch, err) == 0
    shown = err.getvalue()
    assert "applying 601 objects: reading what is stored" in shown
    assert "[##############################] 601/601 written" in shown
    assert "\n" not in shown and shown.endswith("\r\x1b[K"), "one line, cleared at the end"
    assert "applying" not in capsys.readouterr().out

    few = tmp_path / "few.yaml"
    few.write_text(manifest(3))
    err = Terminal()
    assert apply(["-f", str(few)], FakeBus(), monkeypatch, err) == 0
    assert err.getvalue() == "", "no progress for a few objects"


def test_progress_when_asked_for_is_one_line_per_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "few.yaml"
    path.write_text(manifest(3))
    err = io.StringIO()
    assert apply(["-f", str(path), "--progress"], FakeBus(), monkeypatch, err) == 0
    lines = err.getvalue().splitlines()
    assert lines[0] == "applying 4 objects: reading what is stored"
    assert lines[-1].endswith("] 4/4 written")
    assert len(capsys.readouterr().out.splitlines()) == 4

