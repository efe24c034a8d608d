"""Compile and run a small C program against ``bpf/lib`` (layout and hash twins).

Without a C compiler the calling test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BPF_LIB = Path(__file__).resolve().parents[2] / "bpf" / "lib"


def run_c_program(source: str, workdir: Path) -> str:
    """Build ``source`` with ``-Wall -Werror -I bpf/lib`` in ``workdir`` and return its stdout."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C compiler (gcc) on PATH (CI=true: not skipping)")
        pytest.skip("no C compiler (gcc) on PATH")
    src, exe = workdir / "prog.c", workdir / "prog"
    src.write_text(source)
    subprocess.run([gcc, "-Wall", "-Werror", "-I", str(BPF_LIB), "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
