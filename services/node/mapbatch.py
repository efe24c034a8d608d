"""Whole-map reads with the kernel's batch lookup (``BPF_MAP_LOOKUP_BATCH``).

A key-by-key dump costs two ``bpf()`` calls and a few Python objects per entry; at 200,000
lb4 entries that is seconds of a thread that holds the interpreter lock between calls, so
the event loop waits for the lock after each of its own syscalls. One batch call copies
thousands of entries with the lock released; the entries come back as one key buffer and
one value buffer, sliced into ``bytes`` (what the reconciler's resync learns from).

Invariants:
- ``lookup_batch`` returns every entry of the map or raises ``BatchUnsupported`` (map types
  without batch lookup, e.g. queues, or an old kernel); the caller then dumps key by key.
  Hash maps and, on this kernel, LPM tries have it. Not for per-CPU maps (their values
  come back once per CPU).
  Any other failure raises ``OSError`` with the kernel's errno.
- Like any dump of a map that is being written, the result is not one snapshot: an entry
  added or removed during the call may or may not be in it (the resync copes with that).
- Hash maps resume by bucket: a bucket larger than the batch makes the kernel answer
  ``ENOSPC``, and the batch is doubled and the call repeated (nothing is lost or doubled).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

BPF_MAP_LOOKUP_BATCH = 24
_SYS_BPF = 321  # x86_64
DEFAULT_BATCH = 4096
_TOKEN_SIZE = 64  # opaque resume token: a u32 bucket for hash maps, a key for arrays
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: the kernel's ENOTSUPP


class BatchUnsupported(Exception):
    """The map (or kernel) has no batch lookup."""


class _BatchAttr(ct.Structure):
    # union bpf_attr's ``batch`` member (include/uapi/linux/bpf.h)
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def lookup_batch(map_fd: int, key_size: int, value_size: int,
                 batch: int = DEFAULT_BATCH) -> dict[bytes, bytes]:
    """Every entry of the map behind ``map_fd`` as key bytes -> value bytes."""
    out: dict[bytes, bytes] = {}
    token = max(_TOKEN_SIZE, key_size)
    tokens = (ct.create_string_buffer(token), ct.create_string_buffer(token))
    first, turn = True, 0
    while True:
        keys = ct.create_string_buffer(key_size * batch)
        values = ct.create_string_buffer(value_size * batch)
        attr = _BatchAttr(
            in_batch=0 if first else ct.addressof(tokens[turn]),
            out_batch=ct.addressof(tokens[1 - turn]),
            keys=ct.addressof(keys), values=ct.addressof(values), count=batch, map_fd=map_fd)
        rc = _libc.syscall(_SYS_BPF, BPF_MAP_LOOKUP_BATCH, ct.byref(attr), ct.sizeof(attr))
        err = ct.get_errno() if rc < 0 else 0
        if err == errno.ENOSPC and attr.count == 0:
            batch *= 2  # one bucket holds more than a batch: ask again for more
            continue
        if err in _UNSUPPORTED and first:
            raise BatchUnsupported(os.strerror(err))
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        got = attr.count
        kraw, vraw = keys.raw, values.raw
        for i in range(got):
            out[kraw[i * key_size:(i + 1) * key_size]] = vraw[i * value_size:(i + 1) * value_size]
        if err == errno.ENOENT:  # the last batch (possibly empty)
            return out
        first, turn = False, 1 - turn


__all__ = ["BatchUnsupported", "DEFAULT_BATCH", "lookup_batch"]
