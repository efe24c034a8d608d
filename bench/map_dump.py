"""Reading a whole BPF hash map: the kernel's batch lookup against key by key, and what a
dump thread costs the event loop beside it.

A real BPF hash map (bcc, in this process; nothing attached, no packet involved) is filled
with N u64 -> u64 entries. Per N:

- ``dump``: median wall time of reading every entry as bytes, key by key (bcc's ``items()``,
  what the node executor's resync did) and by ``mapbatch.lookup_batch`` (what it does now);
  both results are checked equal;
- ``loop``: 800 single map updates on the event loop, each followed by a yield, alone and
  while a thread dumps the map each way (what a burst of changes meets during a resync).

The ratio columns are batch / key by key. Needs root (bpf()).

Usage: .venv/bin/python bench/map_dump.py [--sizes 50000,200000,400000] [--repeat 3]
Writes bench/results/map_dump.json (with the git commit and whether the tree was dirty).
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import output  # noqa: E402
from services.node import mapbatch  # noqa: E402

RESULTS = REPO / "bench" / "results" / "map_dump.json"
UPDATES = 800


def measure(n: int, repeat: int) -> dict[str, Any]:
    from bcc import BPF

    bpf = BPF(text=f"BPF_HASH(m, u64, u64, {2 * n});".encode())
    try:
        table = bpf[b"m"]
        keys = (table.Key * n)(*[table.Key(i * 7919) for i in range(n)])
        values = (table.Leaf * n)(*[table.Leaf(i) for i in range(n)])
        table.items_update_batch(keys, values)

        def by_key() -> dict[bytes, bytes]:
            return {bytes(k): bytes(v) for k, v in table.items()}

        def by_batch() -> dict[bytes, bytes]:
            return mapbatch.lookup_batch(table.map_fd, ct.sizeof(table.Key), ct.sizeof(table.Leaf))

        assert by_key() == by_batch()
        out: dict[str, Any] = {"entries": n}
        for name, dump in (("key_by_key", by_key), ("batch", by_batch)):
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                dump()
                times.append(time.perf_counter() - t)
            out[f"dump_{name}_s"] = round(statistics.median(times), 4)

        async def updates() -> float:
            t = time.perf_counter()
            for i in range(UPDATES):
                table[table.Key(2 * n + i)] = table.Leaf(i)
                await asyncio.sleep(0)
            return time.perf_counter() - t

        async def loop_beside(dump: Any) -> float:
            if dump is None:
                return await updates()
            task = asyncio.ensure_future(asyncio.to_thread(dump))
            await asyncio.sleep(0.01)  # the thread is reading
            took = await updates()
            await task
            return took

        for name, dump in (("alone", None), ("key_by_key", by_key), ("batch", by_batch)):
            out[f"loop_{name}_ms"] = round(asyncio.run(loop_beside(dump)) * 1000, 2)
        return out
    finally:
        bpf.cleanup()


def render(res: dict[str, Any]) -> str:
    rows = [[f"{r['entries']:,}", r["dump_key_by_key_s"], r["dump_batch_s"],
             round(r["dump_batch_s"] / r["dump_key_by_key_s"], 3),
             r["loop_alone_ms"], r["loop_key_by_key_ms"], r["loop_batch_ms"]] for r in res["sizes"]]
    return output.table(["entries", "dump key by key s", "dump batch s", "batch / key by key",
                         f"{UPDATES} updates alone ms", "beside key-by-key dump ms",
                         "beside batch dump ms"], rows)


def main() -> int:
    return S.sized_bench(__doc__, "bench/map_dump.py", measure, render, sizes="50000,200000,400000", repeat=3,
                         results=RESULTS)


if __name__ == "__main__":
    sys.exit(main())
