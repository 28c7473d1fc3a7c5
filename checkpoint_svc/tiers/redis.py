"""Redis tier: the shared hot copy of checkpoint states (with a TTL) and the fan-out of the
event feed between replicas.

It holds nothing mutable. A state is stored under its checkpoint's identity (thread, id and
creation time), which SQL names on every Restore, so a cached state can never be an older
answer than SQL's: heads, metadata and pending writes always come from SQL
(docs/checkpoint-service.md#tiers). Every call is best effort: a failure marks the tier down
and the store goes on through memory and SQL until a background probe finds Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from checkpoint_svc.convert import event_from_pb, event_to_pb
from checkpoint_svc.domain import Checkpoint, Event, ThreadKey, Tier
from checkpoint_svc.errors import DataLoss
from checkpoint_svc.sealing import Sealing
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

log = logging.getLogger(__name__)

SEP = "\x1f"  # ids may contain ':'; they may not contain control characters
FEED_CHANNEL_PREFIX = f"cpfeed{SEP}"
# A feed message is FRAMED + the publishing replica's id (8 bytes) + the Event: a replica skips
# its own events (it delivered them already) without decoding them. A raw Event never starts
# with a zero byte (protobuf has no field 0), so unframed messages still read.
FRAMED = b"\x00"
_FAILURES = (TimeoutError, RedisError, OSError)


def state_key(key: ThreadKey, checkpoint_id: str, created_at: float) -> str:
    """Where a checkpoint's state lives: a thread deleted and saved again under the same
    checkpoint id has another creation time, hence another key."""
    parts = ("st", key.tenant, key.namespace, key.thread_id, checkpoint_id, repr(created_at))
    return SEP.join(parts)


class RedisTier:
    tier = Tier.REDIS

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        op_timeout: float = 0.5,
        *,
        sealing: Sealing | None = None,
    ) -> None:
        self.url = url
        # States and feed messages are sealed as SQL's rows are (checkpoint_svc/sealing.py).
        self.sealing = sealing or Sealing()
        self.ttl = max(1, int(ttl_seconds))
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            health_check_interval=0,
        )
        self.up = False
        self.detail = "not connected yet"
        self._tasks: list[asyncio.Task] = []
        self.origin = uuid.uuid4().bytes[:8]

    async def start(self) -> None:
        await self._probe()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="redis-probe"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._client.aclose()

    def _down(self, exc: BaseException) -> None:
        if self.up:
            log.warning("redis down, serving from memory and SQL", extra={"error": str(exc)})
        self.up = False
        self.detail = f"{type(exc).__name__}: {exc}"

    async def _probe(self) -> None:
        try:
            await self._client.ping()
        except _FAILURES as exc:
            self._down(exc)
            return
        if not self.up:
            self.up, self.detail = True, ""
            log.info("redis up", extra={"url": self.url})

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5 if not self.up else 2.0)
            await self._probe()

    async def state_of(self, named: Checkpoint) -> bytes | None:
        """The state of the checkpoint SQL named, if Redis holds it."""
        if not self.up:
            return None
        try:
            state = await self._client.get(
                state_key(named.key, named.checkpoint_id, named.created_at)
            )
        except _FAILURES as exc:
            self._down(exc)
            return None
        if state is None:
            return None
        try:
            return self.sealing.open_state(named.key, named.checkpoint_id, state)
        except DataLoss as exc:  # a cache: SQL answers instead, and says so if it cannot
            log.error("redis state unreadable, reading SQL's", extra={"error": str(exc)})
            return None

    async def put_states(self, checkpoints: list[Checkpoint]) -> None:
        await self.apply(checkpoints, [])

    async def apply(self, checkpoints: list[Checkpoint], events: list[Event]) -> None:
        """One round trip after a commit: the states saved, and the feed's fan-out."""
        if not self.up or not (checkpoints or events):
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for cp in checkpoints:
                    key = state_key(cp.key, cp.checkpoint_id, cp.created_at)
                    state = self.sealing.state(cp.key, cp.checkpoint_id, cp.state)
                    pipe.set(key, state, ex=self.ttl)
                for e in events:
                    tenant = e.key.tenant
                    message = self.sealing.message(tenant, event_to_pb(e).SerializeToString())
                    framed = FRAMED + self.origin + message
                    pipe.publish(FEED_CHANNEL_PREFIX + tenant, framed)
                await pipe.execute()
        except _FAILURES as exc:
            self._down(exc)
        except Exception:  # a bug or a value Redis cannot take: the data is in SQL anyway
            log.exception("redis update failed")

    def follow_feed(self, deliver: Callable[[Event], None], watched: Callable[[str], bool]) -> None:
        """Deliver the events other replicas publish, of the tenants someone watches here,
        reconnecting as needed."""
        task = asyncio.create_task(self._feed_loop(deliver, watched), name="redis-feed")
        self._tasks.append(task)

    async def _feed_loop(
        self, deliver: Callable[[Event], None], watched: Callable[[str], bool]
    ) -> None:
        prefix_len = len(FEED_CHANNEL_PREFIX)
        while True:
            client = pubsub = None
            try:
                client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.psubscribe(FEED_CHANNEL_PREFIX + "*")
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    tenant = msg["channel"].decode()[prefix_len:]
                    data = msg["data"]
                    if data[:1] == FRAMED:
                        if data[1:9] == self.origin:
                            continue  # ours: delivered at commit
                        data = data[9:]
                    if not watched(tenant):
                        continue
                    try:
                        data = self.sealing.open_message(tenant, data)
                    except DataLoss as exc:  # the feed reads it from SQL instead
                        log.error("feed message dropped", extra={"error": str(exc)})
                        continue
                    deliver(event_from_pb(pb.Event.FromString(data), tenant))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("feed subscription lost", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
