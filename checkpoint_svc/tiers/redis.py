"""Redis tier: the shared hot copy (bodies with a TTL, head pointers) and the
fan-out of the event feed between replicas.

Every call is best effort: a failure marks the tier down and the store goes on
through memory and SQL; a background probe marks it up again and drops the head
pointers this process could not update meanwhile (they re-warm from SQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from checkpoint_svc.convert import checkpoint_from_pb, checkpoint_to_pb, event_from_pb, event_to_pb
from checkpoint_svc.domain import Checkpoint, Event, ThreadKey
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

log = logging.getLogger(__name__)

SEP = "\x1f"  # ids may contain ':'; they may not contain control characters
FEED_CHANNEL_PREFIX = f"cpfeed{SEP}"
_MAX_MISSED = 100_000

# Move a head only forward: version is the thread's event seq when it moved.
SET_HEAD_LUA = """
local cur = redis.call('HGET', KEYS[1], 'v')
if (not cur) or tonumber(cur) <= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'id', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


def _thread_part(key: ThreadKey) -> str:
    return SEP.join((key.tenant, key.namespace, key.thread_id))


def body_key(key: ThreadKey, checkpoint_id: str) -> str:
    return f"cp{SEP}{_thread_part(key)}{SEP}{checkpoint_id}"


def head_key(key: ThreadKey) -> str:
    return f"head{SEP}{_thread_part(key)}"


class RedisTier:
    def __init__(self, url: str, ttl_seconds: float, op_timeout: float = 0.5) -> None:
        self.url = url
        self.ttl = max(1, int(ttl_seconds))
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            health_check_interval=0,
        )
        self._set_head = self._client.register_script(SET_HEAD_LUA)
        self.up = False
        self.detail = "not connected yet"
        self._on_up: list[Callable[[], Awaitable[None]]] = []
        # Head keys this process failed to move; None after too many to track.
        self._missed: set[str] | None = set()
        self._tasks: list[asyncio.Task] = []

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

    def on_up(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_up.append(callback)

    def _down(self, exc: BaseException) -> None:
        if self.up:
            log.warning("redis down, serving from memory and SQL", extra={"error": str(exc)})
        self.up = False
        self.detail = f"{type(exc).__name__}: {exc}"

    async def _probe(self) -> None:
        try:
            await self._client.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            return
        if not self.up:
            if not await self._forget_missed_heads():
                return
            self.up = True
            self.detail = ""
            log.info("redis up", extra={"url": self.url})
            for callback in self._on_up:
                await callback()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5 if not self.up else 2.0)
            await self._probe()

    def _miss(self, keys: list[str]) -> None:
        if self._missed is None:
            return
        self._missed.update(keys)
        if len(self._missed) > _MAX_MISSED:
            self._missed = None

    async def _forget_missed_heads(self) -> bool:
        """Heads moved in SQL while Redis was unreachable are stale there: drop them."""
        try:
            if self._missed is None:
                async for k in self._client.scan_iter(match=f"head{SEP}*", count=1000):
                    await self._client.delete(k)
            elif self._missed:
                missed = list(self._missed)
                for i in range(0, len(missed), 1000):
                    await self._client.delete(*missed[i : i + 1000])
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            return False
        self._missed = set()
        return True

    async def get_body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        if not self.up:
            return None
        try:
            raw = await self._client.get(body_key(key, checkpoint_id))
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            return None
        if raw is None:
            return None
        return checkpoint_from_pb(pb.Checkpoint.FromString(raw), key.tenant)

    async def put_bodies(self, checkpoints: list[Checkpoint]) -> None:
        await self.apply(checkpoints, {}, [])

    async def get_head(self, key: ThreadKey) -> str | None:
        if not self.up:
            return None
        try:
            raw = await self._client.hget(head_key(key), "id")
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            return None
        return raw.decode() if raw is not None else None

    async def set_heads(self, heads: dict[ThreadKey, tuple[str, int]]) -> None:
        await self.apply([], heads, [])

    async def apply(
        self,
        checkpoints: list[Checkpoint],
        heads: dict[ThreadKey, tuple[str, int]],
        events: list[Event],
    ) -> None:
        """One round trip after a commit: bodies, heads and the feed fan-out."""
        if not (checkpoints or heads or events):
            return
        if not self.up:
            self._miss([head_key(k) for k in heads])
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for cp in checkpoints:
                    body = checkpoint_to_pb(cp).SerializeToString()
                    pipe.set(body_key(cp.key, cp.checkpoint_id), body, ex=self.ttl)
                for key, (cid, version) in heads.items():
                    await self._set_head(
                        keys=[head_key(key)], args=[cid, version, self.ttl], client=pipe
                    )
                for e in events:
                    pipe.publish(
                        FEED_CHANNEL_PREFIX + e.key.tenant, event_to_pb(e).SerializeToString()
                    )
                await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            self._miss([head_key(k) for k in heads])

    async def drop_thread(self, key: ThreadKey) -> None:
        if not self.up:
            self._miss([head_key(key)])
            return
        try:
            await self._client.delete(head_key(key))
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)
            self._miss([head_key(key)])

    async def drop_bodies(self, slots: list[tuple[ThreadKey, str]]) -> None:
        if not self.up or not slots:
            return
        try:
            await self._client.delete(*(body_key(k, cid) for k, cid in slots))
        except (TimeoutError, RedisError, OSError) as exc:
            self._down(exc)

    def follow_feed(self, deliver: Callable[[Event], None]) -> None:
        """Deliver every event published by any replica, reconnecting as needed."""
        self._tasks.append(asyncio.create_task(self._feed_loop(deliver), name="redis-feed"))

    async def _feed_loop(self, deliver: Callable[[Event], None]) -> None:
        prefix_len = len(FEED_CHANNEL_PREFIX)
        while True:
            pubsub = None
            try:
                client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.psubscribe(FEED_CHANNEL_PREFIX + "*")
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    tenant = msg["channel"].decode()[prefix_len:]
                    deliver(event_from_pb(pb.Event.FromString(msg["data"]), tenant))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("feed subscription lost", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
