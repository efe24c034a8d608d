"""The public event API: JSON on NATS under ``ciliary.events.>`` for any NATS client.

``subjects`` names the topics and subjects and reads the ``CILIARY_EVENTS`` setting;
``payloads`` builds every message body (pure); ``interest`` keeps the leases subscribers
declare (pure); ``publisher`` is the asyncio side a service runs. docs/events.md and
docs/asyncapi.yaml describe the API for consumers.

Invariants:
- Nothing is published for a topic that is neither enabled by the setting nor leased by a
  subscriber; checking costs one dictionary lookup and a clock read.
- Payloads are JSON (UTF-8), never msgpack: flows are the exact lines of
  ``ciliary observe -o json``, change events carry ``"version": 1``.
"""
