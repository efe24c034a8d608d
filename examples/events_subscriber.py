"""A plain nats-py subscriber of ciliary's public event API (no ciliary import).

Declares interest in the topics it wants (a lease on ``ciliary.events.interest``, renewed
at a third of its lifetime), subscribes to ``ciliary.events.>`` and prints one JSON object
per line: ``{"subject": ..., "event": ...}``, one line per flow for flow messages (each
line of a flow message is a Hubble ``GetFlowsResponse``). See docs/events.md.

    python examples/events_subscriber.py --url nats://127.0.0.1:4222 --topics flows,services

With a bus that requires credentials (``ciliary up`` writes them), pass the read-only
observer's: ``--creds <data-dir>/nats-creds/observer.json`` (an nkey seed and the inbox
prefix the user may receive replies on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import nats


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--topics", default="", help="comma list (default: every topic)")
    parser.add_argument("--ttl", type=float, default=30.0, help="lease seconds")
    parser.add_argument("--no-lease", action="store_true", help="subscribe without declaring interest")
    parser.add_argument("--creds", default="", help="a ciliary NATS credential file (JSON: seed, inbox_prefix)")
    args = parser.parse_args()

    auth = {}
    if args.creds:
        with open(args.creds) as f:
            cred = json.load(f)
        auth = {"nkeys_seed_str": cred["seed"], "inbox_prefix": cred["inbox_prefix"]}
    nc = await nats.connect(args.url, **auth)

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        if msg.subject == "ciliary.events.interest":  # leases, ours and others'
            return
        if msg.subject.startswith("ciliary.events.flows."):
            events = [json.loads(line) for line in msg.data.splitlines()]
        else:
            events = [json.loads(msg.data)]
        for event in events:
            print(json.dumps({"subject": msg.subject, "event": event}), flush=True)

    await nc.subscribe("ciliary.events.>", cb=on_event)
    await nc.flush()
    lease = {"topics": [t for t in args.topics.split(",") if t], "ttl_s": args.ttl}
    print(json.dumps({"subscribed": True}), flush=True)
    while True:
        if not args.no_lease:
            await nc.publish("ciliary.events.interest", json.dumps(lease).encode())
            await nc.flush()
        await asyncio.sleep(args.ttl / 3)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
