"""The kernel's batch lookup (``services.node.mapbatch``) against key-by-key reads, on real
BPF maps: every entry once, across many batches and when a batch is smaller than a hash
bucket, and on an LPM trie (the ipcache); a map type without batch lookup (a queue) says
so instead of returning a partial dump; and ``BccMapOps.dump_bytes`` gives the bytes of
``dump``."""

from __future__ import annotations

import ctypes as ct

import pytest

from services.node import layouts as L
from services.node import mapbatch
from services.node.maps import BccMapOps

from .conftest import require_privileges

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

N = 20_000


@pytest.fixture(scope="module")
def tables():
    require_privileges()
    from bcc import BPF

    text = f"""
    BPF_HASH(hashed, u64, u64, {2 * N});
    struct lpm_key {{ u32 prefixlen; u32 ip; }};
    BPF_LPM_TRIE(trie, struct lpm_key, u64, 64);
    BPF_QUEUE(queue, u64, 16);
    """
    bpf = BPF(text=text.encode())
    hashed, trie = bpf[b"hashed"], bpf[b"trie"]
    keys = (hashed.Key * N)(*[hashed.Key(i * 7919) for i in range(N)])
    values = (hashed.Leaf * N)(*[hashed.Leaf(i) for i in range(N)])
    hashed.items_update_batch(keys, values)
    for i in range(3):
        trie[trie.Key(32, 0x0A000001 + i)] = trie.Leaf(i)
    yield hashed, trie, bpf[b"queue"]
    bpf.cleanup()


def by_key(table) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in table.items()}


def test_batch_lookup_reads_every_entry_once(tables) -> None:
    hashed, trie, _ = tables
    expected = by_key(hashed)
    assert len(expected) == N
    for batch in (mapbatch.DEFAULT_BATCH, 97, 1):  # many calls; 1 is smaller than most buckets
        got = mapbatch.lookup_batch(hashed.map_fd, ct.sizeof(hashed.Key), ct.sizeof(hashed.Leaf), batch)
        assert got == expected, batch
    got = mapbatch.lookup_batch(trie.map_fd, ct.sizeof(trie.Key), ct.sizeof(trie.Leaf), 2)
    assert got == by_key(trie) and len(got) == 3


def test_a_map_without_batch_lookup_says_so(tables) -> None:
    _, _, queue = tables
    with pytest.raises(mapbatch.BatchUnsupported):
        mapbatch.lookup_batch(queue.map_fd, 8, 8)


def test_dump_bytes_is_dump_as_bytes(tables) -> None:
    hashed, trie, _ = tables
    ops = BccMapOps({L.LB4_BACKENDS: hashed, L.IPCACHE: trie})
    for name, table in ((L.LB4_BACKENDS, hashed), (L.IPCACHE, trie)):
        assert ops.dump_bytes(name) == by_key(table), name
