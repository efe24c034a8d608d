"""residency: which mappings are the compiler's, and releasing them keeps the process working."""

from __future__ import annotations

from services.node import residency

MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 123 /usr/bin/python3.11
7f0000000000-7f0002000000 r-xp 00100000 fd:01 456 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0002000000-7f0002100000 r--p 02100000 fd:01 456 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0003000000-7f0003800000 r-xp 00000000 fd:01 789 /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f0004000000-7f0004100000 r-xp 00000000 fd:01 790 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0005000000-7f0005100000 rw-p 00000000 00:00 0 [heap]
7f0006000000-7f0006100000 r-xp 00000000 fd:01 791 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0007000000-7f0007001000 r--p 00000000 fd:01 792 /opt/my libLLVM notes/readme.txt
"""


def test_only_the_compiler_libraries_are_chosen() -> None:
    assert residency.compiler_ranges(MAPS.splitlines()) == [
        (0x7F0000000000, 0x7F0002000000), (0x7F0002000000, 0x7F0002100000),
        (0x7F0003000000, 0x7F0003800000), (0x7F0004000000, 0x7F0004100000),
    ]


def test_releasing_reports_the_resident_memory_before_and_after() -> None:
    released = residency.release_compiler_memory()
    assert set(released) == {"rss_before_mib", "rss_after_mib"}
    assert released["rss_before_mib"] > 0 and released["rss_after_mib"] > 0
