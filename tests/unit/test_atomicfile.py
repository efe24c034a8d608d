"""ciliary.atomicfile: whole content, the asked mode, nothing left beside the target."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ciliary.atomicfile import write_atomically


def test_replaces_the_file_whole_with_the_asked_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_atomically(path, b"new" * 10_000, 0o600)
    assert path.read_bytes() == b"new" * 10_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]


def test_an_executable_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "plugin"
    write_atomically(path, b"#!/bin/sh\n", 0o755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
