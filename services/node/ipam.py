"""Host-local IP address management for one node's pod CIDR.

Invariants:
- State lives in a directory (one per node): one file per allocated IP, named by the IP,
  holding ``<container id>\\n<ifname>``, plus ``last_reserved_ip``. This is the layout of
  the CNI host-local plugin, so an operator can read it the same way.
- Every operation holds an exclusive ``flock`` on the directory's lock file, so concurrent
  CNI invocations never hand out one IP twice; a restart re-reads the files, so a
  restart never hands out an allocated IP either.
- Allocation is round-robin from the address after ``last_reserved_ip``; the network
  address, the broadcast address and the first host address (reserved as the node's
  gateway identity) are never allocated.
- ``release`` by container id is idempotent.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LAST_RESERVED = "last_reserved_ip"
LOCK = "lock"


class IPAMError(Exception):
    """No address can be allocated (pool exhausted or bad configuration)."""


class HostLocalIPAM:
    def __init__(self, state_dir: Path | str, subnet: str) -> None:
        self.dir = Path(state_dir)
        try:
            self.subnet = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as err:
            raise IPAMError(f"invalid subnet {subnet!r}: {err}") from err
        if self.subnet.num_addresses < 4:
            raise IPAMError(f"subnet {subnet} is too small for pods")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _allocated(self) -> dict[str, str]:
        """IP → container id for every allocation on disk."""
        out: dict[str, str] = {}
        for path in self.dir.iterdir():
            if path.name in (LAST_RESERVED, LOCK) or path.name.endswith(".tmp"):
                continue
            try:
                ipaddress.IPv4Address(path.name)
            except ValueError:
                continue
            out[path.name] = path.read_text().split("\n", 1)[0]
        return out

    def _candidates(self, after: ipaddress.IPv4Address | None) -> Iterator[ipaddress.IPv4Address]:
        first = self.subnet.network_address + 2  # .1 is the node's own address
        last = self.subnet.broadcast_address - 1
        span = int(last) - int(first) + 1
        start = 0
        if after is not None and first <= after <= last:
            start = int(after) - int(first) + 1
        for i in range(span):
            yield ipaddress.IPv4Address(int(first) + (start + i) % span)

    def allocate(self, container_id: str, ifname: str = "eth0") -> str:
        """The IP for ``container_id`` (the same one again if it already has one)."""
        if not container_id:
            raise IPAMError("container id is empty")
        with self._locked():
            allocated = self._allocated()
            for ip, owner in allocated.items():
                if owner == container_id:
                    return ip
            last_path = self.dir / LAST_RESERVED
            after = None
            if last_path.exists():
                try:
                    after = ipaddress.IPv4Address(last_path.read_text().strip())
                except ValueError:
                    after = None
            for candidate in self._candidates(after):
                ip = str(candidate)
                if ip in allocated:
                    continue
                tmp = self.dir / f"{ip}.tmp"
                tmp.write_text(f"{container_id}\n{ifname}")
                os.replace(tmp, self.dir / ip)
                last_path.write_text(ip)
                return ip
        raise IPAMError(f"no free address left in {self.subnet}")

    def release(self, container_id: str) -> list[str]:
        """Free every IP held by ``container_id``; returns them (empty when none)."""
        freed: list[str] = []
        with self._locked():
            for ip, owner in self._allocated().items():
                if owner == container_id:
                    (self.dir / ip).unlink(missing_ok=True)
                    freed.append(ip)
        return freed

    def lookup(self, container_id: str) -> str | None:
        with self._locked():
            for ip, owner in self._allocated().items():
                if owner == container_id:
                    return ip
        return None

    def allocations(self) -> dict[str, str]:
        with self._locked():
            return self._allocated()
