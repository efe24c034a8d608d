"""Handing back the memory that compiling the datapath left resident in the node executor.

bcc compiles the tc programs with clang and LLVM inside this process; afterwards nothing
runs their code until the next compile, yet their pages (~80 MiB of libLLVM, libclang and
libbcc) stay mapped and resident, and the compile's freed heap stays with the allocator.

Invariants:
- ``compiler_ranges`` is pure: the address ranges of the compiler's libraries in a
  ``/proc/<pid>/maps`` text.
- ``release_compiler_memory`` asks the kernel to page those ranges out
  (``madvise(MADV_PAGEOUT)``: clean file pages, dropped from this process only; pages
  another process maps too stay) and returns the heap's free memory to the kernel
  (``malloc_trim``). Nothing is unmapped: a later compile faults the pages back in from the
  page cache or the file, so correctness never depends on it. A failing call is ignored
  and reported as nothing released.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable

COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang|bcc)[^/]*\.so")
MADV_PAGEOUT = 21  # Linux 5.4+


def compiler_ranges(maps_lines: Iterable[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of every mapping of a compiler library."""
    out = []
    for line in maps_lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and COMPILER_LIBRARY.search(parts[5]):
            start, end = parts[0].split("-")
            out.append((int(start, 16), int(end, 16)))
    return out


def resident_mib() -> dict[str, float]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of this process in MiB."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def release_compiler_memory() -> dict[str, float]:
    """Page the compiler's libraries out and trim the heap (blocking: call from a thread);
    the resident memory before and after, in MiB."""
    before = resident_mib()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        with open("/proc/self/maps") as maps:
            for start, end in compiler_ranges(maps):
                libc.madvise(start, end - start, MADV_PAGEOUT)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return {"rss_before_mib": before.get("VmRSS", 0.0), "rss_after_mib": before.get("VmRSS", 0.0)}
    after = resident_mib()
    return {"rss_before_mib": before.get("VmRSS", 0.0), "rss_after_mib": after.get("VmRSS", 0.0)}
