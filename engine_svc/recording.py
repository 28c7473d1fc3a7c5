"""What an execution writes to the store: checkpoints, node results as pending writes, and
events, each call fenced by the run's lease token (docs/engine.md#checkpoints)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from engine_svc import metrics
from engine_svc.definition import NodeSpec, Workflow
from engine_svc.execution import Execution, Unwritten
from engine_svc.run_feed import RunFeed
from engine_svc.run_state import OUTPUT_CHANNEL, RUNS_NAMESPACE, event
from engine_svc.store import Store
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

__all__ = ["RunRecorder", "done_event", "run_checkpoint", "started_events"]


class RunRecorder:
    """Saves an execution's checkpoints, writes and events; tells the run's feed here (for
    WatchRun) what each call appended."""

    def __init__(self, store: Store, feeds: dict[str, RunFeed]) -> None:
        self.store = store
        self.feeds = feeds  # run id -> the events its execution here appended

    async def save(
        self,
        ex: Execution,
        trigger: int,
        *,
        name: str = "",
        metadata: dict[str, str] | None = None,
        events: list[cpb.NewEvent] | None = None,
        status: bool = True,
        workflow_version: int = 0,
        release: bool = False,
    ) -> str:
        """A checkpoint of the run as it is now; the new head. Holds node writes back meanwhile.
        `release`: the execution ends with it, and it lets the lease go in the same commit."""
        run = ex.run
        async with ex.gate.exclusive():
            run.eta_seconds = ex.eta()
            progress = ex.progress()
            # Results not sent yet are in this checkpoint's state: it saves their events too.
            absorbed, ex.unwritten = ex.unwritten, []
            events = [*ex.carry, *(i.event for i in absorbed if i.event), *(events or [])]
            checkpoint = run_checkpoint(ex, trigger, name, metadata)
            checkpoint.progress_percent = progress["progress_percent"]
            checkpoint.eta_seconds = run.eta_seconds
            request = cpb.SaveRequest(
                checkpoint=checkpoint,
                keep_last=ex.workflow.keep_last,
                expected_parent_id=ex.head_id,
                fencing_token=ex.token,
                status=run.status.thread_status if status else 0,
                workflow_version=workflow_version,
                events=events,
                # Unique per (head, token): a retry after a lost answer gets the first result.
                request_id=f"save:{run.run_id}:{ex.token}:{ex.head_id}",
                release_lease=release,
            )
            try:
                saved = await self.store.save(request)
            except BaseException:
                ex.unwritten = absorbed + ex.unwritten  # still to be written
                raise
            if feed := self.feeds.get(run.run_id):
                feed.saved(request, saved)
            ex.carry.clear()
            ex.released = release
            ex.head_id = saved.checkpoint.checkpoint_id
            metrics.checkpoints(trigger).inc()
            return ex.head_id

    async def write(
        self,
        ex: Execution,
        node_id: str,
        channel: str,
        value: Any,
        event_of: Callable[[], cpb.NewEvent] | None = None,
        *,
        deferred: bool = False,
        step_saves: bool = False,
    ) -> None:
        """A node's result, saved with its event before this returns. `deferred`: the step's
        checkpoint, which comes next, saves it instead. `step_saves`: a checkpoint follows the
        step, so if the step is over by the time the write would be sent, it saves it.

        Results that finish together go in one PutWrites; a checkpoint taken meanwhile saves
        them itself (docs/engine.md#checkpoints). The node counts as done from here on (so
        events of nodes finishing together count each other); no checkpoint can be taken
        while a write is being sent, and if a write fails the run stops."""
        run = ex.run
        async with ex.gate.shared():
            if channel == OUTPUT_CHANNEL:
                run.outputs[node_id] = value
                ex.state_json.put("outputs", node_id, value)
                run.completed.append(node_id)
            else:
                run.skipped.append(node_id)
            event = event_of() if event_of else None
            if deferred:
                ex.carry.extend([event] if event else [])
                return
            write = cpb.PendingWrite(
                task_id=node_id, idx=0, channel=channel, value=json.dumps(value).encode()
            )
            ex.unwritten.append(Unwritten(write, event, step_saves))
            if ex.writer is None:
                ex.writer = asyncio.ensure_future(self._write_together(ex))
            writer = ex.writer
        await asyncio.shield(writer)

    async def _write_together(self, ex: Execution) -> None:
        """Send the results waiting to be written, in one call, once the nodes finishing in
        this same turn of the event loop have joined them."""
        await asyncio.sleep(0)
        run = ex.run
        async with ex.gate.shared():
            ex.writer = None  # results from now on go in a call of their own
            items, ex.unwritten = ex.unwritten, []
            events = [i.event for i in items if i.event is not None]
            if not items:
                return  # a checkpoint saved them meanwhile
            if ex.running == 0 and all(i.step_saves for i in items):
                ex.carry.extend(events)  # the step is over: its checkpoint, next, saves them
                return
            for i in items:
                i.write.checkpoint_id = ex.head_id
            written = await self.store.put_writes(
                cpb.PutWritesRequest(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run.run_id,
                    fencing_token=ex.token,
                    writes=[i.write for i in items],
                    events=events,
                    request_id=(
                        f"writes:{run.run_id}:{ex.token}:{ex.head_id}:"
                        f"{items[0].write.task_id}:{len(items)}"
                    ),
                )
            )
            if events and (feed := self.feeds.get(run.run_id)):
                feed.appended(events, written.seqs, written.events_time)

    async def publish(self, ex: Execution, events: list[cpb.NewEvent]) -> None:
        published = await self.store.publish(
            cpb.PublishRequest(
                namespace=RUNS_NAMESPACE,
                thread_id=ex.run.run_id,
                events=events,
                fencing_token=ex.token,
                request_id=f"publish:{ex.run.run_id}:{ex.token}:{time.time_ns()}",
            )
        )
        if feed := self.feeds.get(ex.run.run_id):
            feed.appended(events, published.seqs, published.events_time)


def started_events(ex: Execution, node_ids: list[str]) -> list[cpb.NewEvent]:
    """node.started of these nodes, with the run's progress."""
    progress = ex.progress()
    return [
        event("node.started", node_id=n, attempt=1, status=ex.run.status, **progress)
        for n in node_ids
    ]


def done_event(ex: Execution, node: NodeSpec, **payload: Any) -> Callable[[], cpb.NewEvent]:
    """node.completed (or node.skipped, without a payload), built once the node counts as
    done, so that its progress includes it."""
    kind = "node.completed" if payload else "node.skipped"
    return lambda: event(kind, node_id=node.id, status=ex.run.status, **payload, **ex.progress())


def run_checkpoint(
    ex: Execution, trigger: int, name: str, metadata: dict[str, str] | None
) -> cpb.Checkpoint:
    """A checkpoint of the run as it is now, as every save of a run sends it."""
    run = ex.run
    return cpb.Checkpoint(
        namespace=RUNS_NAMESPACE,
        thread_id=run.run_id,
        state=ex.state_json.encode(run.__dict__),
        content_type="application/json",
        step=run.step,
        trigger=trigger,
        name=name,
        completed_nodes=run.completed,
        metadata=metadata or {},
        expires_at=_expiry(ex.workflow),
    )


def _expiry(workflow: Workflow) -> Timestamp | None:
    """When a checkpoint of this workflow's runs expires (its policy's ttl), if ever."""
    if workflow.ttl is None:
        return None
    expires = Timestamp()
    expires.FromNanoseconds(int((time.time() + workflow.ttl) * 1e9))
    return expires
