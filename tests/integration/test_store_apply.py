"""``ResourceStore.apply`` on a real nats-server: the pipelined writes stay all-or-nothing."""

from __future__ import annotations

import pytest

from ciliary import schema
from ciliary.bus import Bus, BusError
from ciliary.resources import Resource, loads
from ciliary.store import ResourceStore, kv_key

RES = schema.BUCKET_RESOURCES


def services(n: int, *, port: int = 80) -> list[Resource]:
    return loads("---\n".join(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05d}, namespace: bulk}}\n"
        f"spec:\n  ports:\n  - {{port: {port}}}\n" for i in range(n)))


class RacedStore(ResourceStore):
    """A store whose reads are followed by someone else's write of ``key``."""

    def __init__(self, bus: Bus, key: str, value: bytes) -> None:
        super().__init__(bus)
        self.key, self.value = key, value

    async def _read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        found = await super()._read(*args, **kwargs)
        await self.bus.kv_put(RES, self.key, self.value)
        return found


async def test_a_conflict_in_the_middle_of_a_pipelined_apply_rolls_everything_back(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        await ResourceStore(bus).apply(services(1000))  # these get updated, the rest created
        before = {k: (e.revision, e.value) for k, e in (await bus.kv_list(RES)).items()}
        target = kv_key("Service", "bulk", "svc-01500")
        store = RacedStore(bus, target, b"theirs")
        with pytest.raises(BusError, match=r"^apply failed, nothing changed: Service bulk/svc-01500: "
                                           r"it changed since it was read"):
            await store.apply(services(3000, port=81))
        after = {k: (e.revision, e.value) for k, e in (await bus.kv_list(RES)).items()}
        assert after.pop(target)[1] == b"theirs"
        assert {k: v for k, (_, v) in after.items()} == {k: v for k, (_, v) in before.items()}
        assert all(after[k][0] > before[k][0] for k in before), "each update was written, then put back"
        # nothing is half-applied: the same apply without the race goes through
        results = await ResourceStore(bus).apply(services(3000, port=81)[:1500])
        assert {r.action for r in results[:1000]} == {"configured"}
        assert {r.action for r in results[1000:]} == {"created"}
    finally:
        await bus.close()
