"""Redis tier: the shared hot copy (bodies and pending writes with a TTL, head
pointers) and the fan-out of the event feed between replicas.

Every call is best effort: a failure marks the tier down and the store goes on
through memory and SQL; a background probe marks it up again and first drops
the head pointers and write sets this process could not update meanwhile (they
fall back to SQL), so Redis never serves what SQL has moved past.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from checkpoint_svc.convert import (
    checkpoint_from_pb,
    checkpoint_to_pb,
    event_from_pb,
    event_to_pb,
    write_from_pb,
    write_to_pb,
)
from checkpoint_svc.domain import Checkpoint, Event, PendingWrite, ThreadKey
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

log = logging.getLogger(__name__)

SEP = "\x1f"  # ids may contain ':'; they may not contain control characters
FEED_CHANNEL_PREFIX = f"cpfeed{SEP}"
# Field that marks a write set as complete: it was created when its checkpoint was saved.
COMPLETE = "_"
_MAX_MISSED = 100_000
_FAILURES = (TimeoutError, RedisError, OSError)

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
# Start the write set of a checkpoint just saved: complete, since it has no writes
# yet; unless writes got there first (another replica), then it stays incomplete.
NEW_WRITE_SET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], '_', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
# Add writes (LangGraph's rule: regular writes are kept once, special ones
# replaced). A set that does not exist is created incomplete, so that a later
# NEW_WRITE_SET cannot mark it complete while writes are missing from it.
PUT_WRITES_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], '~', '1')
  redis.call('EXPIRE', KEYS[1], 3600)
end
for i = 1, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
# The head id and its write set in one round trip.
HEAD_AND_WRITES_LUA = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then return false end
return {id, redis.call('HGETALL', ARGV[1] .. id)}
"""


def _thread_part(key: ThreadKey) -> str:
    return SEP.join((key.tenant, key.namespace, key.thread_id))


def body_key(key: ThreadKey, checkpoint_id: str) -> str:
    return f"cp{SEP}{_thread_part(key)}{SEP}{checkpoint_id}"


def writes_prefix(key: ThreadKey) -> str:
    return f"w{SEP}{_thread_part(key)}{SEP}"


def writes_key(key: ThreadKey, checkpoint_id: str) -> str:
    return writes_prefix(key) + checkpoint_id


def head_key(key: ThreadKey) -> str:
    return f"head{SEP}{_thread_part(key)}"


def _write_field(w: PendingWrite) -> str:
    return f"{w.task_id}{SEP}{w.idx}"


def _decode_writes(fields: dict[bytes, bytes], checkpoint_id: str) -> list[PendingWrite] | None:
    """A write set as saved in Redis, or None if Redis does not know all of it."""
    fields = dict(fields)
    if fields.pop(COMPLETE.encode(), None) is None or b"~" in fields:
        return None
    writes = [write_from_pb(pb.PendingWrite.FromString(v)) for v in fields.values()]
    for w in writes:
        w.checkpoint_id = checkpoint_id
    return sorted(writes, key=lambda w: (w.task_id, w.idx))


class StaleLog(Protocol):
    """Keys that some replica could not update in Redis, kept in SQL for every replica."""

    async def record(self, keys: list[str]) -> None: ...

    async def pending(self, limit: int) -> list[tuple[str, float]]: ...

    async def clear(self, entries: list[tuple[str, float]]) -> None: ...


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
        # In pipelines scripts go as EVAL: a registered Script would make every
        # pipeline ask SCRIPT EXISTS first, one more round trip per commit.
        self.stale_log: StaleLog | None = None
        self._head_and_writes = self._client.register_script(HEAD_AND_WRITES_LUA)
        self.up = False
        self.detail = "not connected yet"
        # Keys this process failed to update; None after too many to track.
        self._missed: set[str] | None = set()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

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

    def _miss(self, keys: list[str]) -> None:
        """Keys Redis may now hold stale values for: dropped before it is trusted again."""
        if not keys:
            return
        if self._missed is not None:
            self._missed.update(keys)
            if len(self._missed) > _MAX_MISSED:
                self._missed = None
        if self.stale_log is not None:
            task = asyncio.create_task(self.stale_log.record(keys))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _probe(self) -> None:
        try:
            await self._client.ping()
            await self._drain_stale_log()
        except _FAILURES as exc:
            self._down(exc)
            return
        if not self.up and await self._forget_missed():
            self.up = True  # no await since the last check: nothing can slip in between
            self.detail = ""
            log.info("redis up", extra={"url": self.url})

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5 if not self.up else 2.0)
            await self._probe()

    async def _drain_stale_log(self) -> None:
        """Drop what any replica could not update in Redis (it recorded the keys in SQL)."""
        if self.stale_log is None:
            return
        for _ in range(100):
            try:
                entries = await self.stale_log.pending(1000)
            except Exception as exc:  # SQL down: the log waits; Redis itself may be fine
                log.debug("stale-key log unreadable", extra={"error": str(exc)})
                return
            if not entries:
                return
            await self._client.delete(*(k for k, _ in entries))
            try:
                await self.stale_log.clear(entries)
            except Exception as exc:
                log.debug("stale-key log not cleared", extra={"error": str(exc)})
                return

    async def _forget_missed(self) -> bool:
        """Heads and write sets moved in SQL while Redis was unreachable: drop them."""
        try:
            while self._missed is None or self._missed:
                if self._missed is None:
                    self._missed = set()
                    for pattern in (f"head{SEP}*", f"w{SEP}*"):
                        async for k in self._client.scan_iter(match=pattern, count=1000):
                            await self._client.delete(k)
                    continue
                missed, self._missed = list(self._missed), set()
                for i in range(0, len(missed), 1000):
                    await self._client.delete(*missed[i : i + 1000])
        except _FAILURES as exc:
            self._down(exc)
            self._missed = None  # unknown what was dropped: drop everything next time
            return False
        return True

    async def get_body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        if not self.up:
            return None
        try:
            raw = await self._client.get(body_key(key, checkpoint_id))
        except _FAILURES as exc:
            self._down(exc)
            return None
        if raw is None:
            return None
        return checkpoint_from_pb(pb.Checkpoint.FromString(raw), key.tenant)

    async def put_bodies(self, checkpoints: list[Checkpoint]) -> None:
        await self.apply(checkpoints, {}, [], [], new=False)

    async def get_head(self, key: ThreadKey) -> str | None:
        if not self.up:
            return None
        try:
            raw = await self._client.hget(head_key(key), "id")
        except _FAILURES as exc:
            self._down(exc)
            return None
        return raw.decode() if raw is not None else None

    async def get_head_and_writes(
        self, key: ThreadKey
    ) -> tuple[str | None, list[PendingWrite] | None]:
        """The head id and, if Redis knows all of them, its pending writes."""
        if not self.up:
            return None, None
        try:
            got = await self._head_and_writes(keys=[head_key(key)], args=[writes_prefix(key)])
        except _FAILURES as exc:
            self._down(exc)
            return None, None
        if not got:
            return None, None
        head, flat = got[0].decode(), got[1]
        return head, _decode_writes(dict(zip(flat[::2], flat[1::2], strict=True)), head)

    async def get_writes(self, key: ThreadKey, checkpoint_id: str) -> list[PendingWrite] | None:
        if not self.up:
            return None
        try:
            fields = await self._client.hgetall(writes_key(key, checkpoint_id))
        except _FAILURES as exc:
            self._down(exc)
            return None
        return _decode_writes(fields, checkpoint_id)

    async def set_heads(self, heads: dict[ThreadKey, tuple[str, int]]) -> None:
        await self.apply([], heads, [], [], new=False)

    async def apply(
        self,
        checkpoints: list[Checkpoint],
        heads: dict[ThreadKey, tuple[str, int]],
        events: list[Event],
        writes: list[tuple[ThreadKey, PendingWrite]],
        new: bool = True,
    ) -> None:
        """One round trip after a commit: bodies, write sets, heads, feed fan-out.

        `new` says the checkpoints were just saved, so their write sets start
        complete (empty); bodies read back from SQL get no write set.
        """
        if not (checkpoints or heads or events or writes):
            return
        touched = [head_key(k) for k in heads] + [writes_key(k, w.checkpoint_id) for k, w in writes]
        if not self.up:
            self._miss(touched)
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for cp in checkpoints:
                    body = checkpoint_to_pb(cp).SerializeToString()
                    pipe.set(body_key(cp.key, cp.checkpoint_id), body, ex=self.ttl)
                    if new:
                        wkey = writes_key(cp.key, cp.checkpoint_id)
                        pipe.eval(NEW_WRITE_SET_LUA, 1, wkey, self.ttl)
                for wkey, args in _group_writes(writes).items():
                    pipe.eval(PUT_WRITES_LUA, 1, wkey, *args)
                for key, (cid, version) in heads.items():
                    pipe.eval(SET_HEAD_LUA, 1, head_key(key), cid, version, self.ttl)
                for e in events:
                    channel = FEED_CHANNEL_PREFIX + e.key.tenant
                    pipe.publish(channel, event_to_pb(e).SerializeToString())
                await pipe.execute()
        except _FAILURES as exc:
            self._down(exc)
            self._miss(touched)
        except Exception:  # a bug or a value Redis cannot take: never a stale head
            log.exception("redis update failed")
            self._miss(touched)

    async def drop_thread(self, key: ThreadKey) -> None:
        """Forget a deleted thread: its head now, its bodies and write sets in the background
        (finding them is a scan of the keyspace, which no acknowledgement should wait for)."""
        if not self.up:
            self._miss([head_key(key)])
            return
        try:
            await self._client.delete(head_key(key))
        except _FAILURES as exc:
            self._down(exc)
            self._miss([head_key(key)])
            return
        task = asyncio.create_task(self._drop_thread_keys(key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop_thread_keys(self, key: ThreadKey) -> None:
        try:
            for pattern in (body_key(key, "*"), writes_key(key, "*")):
                batch: list[bytes] = []
                async for k in self._client.scan_iter(match=_escape_glob(pattern), count=1000):
                    batch.append(k)
                if batch:
                    await self._client.delete(*batch)
        except _FAILURES as exc:
            self._down(exc)

    async def drop_bodies(self, slots: list[tuple[ThreadKey, str]]) -> None:
        if not self.up or not slots:
            return
        keys = [body_key(k, cid) for k, cid in slots] + [writes_key(k, cid) for k, cid in slots]
        try:
            for i in range(0, len(keys), 1000):
                await self._client.delete(*keys[i : i + 1000])
        except _FAILURES as exc:
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


def _group_writes(writes: list[tuple[ThreadKey, PendingWrite]]) -> dict[str, list[str | bytes]]:
    grouped: dict[str, list[str | bytes]] = {}
    for key, w in writes:
        args = grouped.setdefault(writes_key(key, w.checkpoint_id), [])
        stored = write_to_pb(w)
        stored.checkpoint_id = ""  # implied by the key
        args += [
            _write_field(w),
            stored.SerializeToString(),
            "1" if w.upsert else "0",
        ]
    return grouped


def _escape_glob(pattern: str) -> str:
    """Escape glob characters in ids, keeping the trailing '*' wildcard."""
    body = pattern[:-1]
    for ch in "\\*?[]":
        body = body.replace(ch, "\\" + ch)
    return body + "*"
