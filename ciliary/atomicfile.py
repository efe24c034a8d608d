"""Writing a file so that a reader sees the old content or the new one, never half of it.

Invariants: the data goes to a temporary name beside the target, created with the final
mode from the start (a secret is never readable by others, not even for a moment), and is
then renamed over the target. The caller creates the directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it, never widened
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    tmp.replace(path)


__all__ = ["write_atomically"]
