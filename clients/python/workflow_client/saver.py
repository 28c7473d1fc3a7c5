"""A LangGraph checkpointer backed by the checkpoint service.

LangGraph's checkpoint namespaces become store namespaces under a prefix (`lg:` by default),
so a thread's namespaces can be listed and deleted together without touching the engine's
own (`runs`, `workflows`, ...). State and writes go through LangGraph's serializer into bytes,
with its type tag as `content_type`; pickle is never used. Metadata travels as typed JSON, so
`filter={"source": "loop", "step": 2}` is evaluated by the database.

Needs the `langgraph-checkpoint` package; see docs/langgraph-saver.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from workflow_client.connection import (
    RETRY_ATTEMPTS,
    RETRY_INITIAL_BACKOFF,
    Connection,
    retrying_unavailable,
    unavailable,
)
from workflow_client.errors import from_rpc_error
from workflow_client.store_session import StoreSession
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as pb_grpc

_PAGE = 500


@dataclass(slots=True)
class _UnsentWrites:
    """Writes put in this turn of the loop, the call sending them, and how many callers wait
    for it (once none does, it is cancelled, as a call of their own would be)."""

    request: pb.PutWritesRequest
    sender: asyncio.Future
    size: int = 0  # bytes of their values
    waiting: int = 0


# What one PutWrites sent together carries at most (the store takes up to 1000 writes a call).
_WRITES_PER_CALL = 500
_WRITE_BYTES_PER_CALL = 4 * 1024 * 1024


# How long the end of an event loop waits for gRPC's last completions of its calls.
_DRAIN_SECONDS = 0.2


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class CheckpointServiceSaver(BaseCheckpointSaver[str]):
    """`BaseCheckpointSaver` over checkpoint.v1 (async methods, and the sync ones)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        tenant: str | None = None,
        namespace_prefix: str = "lg:",
        timeout: float = 30.0,
        serde: SerializerProtocol | None = None,
        session: bool = True,
        token: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """`session`: the async puts and gets on one Session stream (about half the CPU of
        unary calls on both sides); False sends them as unary calls. `token`: a bearer token,
        for a store that checks credentials (a writer's; deleting threads needs admin).
        `ca_file`, `cert_file`, `key_file`: TLS, and the client certificate for mTLS."""
        super().__init__(serde=serde)
        self.connection = Connection(
            address,
            tenant=tenant,
            timeout=timeout,
            token=token,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        self.prefix = namespace_prefix
        self._aio: grpc.aio.Channel | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._sync: grpc.Channel | None = None
        self._use_session = session
        self._session: StoreSession | None = None
        self._guard: asyncio.Task | None = None  # closes the channel when its loop ends
        # Writes of one checkpoint put in the same turn of an event loop, sent together (a
        # step's tasks finish together): by loop, thread, namespace, checkpoint and whether
        # they are special (replacing) writes, the request collecting them and its sender.
        self._unsent: dict[tuple[Any, ...], _UnsentWrites] = {}

    # ---- channels (one per kind: an asyncio channel belongs to its event loop) ----------

    @property
    def _astub(self) -> pb_grpc.CheckpointServiceStub:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio_loop is not loop:
            # A channel made in another event loop (an earlier asyncio.run, say) cannot be
            # used here: open one for this loop, and let the old one go with its loop.
            self._drop_aio()
            self._aio, self._aio_loop = self.connection.aio_channel(), loop
            self._guard = loop.create_task(self._close_with_loop(self._aio), name="saver-guard")
        return pb_grpc.CheckpointServiceStub(self._aio)

    async def _close_with_loop(self, channel: grpc.aio.Channel) -> None:
        """At the end of this channel's event loop (asyncio.run cancels every task before it
        closes the loop): close the session and the channel while the loop still runs, and
        give gRPC a moment to deliver the last completions of the calls that cancelling
        cut off. grpc.aio's completion queue is the process's: a completion of a closed
        loop's call, delivered while another loop runs, makes it call into the closed one
        ("Event loop is closed")."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self._aio is channel:
                session, self._session = self._session, None
                self._aio = self._aio_loop = None
                if session is not None:
                    await session.close()
                await channel.close()
                await asyncio.sleep(_DRAIN_SECONDS)
            raise

    @property
    def _acalls(self) -> Any:
        """Save, PutWrites and Restore: on this loop's Session stream, or the stub's."""
        stub = self._astub
        if not self._use_session:
            return stub
        if self._session is None:
            self._session = StoreSession(stub=stub, metadata=self.connection.metadata)
        return self._session

    async def _hot(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A call on the session, retried while the store is UNAVAILABLE (what gRPC's retry
        policy does for the unary calls; each of these calls is safe to repeat)."""
        try:  # the first attempt without the retry machinery: most calls need no more
            return await call()
        except grpc.aio.AioRpcError as exc:
            if not self._use_session or not unavailable(exc):
                raise
        await asyncio.sleep(RETRY_INITIAL_BACKOFF)
        async for attempt in retrying_unavailable(RETRY_ATTEMPTS - 1):
            with attempt:
                return await call()
        raise AssertionError("unreachable")

    def _drop_aio(self) -> None:
        old, old_loop = self._aio, self._aio_loop
        self._session = None  # it belonged to that loop, with its channel
        self._aio = self._aio_loop = None
        if old is None or old_loop is None:
            return
        if old_loop.is_running():  # another thread's loop: close it there
            asyncio.run_coroutine_threadsafe(old.close(), old_loop)
        else:  # its loop is stopped or gone: release the core channel without it
            with contextlib.suppress(Exception):
                old._channel.close()  # grpc.aio has no close without its loop

    async def __aenter__(self) -> CheckpointServiceSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def _stub(self) -> pb_grpc.CheckpointServiceStub:
        if self._sync is None:
            self._sync = self.connection.channel()
        return pb_grpc.CheckpointServiceStub(self._sync)

    async def aclose(self) -> None:
        if self._aio is not None:
            if self._aio_loop is asyncio.get_running_loop():
                if self._session is not None:
                    await self._session.close()
                    self._session = None
                await self._aio.close()
                self._aio = self._aio_loop = None
                if self._guard is not None:
                    self._guard.cancel()  # nothing left for it to close
                    self._guard = None
            else:
                self._drop_aio()
        self.close()

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def _options(self) -> dict[str, Any]:
        return {"metadata": self.connection.metadata, "timeout": self.connection.timeout}

    # ---- translation ------------------------------------------------------------

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Postgres-style versions: an int part that grows, and a random tie-breaker."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    def _namespace(self, checkpoint_ns: str) -> str:
        return self.prefix + checkpoint_ns

    def _save_request(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
    ) -> tuple[pb.SaveRequest, RunnableConfig]:
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), conf.get("checkpoint_ns", "")
        content_type, state = self.serde.dumps_typed(checkpoint)
        meta = get_serializable_checkpoint_metadata(config, metadata)
        request = pb.SaveRequest(
            checkpoint=pb.Checkpoint(
                namespace=self._namespace(ns),
                thread_id=thread_id,
                checkpoint_id=checkpoint["id"],
                parent_id=conf.get("checkpoint_id") or "",
                state=state,
                content_type=content_type,
                step=int(meta.get("step", 0) or 0),
                metadata_json=json.dumps(meta, default=str),
                trigger=pb.TRIGGER_STEP_COMPLETED,
            ),
            exact_parent=True,
        )
        saved = {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}
        return request, {"configurable": saved}

    def _writes_request(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> pb.PutWritesRequest:
        conf = config["configurable"]
        pending = []
        for i, (channel, value) in enumerate(writes):
            content_type, blob = self.serde.dumps_typed(value)
            pending.append(
                pb.PendingWrite(
                    checkpoint_id=conf["checkpoint_id"],
                    task_id=task_id,
                    idx=WRITES_IDX_MAP.get(channel, i),
                    channel=channel,
                    value=blob,
                    content_type=content_type,
                    task_path=task_path,
                )
            )
        return pb.PutWritesRequest(
            namespace=self._namespace(conf.get("checkpoint_ns", "")),
            thread_id=str(conf["thread_id"]),
            writes=pending,
        )

    def _tuple(self, cp: pb.Checkpoint, writes: Sequence[pb.PendingWrite]) -> CheckpointTuple:
        ns = cp.namespace[len(self.prefix) :]
        if cp.content_type == "pickle":
            raise ValueError("refusing a pickled checkpoint")
        config = {
            "configurable": {
                "thread_id": cp.thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": cp.checkpoint_id,
            }
        }
        parent = None
        if cp.parent_id:
            parent = {
                "configurable": {
                    "thread_id": cp.thread_id,
                    "checkpoint_ns": ns,
                    "checkpoint_id": cp.parent_id,
                }
            }
        ordered = sorted(writes, key=lambda w: (w.task_path, w.task_id, w.idx))
        return CheckpointTuple(
            config=config,
            checkpoint=self.serde.loads_typed((cp.content_type, cp.state)),
            metadata=json.loads(cp.metadata_json) if cp.metadata_json else {},
            parent_config=parent,
            pending_writes=[
                (w.task_id, w.channel, self.serde.loads_typed((w.content_type, w.value)))
                for w in ordered
                if w.content_type != "pickle"
            ],
        )

    def _restore_request(self, config: RunnableConfig) -> pb.RestoreRequest:
        conf = config["configurable"]
        return pb.RestoreRequest(
            namespace=self._namespace(conf.get("checkpoint_ns", "")),
            thread_id=str(conf["thread_id"]),
            checkpoint_id=get_checkpoint_id(config) or "",
            include_writes=True,
        )

    def _list_request(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        page_token: str,
    ) -> pb.ListRequest:
        if config is None:
            raise NotImplementedError("alist needs a config with a thread_id")
        conf = config["configurable"]
        request = pb.ListRequest(
            thread_id=str(conf["thread_id"]),
            page_size=_PAGE,
            page_token=page_token,
            include_state=True,
            include_writes=True,
            metadata_equals={k: json.dumps(v) for k, v in (filter or {}).items()},
            before_checkpoint_id=(get_checkpoint_id(before) or "") if before else "",
        )
        if "checkpoint_ns" in conf:  # absent: every namespace of the thread
            request.namespace = self._namespace(conf["checkpoint_ns"])
        else:
            request.namespace_prefix = self.prefix
        return request

    def _page(self, page: pb.ListResponse, wanted_id: str | None) -> list[CheckpointTuple]:
        writes = {(w.namespace, w.checkpoint_id): w.writes for w in page.writes}
        return [
            self._tuple(c, writes.get((c.namespace, c.checkpoint_id), []))
            for c in page.checkpoints
            if wanted_id is None or c.checkpoint_id == wanted_id
        ]

    # ---- async ------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        request, saved = self._save_request(config, checkpoint, metadata)
        try:
            await self._hot(lambda: self._acalls.Save(request, **self._options()))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # a retry that had landed
                raise from_rpc_error(exc) from exc
        return saved

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if not writes:
            return
        request = self._writes_request(config, writes, task_id, task_path)
        # The store replaces a request's slots only if all its writes are special ones: the
        # two kinds never share a request.
        special = all(w.idx < 0 for w in request.writes)
        key = (
            asyncio.get_running_loop(),
            request.thread_id,
            request.namespace,
            request.writes[0].checkpoint_id,
            special,
        )
        unsent = self._unsent.get(key)
        size = sum(len(w.value) for w in request.writes)
        if (
            unsent is None
            or unsent.sender.done()
            or len(unsent.request.writes) + len(request.writes) > _WRITES_PER_CALL
            or unsent.size + size > _WRITE_BYTES_PER_CALL
        ):
            sender = asyncio.ensure_future(self._send_writes(key, request))
            sender.add_done_callback(_retrieved)  # its callers may all have gone
            unsent = self._unsent[key] = _UnsentWrites(request, sender, size)
        else:
            unsent.request.writes.extend(request.writes)
            unsent.size += size
        unsent.waiting += 1
        try:
            await asyncio.shield(unsent.sender)
        except asyncio.CancelledError:
            unsent.waiting -= 1
            if not unsent.waiting:  # nobody waits for it: cancelled with its callers
                unsent.sender.cancel()
                if self._unsent.get(key) is unsent:  # and nobody joins it any more
                    del self._unsent[key]
            raise
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def _send_writes(self, key: tuple[Any, ...], request: pb.PutWritesRequest) -> None:
        """One PutWrites for the writes put in this turn of the loop (one task's, or all of
        a step's): each caller's answer is this call's."""
        await asyncio.sleep(0)
        self._unsent.pop(key, None)  # writes from now on go in a call of their own
        await self._hot(lambda: self._acalls.PutWrites(request, **self._options()))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        try:
            request = self._restore_request(config)
            got = await self._hot(lambda: self._acalls.Restore(request, **self._options()))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc) from exc
        return self._tuple(got.checkpoint, got.writes)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        wanted = get_checkpoint_id(config) if config else None
        token, count = "", 0
        while True:
            try:
                page = await self._astub.List(
                    self._list_request(config, filter, before, token), **self._options()
                )
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc
            for item in self._page(page, wanted):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            token = page.next_page_token
            if not token:
                return

    async def adelete_thread(self, thread_id: str) -> None:
        request = pb.DeleteThreadRequest(
            thread_id=str(thread_id), namespace_prefix=self.prefix, allow_missing=True
        )
        try:
            await self._astub.DeleteThread(request, **self._options())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Every checkpoint and write of every namespace, same ids, in one transaction."""
        try:
            await self._astub.CopyThread(
                self._copy_request(source_thread_id, target_thread_id), **self._options()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    def _copy_request(self, source: str, target: str) -> pb.CopyThreadRequest:
        return pb.CopyThreadRequest(
            source_thread_id=str(source),
            target_thread_id=str(target),
            namespace_prefix=self.prefix,
        )

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """The checkpoints (and writes) whose metadata run_id is one of these, anywhere."""
        try:
            await self._astub.DeleteForRuns(self._runs_request(run_ids), **self._options())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    def _runs_request(self, run_ids: Sequence[str]) -> pb.DeleteForRunsRequest:
        return pb.DeleteForRunsRequest(
            run_ids=[str(r) for r in run_ids], namespace_prefix=self.prefix
        )

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """keep_latest: only the newest checkpoint of each namespace of each thread, with its
        writes; delete: nothing of those threads."""
        try:
            await self._astub.PruneThreads(
                self._prune_request(thread_ids, strategy), **self._options()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    def _prune_request(self, thread_ids: Sequence[str], strategy: str) -> pb.PruneThreadsRequest:
        strategies = {
            "keep_latest": pb.PRUNE_STRATEGY_KEEP_LATEST,
            "delete": pb.PRUNE_STRATEGY_DELETE,
        }
        if strategy not in strategies:
            raise ValueError(f"unknown prune strategy {strategy!r}: keep_latest or delete")
        return pb.PruneThreadsRequest(
            thread_ids=[str(t) for t in thread_ids],
            strategy=strategies[strategy],
            namespace_prefix=self.prefix,
        )

    # ---- sync: the same requests on a blocking channel ------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        request, saved = self._save_request(config, checkpoint, metadata)
        try:
            self._stub.Save(request, **self._options())
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise from_rpc_error(exc) from exc
        return saved

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if not writes:
            return
        try:
            self._stub.PutWrites(
                self._writes_request(config, writes, task_id, task_path), **self._options()
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        try:
            got = self._stub.Restore(self._restore_request(config), **self._options())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise from_rpc_error(exc) from exc
        return self._tuple(got.checkpoint, got.writes)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        wanted = get_checkpoint_id(config) if config else None
        token, count = "", 0
        while True:
            try:
                page = self._stub.List(
                    self._list_request(config, filter, before, token), **self._options()
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
            for item in self._page(page, wanted):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            token = page.next_page_token
            if not token:
                return

    def delete_thread(self, thread_id: str) -> None:
        request = pb.DeleteThreadRequest(
            thread_id=str(thread_id), namespace_prefix=self.prefix, allow_missing=True
        )
        try:
            self._stub.DeleteThread(request, **self._options())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        try:
            self._stub.PruneThreads(self._prune_request(thread_ids, strategy), **self._options())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        try:
            self._stub.CopyThread(
                self._copy_request(source_thread_id, target_thread_id), **self._options()
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        try:
            self._stub.DeleteForRuns(self._runs_request(run_ids), **self._options())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
