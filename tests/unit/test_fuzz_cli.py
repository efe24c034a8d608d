"""Fuzzed command lines: any arguments to any ``ciliary`` command end in a clear outcome —
exit 0, or exit 1 with one ``error:`` line that is not the last-resort "unexpected"
report, or exit 2 with the usage — never a traceback. Commands run against a data
directory with no instance (``up``, which starts one, and the commands that collect from
the machine itself are left out)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliary.cli import app
from tests.unit.fuzz_strategies import FUZZ, NASTY

LEFT_OUT = {"up", "preflight", "sysdump"}  # start an instance / probe and collect from this machine


def command_paths() -> dict[tuple[str, ...], list[str]]:
    """Every (sub-)command path of the parser and the option strings it takes."""
    found: dict[tuple[str, ...], list[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[path] = [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]
        for action in subs:
            for name, child in action.choices.items():
                if not path and name in LEFT_OUT:
                    continue
                walk(child, (*path, name))

    walk(app.build_parser(), ())
    return found


PATHS = command_paths()
TOKENS = [*NASTY, "-o", "json", "text", "wide", "yaml", "-n", "default", "-f", "-", "--all", "-A",
          "--last", "5", "-1", "1e9", "--timeout", "0", "pods", "pod/x", "svc", "10.0.0.1:80",
          "--from", "--to", "--port", "node-1", "--data-dir"]


def argvs() -> st.SearchStrategy[list[str]]:
    tokens = st.one_of(st.sampled_from(TOKENS), st.text(max_size=12))
    return st.one_of([
        st.lists(st.one_of(st.sampled_from(PATHS[path] or ["-o"]), tokens), max_size=6).map(
            lambda rest, path=path: [*path, *rest])
        for path in sorted(PATHS)])


@pytest.fixture(scope="module", autouse=True)
def one_parser() -> Iterator[None]:
    """The parser is built once (building it is most of a short command's time)."""
    parser = app.build_parser()
    built = app.build_parser
    app.build_parser = lambda: parser
    yield
    app.build_parser = built


@pytest.fixture(scope="module")
def no_instance() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ciliary-fuzz-cli-") as empty:
        yield empty


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        else:
            code = 0
    return code, err.getvalue()


def test_the_commands_are_found() -> None:
    assert ("get",) in PATHS and ("policy", "trace") in PATHS and len(PATHS) > 15


@FUZZ
@given(argv=argvs())
def test_any_command_line_ends_clearly(argv: list[str], no_instance: str) -> None:
    saved = os.environ.get("CILIARY_DATA_DIR")
    os.environ["CILIARY_DATA_DIR"] = no_instance
    cwd = os.getcwd()
    os.chdir(no_instance)  # nothing a command writes lands in the tree
    try:
        code, stderr = run(argv)
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("CILIARY_DATA_DIR", None)
        else:
            os.environ["CILIARY_DATA_DIR"] = saved
    assert "Traceback" not in stderr, (argv, stderr)
    assert "error: unexpected" not in stderr, (argv, stderr)
    assert code in (0, 1, 2), (argv, code, stderr)
    if code:
        assert "error: " in stderr, (argv, code, stderr)
    assert not any(Path(no_instance).iterdir()) or code == 0, (argv, list(Path(no_instance).iterdir()))
