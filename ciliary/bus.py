"""The one module that talks to NATS.

Invariants:
- Every NATS call in the project goes through ``Bus``; services and the CLI never import
  ``nats`` themselves (an import-linter contract holds this). Handlers receive a
  ``Message`` of this module, never a nats object. Tests fake the bus at this module
  (``ciliary.testing.FakeBus``).
- Every published message, request, reply and KV write carries the current OpenTelemetry
  trace context in its headers (see ``ciliary.telemetry``); a subscription handler runs
  under the context its message was sent in.
- ``watch`` is level-triggered: it yields the full current state of the bucket (one
  ``put`` per live key), then ``SYNCED``, then changes. After a reconnect it re-reads the
  bucket, yields ``delete`` for keys that vanished while disconnected, ``put`` for every
  live key, and ``SYNCED`` again; consumers therefore must treat events idempotently.
  A bucket keeps one value per key, so a value overwritten before the server delivered it
  is never seen: a watch reports the latest state of every key, not every write.
- ``kv_put_many`` is ``kv_put`` for each key (compare-and-set, delete markers) with a
  bounded number of writes unacknowledged; it stops at the first failure and reports
  what was written. Over NATS it publishes back to back with one reply subscription for
  the acknowledgements; a subclass with its own ``kv_put`` gets it through that.
- Payloads that fail to decode are logged and skipped, never raised into a service loop.
- With a credential (``ciliary.config.NatsCredential``) the connection authenticates with
  its nkey and receives replies under the credential's inbox prefix; when the credential
  names a CA the connection is TLS and the server must present a certificate it signed.
  A refused credential is a ``BusError`` naming the user. A write, delete, get, request or watch
  the server's permissions refuse raises ``PermissionDenied`` (a ``BusError`` naming the
  user and the subject) as soon as the server reports it; a refused plain publish or
  subscription is logged as a warning. Either way the connection stays up.
- ``read_stream`` reads a fixed range of a stream (from a start time or sequence up to the
  last sequence when it starts) through its own ephemeral pull consumer, one fetched batch
  at a time, and deletes the consumer when the reading ends, however it ends.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
from nats import micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api

from ciliary import config, schema, telemetry
from ciliary.config import NatsCredential
from ciliary.kv import SYNCED, KVEntry, Synced

log = logging.getLogger(__name__)


class _TLSCloseNotice(logging.Filter):
    """asyncio's notice that a TLS peer closed its side first, logged on every closed TLS
    connection to NATS: not a problem, only noise on the CLI's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_TLSCloseNotice())

T = TypeVar("T")

KV_OPERATION = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"



def _take_rotated_seed(nc: Client, path: Path, in_use: str) -> str:
    """The seed the connection signs its next (re)connect with: the one in ``path`` now.
    nats-py fixes the public key it presents at the first connect, so a new seed is set
    together with its public key (nats-py's ``_nkeys_seed_str`` / ``_public_nkey``; the
    rotation test in tests/integration/test_nats_rotation.py fails if that changes)."""
    try:
        current = msgspec.json.decode(path.read_bytes(), type=NatsCredential)
        public_key = nkeys.from_seed(bytearray(current.seed.encode())).public_key.decode()
    except (OSError, msgspec.DecodeError, nkeys.NkeysError, ValueError) as err:
        log.warning("keeping the NATS key in use: credential %s: %s", path, err)
        return in_use
    if current.seed == in_use:
        return in_use
    nc._nkeys_seed_str = current.seed
    nc._public_nkey = public_key
    log.info("NATS credential %s holds a new key: reconnecting with it", path)
    return current.seed

class BusError(Exception):
    """A bus operation failed in a way the caller should report."""


class PermissionDenied(BusError):
    """The server refused this connection's user an operation on a subject."""


class BucketMissing(BusError):
    """The KV bucket does not exist (yet: the services of an instance create their buckets
    when they start)."""


class BusTimeout(BusError, TimeoutError):
    """NATS did not answer an operation in time (still a ``TimeoutError`` for callers that
    retry on one). A write that timed out may have been stored."""


DENIAL_PREFIX = "permissions violation for "


def denied_subject(error_text: str) -> tuple[str, str] | None:
    """``("publish" | "subscription", subject)`` of a server permissions violation (its
    text as nats-py reports it, lower-cased), or None for any other error."""
    text = error_text.removeprefix("nats: ").strip().strip("'")
    if not text.lower().startswith(DENIAL_PREFIX):
        return None
    what, _, subject = text[len(DENIAL_PREFIX):].partition(" to ")
    subject = subject.strip().split(" ")[0].strip('"')
    if not subject:
        return None
    return ("subscription" if what.startswith("subscri") else "publish"), subject


class RevisionMismatch(BusError):
    """Compare-and-set failed: the key changed (or exists) since the given revision."""


class PutManyError(BusError):
    """``kv_put_many`` stopped: ``key`` is the first write that failed and ``__cause__``
    what it raised (a ``RevisionMismatch`` for a lost compare-and-set); ``failed`` holds
    every failed key with its error, ``written`` every key written with its new revision.
    A failed write that is not a ``RevisionMismatch`` may still have been stored."""

    def __init__(self, message: str, *, key: str, failed: dict[str, Exception],
                 written: dict[str, int]) -> None:
        super().__init__(message)
        self.key = key
        self.failed = failed
        self.written = written


class StreamMessage(msgspec.Struct, frozen=True):
    """One stored message of a stream, as ``read_stream`` yields it."""

    seq: int  # stream sequence
    time_ns: int  # when the server stored it (unix ns)
    subject: str
    data: bytes


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


JS_API = "$JS.API"
DENIED_RETRY = 10.0  # seconds between attempts of a watch the server's permissions refuse
# seconds a one-shot listing waits for its consumer's next message before it reads the
# bucket again with a new consumer (a listing must end, never wait on a consumer that stopped)
LISTING_STALL = 5.0
LISTING_ATTEMPTS = 3
# seconds `close` waits for subscriptions to hand over what the server already sent; a
# watch whose reader stopped never empties its queue, and nats-py's default (30 s) would
# hold a stopping service that long
DRAIN_TIMEOUT = 2


def _kv_reads(bucket: str) -> tuple[str, ...]:
    """The JetStream API subjects a get or a watch of ``bucket`` publishes to."""
    stream = kv_stream(bucket)
    return (f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.STREAM.MSG.GET.{stream}",
            f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.INFO.{stream}")


class Bus:
    """A reconnecting NATS connection with typed KV, pub/sub and request helpers."""

    def __init__(self, nc: Client, name: str, user: str = "") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.user = user  # the NATS user of the credential ("" without one)
        self._reconnected = asyncio.Event()
        self.reconnects = 0
        self._kv_handles: dict[str, Any] = {}
        self.closing = False
        self.denials = 0  # operations the server's permissions refused
        # operations waiting for an answer: (subject they publish to, lower-cased; what to
        # call with the subject when the server refuses a publish to it or under it)
        self._denial_waiters: list[tuple[str, Callable[[str], None]]] = []
        self.replicas = config.js_replicas()  # of the buckets and streams this bus creates

    # ------------------------------------------------------------------ permissions

    def _on_denied(self, action: str, subject: str) -> None:
        self.denials += 1
        log.warning("NATS refused %s %s to %s", f"user {self.user}" if self.user else self.name,
                    action, subject)
        if action != "publish":
            return
        refused = subject.lower()
        for prefix, notify in list(self._denial_waiters):
            if refused == prefix or refused.startswith(prefix + "."):
                notify(subject)

    def _denied_error(self, subject: str) -> PermissionDenied:
        who = f"NATS user {self.user}" if self.user else f"connection {self.name}"
        return PermissionDenied(f"permission denied: {who} may not publish to {subject}")

    async def _refusable(self, subjects: str | tuple[str, ...], work: Awaitable[T]) -> T:
        """``work`` (an operation publishing to one of ``subjects`` or a subject under
        one), or ``PermissionDenied`` as soon as the server refuses this user that publish."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        wanted = (subjects,) if isinstance(subjects, str) else subjects

        def notify(refused: str) -> None:  # the server's text is lower-cased: name ours
            if not waiter.done():
                waiter.set_result(next((s for s in wanted if s.lower() == refused.lower()), refused))

        entries = [(s.lower(), notify) for s in wanted]
        self._denial_waiters.extend(entries)
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                try:
                    return task.result()
                except nats.errors.TimeoutError as err:
                    raise BusTimeout(
                        f"NATS did not answer in time ({wanted[0]}): the server is overloaded, or "
                        f"(on a replicated bus, for ~10 s after one of its servers was lost) a "
                        f"JetStream leader is being elected; retry") from err
            raise self._denied_error(waiter.result())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            waiter.cancel()
            for entry in entries:
                self._denial_waiters.remove(entry)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        connect_timeout: float = 2.0,
        max_reconnect_attempts: int = -1,
        allow_reconnect: bool = True,
        credential: NatsCredential | None = None,
        credential_path: str | Path | None = None,
    ) -> Bus:
        """Connect (as ``credential``'s user when given), retrying forever on disconnect
        unless told otherwise. Without reconnects (``allow_reconnect=False``: the CLI, the
        CNI plugin) a first connect that reaches no server raises ``BusError`` after trying
        each server twice, instead of waiting for one. With ``credential_path`` (the file
        ``credential`` was read from) every reconnect first reads the file again, so a
        rotated key (``ciliary.natsrotate``) is used without a restart."""
        bus: Bus | None = None
        who = f"user {credential.user}" if credential else "a connection without credential"
        seed_in_use = credential.seed if credential else ""

        async def on_reconnect() -> None:
            if bus is not None:
                bus.reconnects += 1
                bus._reconnected.set()
                bus._reconnected = asyncio.Event()
                log.info("reconnected to %s", url)

        async def on_disconnect() -> None:
            nonlocal seed_in_use
            if bus is not None and not bus.closing:
                log.warning("disconnected from %s", url)
                if credential_path:
                    seed_in_use = _take_rotated_seed(bus.nc, Path(credential_path), seed_in_use)

        async def on_error(err: Exception) -> None:
            denied = denied_subject(str(err)) if isinstance(err, nats.errors.Error) else None
            if denied is not None and bus is not None:
                bus._on_denied(*denied)
            elif isinstance(err, nats.errors.AuthorizationError):
                log.error("NATS at %s refused %s: authorization violation", url, who)
            else:
                log.debug("nats error: %s", err)

        auth: dict[str, Any] = {}
        if credential is not None:
            auth = {"nkeys_seed_str": credential.seed, "inbox_prefix": credential.inbox_prefix}
            if credential.tls_ca:
                try:
                    auth["tls"] = ssl.create_default_context(cafile=credential.tls_ca)
                except (OSError, ssl.SSLError) as err:
                    raise BusError(f"NATS TLS CA {credential.tls_ca}: {err}") from err
        if not allow_reconnect and max_reconnect_attempts < 0:
            # nats-py retries its first connect as often as reconnects: forever by default;
            # a connection that does not reconnect tries each server twice, then fails
            max_reconnect_attempts = 1
        try:
            nc = await nats.connect(
                servers=[u.strip() for u in url.split(",") if u.strip()],  # a cluster: several
                name=name,
                connect_timeout=connect_timeout,
                allow_reconnect=allow_reconnect,
                max_reconnect_attempts=max_reconnect_attempts,
                reconnect_time_wait=0.5,
                drain_timeout=DRAIN_TIMEOUT,
                reconnected_cb=on_reconnect,
                disconnected_cb=on_disconnect,
                error_cb=on_error,
                **auth,
            )
        except (TimeoutError, OSError, nats.errors.Error) as err:
            if isinstance(err, nats.errors.AuthorizationError) or "authorization violation" in str(err).lower():
                raise BusError(f"NATS at {url} refused {who}: authorization violation") from err
            raise BusError(f"cannot connect to NATS at {url}: {err}") from err
        bus = cls(nc, name, credential.user if credential else "")
        return bus

    async def close(self) -> None:
        self.closing = True
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # draining a broken connection: closing is enough
                try:
                    await self.nc.close()
                except (OSError, nats.errors.Error):  # the server is gone: nothing left to close
                    pass

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # ------------------------------------------------------------------ provisioning

    async def ensure_buckets(self, buckets: tuple[str, ...] = schema.ALL_BUCKETS, *,
                             timeout: float = 60.0) -> None:
        """Create the KV buckets (file storage, ``replicas`` copies) that do not exist yet.
        A create the server refuses (another process created the bucket at the same moment,
        or a JetStream cluster cannot place its copies yet) is retried until the bucket
        exists, for up to ``timeout`` seconds; then ``BusError`` names the bucket."""
        loop = asyncio.get_running_loop()
        for bucket in buckets:
            deadline = loop.time() + timeout
            while True:
                try:
                    await self.js.key_value(bucket)
                    break
                except nats.js.errors.BucketNotFoundError:
                    pass
                try:
                    await self.js.create_key_value(
                        js_api.KeyValueConfig(
                            bucket=bucket, history=1, storage=js_api.StorageType.FILE,
                            replicas=self.replicas,
                        )
                    )
                    break
                except nats.js.errors.BadRequestError as err:
                    if loop.time() >= deadline:
                        raise BusError(f"KV bucket {bucket!r} could not be created: {err}") from err
                    log.info("KV bucket %s not created yet (%s); retrying", bucket, err)
                    await asyncio.sleep(0.25)

    async def ensure_stream(
        self, name: str, subjects: list[str], *, max_bytes: int, max_age_s: float
    ) -> None:
        config = js_api.StreamConfig(
            name=name,
            subjects=subjects,
            storage=js_api.StorageType.FILE,
            num_replicas=self.replicas,
            max_bytes=max_bytes,
            max_age=max_age_s,
            discard=js_api.DiscardPolicy.OLD,
        )
        try:
            await self.js.stream_info(name)
            await self.js.update_stream(config)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)

    # ------------------------------------------------------------------ streams

    async def stream_last_seq(self, name: str) -> int:
        """The stream's last sequence (0 when empty). Raises ``BusError`` if it is missing."""
        try:
            info = await self.js.stream_info(name)
        except (TimeoutError, nats.errors.Error) as err:
            raise BusError(f"stream {name}: {err}") from err
        return info.state.last_seq if info.state.messages else 0

    async def stream_last_message(self, name: str, subject: str) -> StreamMessage | None:
        """The last message stream ``name`` stores on ``subject`` (no wildcards); ``None``
        when it stores none there or the stream is missing. Raises ``BusError`` if the
        server does not answer or refuses."""
        try:
            msg = await self._refusable(f"{JS_API}.STREAM.MSG.GET.{name}", self.js.get_last_msg(name, subject))
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as err:
            raise BusError(f"stream {name}, last message on {subject}: {err}") from err
        stored = msg.time.timestamp() if msg.time is not None else 0.0
        return StreamMessage(msg.seq or 0, int(stored * 1e6) * 1000, msg.subject or subject, msg.data or b"")

    async def read_stream(
        self,
        name: str,
        subject: str = ">",
        *,
        start_time_ns: int = 0,
        start_seq: int = 0,
        end_seq: int = 0,
        batch: int = 16,
        fetch_timeout: float = 2.0,
    ) -> AsyncIterator[list[StreamMessage]]:
        """Stored messages of stream ``name`` on ``subject``, oldest first, in fetched
        batches of at most ``batch``: from ``start_seq``, else from ``start_time_ns``, else
        from the first one, up to ``end_seq`` (0: the last sequence when reading starts).
        Messages the stream discards meanwhile are skipped. Raises ``BusError`` if the
        stream is missing or the server stops answering."""
        last = end_seq or await self.stream_last_seq(name)
        if last == 0 or (start_seq and start_seq > last):
            return
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=30,  # an abandoned consumer disappears on its own
            mem_storage=True,
        )
        if start_seq:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_seq
        elif start_time_ns:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.datetime.fromtimestamp(
                start_time_ns / 1e9, datetime.UTC)
        else:
            config.deliver_policy = js_api.DeliverPolicy.ALL
        try:
            sub = await self._refusable(f"{JS_API}.CONSUMER.CREATE.{name}",
                                        self.js.pull_subscribe(subject, stream=name, config=config))
        except (TimeoutError, nats.errors.Error) as err:
            raise BusError(f"read stream {name}: {err}") from err
        consumer = getattr(sub, "_consumer", None)
        try:
            if (await sub.consumer_info()).num_pending == 0:
                return
            done = False
            while not done:
                try:
                    msgs = await sub.fetch(batch, timeout=fetch_timeout)
                except nats.errors.TimeoutError:
                    return  # nothing left (the rest was discarded by the stream's limits)
                except nats.errors.Error as err:
                    raise BusError(f"read stream {name}: {err}") from err
                out: list[StreamMessage] = []
                for msg in msgs:
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    if seq > last:
                        done = True
                        break
                    out.append(StreamMessage(seq, int(meta.timestamp.timestamp() * 1e6) * 1000,
                                             msg.subject, msg.data))
                    if seq >= last or meta.num_pending == 0:
                        done = True
                        break
                if out:
                    yield out
        finally:
            try:
                await sub.unsubscribe()
                if consumer:  # don't leave it to the inactivity timeout: the server caps consumers
                    await self.js.delete_consumer(name, consumer)
            except Exception:  # connection may be gone; the consumer expires on its own
                pass

    # ------------------------------------------------------------------ KV

    async def _kv(self, bucket: str) -> Any:
        handle = self._kv_handles.get(bucket)
        if handle is None:
            try:
                handle = await self._refusable(f"{JS_API}.STREAM.INFO.{kv_stream(bucket)}",
                                               self.js.key_value(bucket))
            except nats.js.errors.BucketNotFoundError as err:
                raise BucketMissing(f"KV bucket {bucket!r} does not exist") from err
            self._kv_handles[bucket] = handle
        return handle

    async def kv_get(self, bucket: str, key: str, *, deleted: bool = False) -> KVEntry | None:
        """The live entry for ``key``, or None when absent or deleted. With ``deleted`` a
        deleted key gives its delete marker (``value`` None, the marker's revision), which a
        writer can create over with one compare-and-set instead of a refused create and a
        retry."""
        kv = await self._kv(bucket)
        try:
            entry = await self._refusable(_kv_reads(bucket), kv.get(key))
        except nats.js.errors.KeyNotFoundError as err:  # also covers KeyDeletedError
            marker = getattr(err, "entry", None)
            if deleted and marker is not None and marker.revision:
                return KVEntry(bucket, key, marker.revision, None)
            return None
        return KVEntry(bucket, key, entry.revision or 0, entry.value)

    async def kv_get_record(self, bucket: str, key: str, type_: type[T]) -> tuple[T, int] | None:
        entry = await self.kv_get(bucket, key)
        if entry is None or entry.value is None:
            return None
        return schema.decode(entry.value, type_), entry.revision

    async def kv_put(
        self, bucket: str, key: str, record: Any, *, last_revision: int | None = None
    ) -> int:
        """Write ``record``; with ``last_revision`` it is a compare-and-set (0 = must not exist).

        Returns the new revision. Raises ``RevisionMismatch`` when the CAS fails.
        """
        data = record if isinstance(record, bytes) else schema.encode(record)
        headers = telemetry.inject_headers()
        if last_revision is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
        try:
            ack = await self._refusable(kv_subject(bucket, key), self.js.publish(
                kv_subject(bucket, key), data, headers=headers or None))
        except nats.js.errors.APIError as err:
            if err.err_code in (10071, 10164):
                if last_revision == 0:
                    # the key may exist only as a delete marker: retry against that revision
                    deleted_rev = await self._deleted_revision(bucket, key)
                    if deleted_rev is not None:
                        return await self.kv_put(bucket, key, record, last_revision=deleted_rev)
                raise RevisionMismatch(f"{bucket}/{key}: revision changed") from err
            raise BusError(f"write {bucket}/{key}: {err}") from err
        except (nats.js.errors.NoStreamResponseError, nats.errors.MaxPayloadError) as err:
            raise BusError(f"write {bucket}/{key}: {err or type(err).__name__}") from err
        return ack.seq

    async def kv_put_many(
        self,
        bucket: str,
        items: Iterable[tuple[str, Any, int | None]],
        *,
        concurrency: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, int]:
        """Write every ``(key, record, last_revision)`` of ``items`` as ``kv_put`` does
        (``last_revision`` None: unconditional), keeping up to ``concurrency`` writes in
        flight instead of waiting a round trip per key, started in item order. Keys must
        be distinct. Returns each key's new revision; ``progress`` gets the number written
        so far after each write.

        At the first failure no further write is started; the writes in flight finish
        (or time out) and ``PutManyError`` is raised. The writes that succeeded stay:
        undoing them (compare-and-set against ``written``) is the caller's decision.

        Over NATS the writes are published back to back and their acknowledgements come
        to one reply subscription; a subclass with a ``kv_put`` of its own
        (``ciliary.testing.FakeBus``) gets the same semantics through that ``kv_put``."""
        written: dict[str, int] = {}
        failed: dict[str, Exception] = {}
        window = max(1, concurrency)
        if type(self).kv_put is Bus.kv_put:
            creations = await self._put_pipelined(bucket, items, window, progress, written, failed)
            if creations and not failed:  # a create that met a delete marker: kv_put retries it
                await self._put_each(bucket, creations, window, progress, written, failed)
        else:
            await self._put_each(bucket, items, window, progress, written, failed)
        if failed:
            key, err = next(iter(failed.items()))
            raise PutManyError(str(err), key=key, failed=failed,
                               written=written) from err
        return written

    async def _put_each(
        self, bucket: str, items: Iterable[tuple[str, Any, int | None]], window: int,
        progress: Callable[[int], None] | None, written: dict[str, int],
        failed: dict[str, Exception],
    ) -> None:
        """``kv_put`` per item, ``window`` at a time, until one fails."""
        pending = iter(items)

        async def writer() -> None:
            for key, record, last_revision in pending:
                try:
                    written[key] = await self.kv_put(bucket, key, record, last_revision=last_revision)
                except Exception as err:  # reported through PutManyError, whatever it is
                    failed[key] = err
                if failed:
                    return
                if progress is not None:
                    progress(len(written))

        await asyncio.gather(*(writer() for _ in range(window)))

    async def _put_pipelined(
        self, bucket: str, items: Iterable[tuple[str, Any, int | None]], window: int,
        progress: Callable[[int], None] | None, written: dict[str, int],
        failed: dict[str, Exception], *, ack_timeout: float = 5.0,
    ) -> list[tuple[str, Any, int | None]]:
        """Publish every write with up to ``window`` unacknowledged, until one fails; a
        write with no acknowledgement for ``ack_timeout`` seconds fails (it may have been
        stored). Returns the creations refused by a compare-and-set, to retry with
        ``kv_put`` (the key may hold a delete marker)."""
        loop = asyncio.get_running_loop()
        inbox = self.nc.new_inbox()
        pending: dict[str, tuple[str, bytes, int | None]] = {}  # reply token -> write
        creations: list[tuple[str, Any, int | None]] = []
        free = asyncio.Semaphore(window)
        drained = asyncio.Event()
        last_answer = loop.time()

        def settle(token: str, outcome: int | Exception) -> None:
            nonlocal last_answer
            key, data, last_revision = pending.pop(token)
            last_answer = loop.time()
            if isinstance(outcome, int):
                written[key] = outcome
            elif isinstance(outcome, RevisionMismatch) and last_revision == 0:
                creations.append((key, data, 0))
            else:
                failed[key] = outcome
            free.release()
            if not pending:
                drained.set()
            if progress is not None and isinstance(outcome, int):
                progress(len(written))

        async def on_ack(msg: Msg) -> None:
            token = msg.subject[len(inbox) + 1:]
            if token in pending:
                settle(token, _ack_outcome(msg, bucket, pending[token][0]))

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(ack_timeout / 4)
                if pending and loop.time() - last_answer > ack_timeout:
                    for token in list(pending):
                        key = pending[token][0]
                        settle(token, BusError(f"write {bucket}/{key}: no answer within {ack_timeout:g}s"))

        def on_denied(subject: str) -> None:
            refused = subject.lower()
            for token in [t for t, write in pending.items()
                          if kv_subject(bucket, write[0]).lower() == refused]:
                settle(token, self._denied_error(kv_subject(bucket, pending[token][0])))

        sub = await self.nc.subscribe(f"{inbox}.*", cb=on_ack)
        guard = asyncio.ensure_future(watchdog())
        denial_entry = (f"$KV.{bucket}".lower(), on_denied)
        self._denial_waiters.append(denial_entry)
        try:
            headers = telemetry.inject_headers()
            for number, (key, record, last_revision) in enumerate(items):
                await free.acquire()
                if failed:
                    break
                data = record if isinstance(record, bytes) else schema.encode(record)
                token = str(number)
                pending[token] = (key, data, last_revision)
                drained.clear()
                if len(pending) == 1:  # the first in flight: its answer is due from now
                    last_answer = loop.time()
                write_headers = dict(headers)
                if last_revision is not None:
                    write_headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
                try:
                    await self.nc.publish(kv_subject(bucket, key), data, reply=f"{inbox}.{token}",
                                          headers=write_headers or None)
                except nats.errors.Error as err:
                    settle(token, BusError(f"write {bucket}/{key}: {err or type(err).__name__}"))
                    break
            if pending:
                await drained.wait()
        finally:
            self._denial_waiters.remove(denial_entry)
            guard.cancel()
            await asyncio.gather(guard, return_exceptions=True)
            await Subscription(sub).unsubscribe()
        return creations

    async def _deleted_revision(self, bucket: str, key: str) -> int | None:
        kv = await self._kv(bucket)
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError as err:  # also covers KeyDeletedError
            entry = getattr(err, "entry", None)
            return entry.revision if entry is not None and entry.revision else None
        return None

    async def kv_delete(self, bucket: str, key: str, *, last_revision: int | None = None) -> None:
        """Delete ``key`` (a tombstone watchers see). Deleting an absent key is a no-op."""
        headers = telemetry.inject_headers({KV_OPERATION: "DEL"})
        if last_revision is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
        try:
            await self._refusable(kv_subject(bucket, key),
                                  self.js.publish(kv_subject(bucket, key), b"", headers=headers))
        except nats.js.errors.APIError as err:
            if err.err_code in (10071, 10164):
                raise RevisionMismatch(f"{bucket}/{key}: revision changed") from err
            raise BusError(f"delete {bucket}/{key}: {err}") from err
        except nats.js.errors.NoStreamResponseError as err:
            raise BusError(f"delete {bucket}/{key}: {err or type(err).__name__}") from err

    async def kv_list(self, bucket: str, pattern: str = ">") -> dict[str, KVEntry]:
        """Every live key matching ``pattern``: a key written while the listing runs is in
        it, with one of its values (the listing ends only once its consumer has sent
        everything, see `_caught_up`)."""
        state: dict[str, KVEntry] = {}
        async for event in self.watch(bucket, pattern, once=True):
            if isinstance(event, KVEntry):
                if event.deleted:
                    state.pop(event.key, None)
                else:
                    state[event.key] = event
        return state

    async def watch(
        self, bucket: str, pattern: str = ">", *, once: bool = False
    ) -> AsyncIterator[KVEntry | Synced]:
        """Live keys, then ``SYNCED``, then changes; re-syncs after every reconnect.

        With ``once`` the iteration ends after the first ``SYNCED``. A one-shot read whose
        consumer sends nothing for ``LISTING_STALL`` seconds before it is complete reads the
        bucket again with a new consumer (``BusError`` after ``LISTING_ATTEMPTS`` reads). A
        read started again, after a stall or a reconnect, reports as deleted at its
        ``SYNCED`` every key handed out before that is gone since.
        """
        delivered: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            queue: asyncio.Queue[Msg] = asyncio.Queue()

            async def on_msg(msg: Msg, queue: asyncio.Queue[Msg] = queue) -> None:
                queue.put_nowait(msg)

            reconnected = self._reconnected
            try:
                sub = await self._refusable(_kv_reads(bucket), self.js.subscribe(
                    kv_subject(bucket, pattern),
                    stream=kv_stream(bucket),
                    cb=on_msg,
                    ordered_consumer=True,
                    deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                    # an abandoned consumer disappears quickly; one-shot reads even faster
                    inactive_threshold=2 if once else 30,
                ))
            except PermissionDenied as err:  # a retry would be refused again, but log slowly
                if once:
                    raise BusError(f"watch {bucket}: {err}") from err
                log.error("watch %s: %s; retrying in %.0fs", bucket, err, DENIED_RETRY)
                await asyncio.sleep(DENIED_RETRY)
                continue
            except (TimeoutError, nats.errors.Error) as err:
                if once:
                    raise BusError(f"watch {bucket}: {err}") from err
                log.warning("watch %s: %s; retrying", bucket, err)
                await asyncio.sleep(0.5)
                continue
            try:
                try:
                    info = await sub.consumer_info()
                except (TimeoutError, nats.errors.Error) as err:
                    # e.g. a server busy right after a reconnect: a watch outlives it
                    if once:
                        raise BusError(f"watch {bucket}: {err}") from err
                    log.warning("watch %s: %s; retrying", bucket, err)
                    await asyncio.sleep(0.5)
                    continue
                seen: set[str] = set()
                # Empty only if the server has neither pending nor already-pushed messages:
                # pushed ones may not have reached this client yet, and the last of them
                # (num_pending == 0) marks the end of the initial state.
                synced = info.num_pending == 0 and info.delivered.consumer_seq == 0
                received = 0  # consumer sequence of the last message received
                while True:
                    if synced and seen is not None and once and not await _caught_up(sub, received):
                        synced = False  # a key replaced while listing: its new value is still due
                    if synced and seen is not None:
                        for key in sorted(delivered - seen):
                            yield KVEntry(bucket, key, 0, None)
                        delivered = set(seen)
                        seen = None  # type: ignore[assignment]
                        yield SYNCED
                        if once:
                            return
                    msg = await self._next_or_reconnect(queue, reconnected, LISTING_STALL if once else None)
                    if msg is _STALLED and attempts >= LISTING_ATTEMPTS:
                        raise BusError(f"listing {bucket}: its consumer sent nothing for "
                                       f"{LISTING_STALL:.0f} s, {attempts} times")
                    if msg is _STALLED or msg is None:  # stalled, or reconnected: read again
                        if msg is _STALLED:
                            log.warning("listing %s: its consumer sent nothing for %.0f s; reading "
                                        "the bucket again", bucket, LISTING_STALL)
                        if seen is not None:  # keys handed out before the break count as
                            delivered |= seen  # delivered: the next sync reports those gone since
                        break
                    entry = _entry_from_msg(bucket, msg)
                    received = max(received, msg.metadata.sequence.consumer)
                    if seen is not None:
                        if entry.deleted:
                            seen.discard(entry.key)
                        else:
                            seen.add(entry.key)
                        if msg.metadata.num_pending == 0:
                            synced = True
                        if entry.deleted and entry.key not in delivered:
                            continue
                    elif entry.deleted:
                        delivered.discard(entry.key)
                    else:
                        delivered.add(entry.key)
                    yield entry
            finally:
                consumer = getattr(sub, "_consumer", None)
                try:
                    await sub.unsubscribe()
                    if consumer:  # don't leave it to the inactivity timeout: the server caps consumers
                        await self.js.delete_consumer(kv_stream(bucket), consumer)
                except Exception:  # connection may be gone; the consumer is ephemeral
                    pass

    async def _next_or_reconnect(
        self, queue: asyncio.Queue[Msg], reconnected: asyncio.Event, stall: float | None = None
    ) -> Msg | None | object:
        """The next message; None after a reconnect; `_STALLED` when none came for `stall`
        seconds."""
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        waiter = asyncio.ensure_future(reconnected.wait())
        try:
            done, _ = await asyncio.wait({getter, waiter}, timeout=stall, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return _STALLED
        finally:
            for task in (getter, waiter):
                if not task.done():
                    task.cancel()
            await asyncio.gather(getter, waiter, return_exceptions=True)
        if getter in done and not getter.cancelled():
            return getter.result()
        return None

    # ------------------------------------------------------------------ messaging

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (0 when not yet known)."""
        return self.nc.max_payload or 0

    async def publish(self, subject: str, record: Any, *, reply: str = "") -> None:
        """Publish ``record`` (a Struct, or bytes as they are) with the trace context."""
        data = record if isinstance(record, bytes) else schema.encode(record)
        try:
            await self.nc.publish(subject, data, reply=reply, headers=telemetry.inject_headers() or None)
        except nats.errors.MaxPayloadError as err:
            raise BusError(f"publish {subject}: {len(data)} bytes exceed the server's maximum "
                           f"of {self.max_payload}") from err

    async def subscribe_raw(
        self,
        subject: str,
        handler: Callable[[Message], Awaitable[None]],
        *,
        queue: str = "",
    ) -> Subscription:
        """Untyped subscription: ``handler`` gets every ``Message`` as it arrived, run
        under the trace context its sender published it in."""

        async def on_msg(msg: Msg) -> None:
            message = Message(self, msg.subject, msg.data, msg.reply, msg.headers)
            if not msg.headers:
                await handler(message)
                return
            token = telemetry.attach_context(msg.headers)
            try:
                await handler(message)
            finally:
                telemetry.detach_context(token)

        return Subscription(await self.nc.subscribe(subject, queue=queue, cb=on_msg))

    async def subscribe(
        self,
        subject: str,
        type_: type[T],
        handler: Callable[[T, Message], Awaitable[None]],
        *,
        queue: str = "",
    ) -> Subscription:
        """Typed subscription; undecodable payloads are logged and dropped."""

        async def on_message(message: Message) -> None:
            try:
                record = schema.decode(message.data, type_)
            except msgspec.DecodeError as err:
                log.warning("dropping bad payload on %s: %s", message.subject, err)
                return
            await handler(record, message)

        return await self.subscribe_raw(subject, on_message, queue=queue)

    async def request(self, subject: str, record: Any, type_: type[T], *, timeout: float = 2.0) -> T:
        data = record if isinstance(record, bytes) else schema.encode(record)
        try:
            msg = await self._refusable(subject, self.nc.request(
                subject, data, timeout=timeout, headers=telemetry.inject_headers() or None
            ))
        except (BusTimeout, nats.errors.TimeoutError, nats.errors.NoRespondersError) as err:
            raise BusError(f"no answer on {subject}") from err
        return schema.decode(msg.data, type_)

    async def request_stream(
        self, subject: str, record: Any, *, timeout: float
    ) -> AsyncIterator[bytes]:
        """Send one request and yield every reply payload as it arrives, for answers that
        come in several messages. Raises ``NoReply`` when nothing arrives within
        ``timeout`` seconds of the request or of the previous reply, or when no one
        listens on ``subject``. The caller stops iterating when the answer is complete."""
        arrived: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def on_reply(msg: Message) -> None:
            arrived.put_nowait(None if no_responders(msg) else msg.data)

        inbox = self._new_inbox()
        sub = await self.subscribe_raw(inbox, on_reply)
        try:
            await self.publish(subject, record, reply=inbox)
            while True:
                try:
                    reply = await asyncio.wait_for(arrived.get(), timeout)
                except TimeoutError:
                    reply = None
                if reply is None:
                    raise NoReply(f"no answer on {subject}")
                yield reply
        finally:
            await sub.unsubscribe()

    async def request_many(
        self, subject: str, payload: bytes = b"", *, timeout: float = 1.0, quiet: float = 0.25
    ) -> list[bytes]:
        """Scatter-gather: every reply that arrives before ``timeout`` (or ``quiet`` idle)."""
        replies: list[bytes] = []
        arrived = asyncio.Event()

        async def on_reply(msg: Message) -> None:
            if not no_responders(msg):
                replies.append(msg.data)
                arrived.set()

        inbox = self._new_inbox()
        sub = await self.subscribe_raw(inbox, on_reply)
        try:
            await self.publish(subject, payload, reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), min(remaining, quiet) if replies else remaining)
                except TimeoutError:
                    if replies:
                        break
        finally:
            await sub.unsubscribe()
        return replies

    def _new_inbox(self) -> str:
        return self.nc.new_inbox()

    # ------------------------------------------------------------------ service registry

    async def register_service(
        self,
        name: str,
        *,
        version: str,
        description: str,
        metadata: dict[str, str],
        endpoints: dict[str, tuple[str, Callable[[], bytes]]],
    ) -> Registration:
        """Register with the NATS micro-services API (``$SRV.PING|INFO|STATS``), each
        endpoint ``name -> (subject, answer)`` replying with ``answer()``."""
        service = await micro.add_service(
            self.nc, name=name, version=version, description=description, metadata=metadata
        )
        for endpoint, (subject, answer) in endpoints.items():

            async def on_request(req: micro.Request, answer: Callable[[], bytes] = answer) -> None:
                await req.respond(answer())

            await service.add_endpoint(name=endpoint, subject=subject, handler=on_request)
        return Registration(service)


class NoReply(BusError):
    """A request got no (further) answer in time, or no one listens on its subject."""


class Message:
    """One received message; ``respond`` answers on its reply subject through the bus."""

    __slots__ = ("_bus", "data", "headers", "reply", "subject")

    def __init__(self, bus: Bus, subject: str, data: bytes, reply: str = "",
                 headers: dict[str, str] | None = None) -> None:
        self._bus = bus
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers

    async def respond(self, record: Any) -> None:
        """Answer (a Struct, or bytes as they are); a message without a reply subject is
        not answered."""
        if self.reply:
            await self._bus.publish(self.reply, record)


class Subscription:
    """A live subscription; ``unsubscribe`` is safe on a closing connection."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:  # connection already closing
            pass


class Registration:
    """A micro-services registration; ``stop`` deregisters."""

    def __init__(self, service: Any) -> None:
        self._service = service

    async def stop(self) -> None:
        try:
            await self._service.stop()
        except Exception:  # connection already closing
            pass


NO_RESPONDERS_STATUS = "503"


def no_responders(msg: Message) -> bool:
    """The server's "no responders" notice on a request's inbox, not a reply."""
    return not msg.data and bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS_STATUS


_STALLED = object()  # `Bus._next_or_reconnect`: no message within the wait allowed


async def _caught_up(sub: Any, received: int) -> bool:
    """Whether a listing's consumer has nothing left to send after the ``received``
    messages that arrived (its consumer sequence counts what it pushed). A last-per-subject
    listing sees ``num_pending == 0`` on its last message, but a key replaced meanwhile lost
    the old message the consumer was about to send, and its new one may be appended after
    that count was taken: the consumer's own counts then show it pending, or pushed and not
    yet received. (Stream sequences would not do: a consumer with nothing to send reports
    the stream position it starts from as delivered.)"""
    try:
        info = await sub.consumer_info()
    except (TimeoutError, nats.errors.Error):
        return True  # cannot tell: as before, the listing ends at num_pending == 0
    return info.num_pending == 0 and info.delivered.consumer_seq <= received


def _entry_from_msg(bucket: str, msg: Msg) -> KVEntry:
    headers = dict(msg.header or {})
    op = headers.get(KV_OPERATION)
    reason = headers.get("Nats-Marker-Reason")
    deleted = op in ("DEL", "PURGE") or reason in ("MaxAge", "Purge", "Remove")
    key = msg.subject[len(f"$KV.{bucket}.") :]
    return KVEntry(
        bucket,
        key,
        msg.metadata.sequence.stream,
        None if deleted else msg.data,
        headers,
    )


def _ack_outcome(msg: Msg, bucket: str, key: str) -> int | Exception:
    """The new revision a JetStream publish acknowledgement reports, or the error it is
    (``RevisionMismatch`` for a lost compare-and-set), as ``Bus.kv_put`` reports them."""
    if not msg.data:
        status = (msg.headers or {}).get("Status", "")
        what = "no stream for the bucket" if status == NO_RESPONDERS_STATUS else f"status {status}"
        return BusError(f"write {bucket}/{key}: {what}")
    try:
        ack = msgspec.json.decode(msg.data)
        error = ack.get("error")
        if error:
            if error.get("err_code") in (10071, 10164):
                return RevisionMismatch(f"{bucket}/{key}: revision changed")
            return BusError(f"write {bucket}/{key}: {error.get('description', error)}")
        return int(ack["seq"])
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        return BusError(f"write {bucket}/{key}: bad acknowledgement {msg.data[:100]!r}: {err}")
