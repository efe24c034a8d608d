"""``python -m ciliary.deploy.provision``: the Job that creates the buckets of an installation.

With NATS authorization on, only ``admin`` may create buckets (the services may only look
them up), as the supervisor does for ``ciliary up``. This Job connects as ``admin``
(``CILIARY_NATS_CREDS``) to ``CILIARY_NATS_URL`` and creates, with ``CILIARY_JS_REPLICAS``
copies, every bucket that does not exist yet, and the built-in namespaces.

Invariants:
- Idempotent: existing buckets and keys are kept, so it runs again on every install and
  upgrade.
- Waits for NATS up to ``--timeout`` seconds (the StatefulSet may still be forming its
  JetStream quorum), then exits 1 with one line naming what did not answer; a bad
  credential is one line naming the file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from ciliary import config, natscreds
from ciliary.bus import Bus, BusError
from ciliary.supervisor import create_builtin_namespaces


async def provision(url: str, creds: str, timeout: float) -> None:
    credential = natscreds.read_credential(creds) if creds else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            bus = await Bus.connect(url, "ciliary-provision", allow_reconnect=False, credential=credential)
            try:
                await bus.ensure_buckets()
                await create_builtin_namespaces(bus)
            finally:
                await bus.close()
            return
        except BusError as err:
            if "authorization violation" in str(err) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(2)
        except Exception as err:  # JetStream not ready yet (no quorum, no leader)
            if time.monotonic() > deadline:
                raise BusError(f"NATS at {url}: buckets not created within {timeout:.0f}s: "
                               f"{type(err).__name__}: {err}") from None
            await asyncio.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.deploy.provision")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    url = os.environ.get(config.ENV_NATS_URL, "nats://127.0.0.1:4222")
    try:
        asyncio.run(provision(url, os.environ.get(config.ENV_NATS_CREDS, ""), args.timeout))
    except (BusError, natscreds.CredentialError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"buckets of {url} provisioned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
