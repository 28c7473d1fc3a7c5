"""A run's control feed: how PauseRun, CancelRun, CheckpointRun and a ResumeRun of a
pausing run reach the engine that executes it (docs/engine.md#steering-a-run).

The feed is a thread of its own in the store (`run-control/<run id>`) that anyone may append
to; the engine holding the run's lease follows it and acts on each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from google.protobuf import json_format

from engine_svc.execution import Execution
from engine_svc.recording import RunRecorder
from engine_svc.run_state import NotResumable, RunState, RunStatus, event
from engine_svc.store import Store, StoreError
from workflow_rpc.namespaces import CONTROL_NAMESPACE
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

__all__ = ["CONTROL_FOLLOW_AFTER", "CONTROL_NAMESPACE", "ControlFeed", "check_control"]

# How far into an execution the engine starts following the run's control feed: PauseRun,
# CancelRun and CheckpointRun wait in the feed until then (docs/engine.md#steering-a-run).
CONTROL_FOLLOW_AFTER = 0.25


class ControlFeed:
    """Follows the control feeds of the runs executing here."""

    def __init__(self, store: Store, recorder: RunRecorder) -> None:
        self.store = store
        self.recorder = recorder

    async def follow(self, ex: Execution, steps: asyncio.Task) -> None:
        """Follow the run's control feed from the last request handled, and act on each.
        Only from CONTROL_FOLLOW_AFTER into the execution, or once this engine was asked
        (follow_control): a short run opens no stream, and a request made on another engine
        before then waits in the feed until it is read."""
        run = ex.run
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_FOLLOW_AFTER):
                await ex.follow_control.wait()
        while True:
            try:
                async for item in self.store.stream(
                    cpb.StreamRequest(
                        namespace=CONTROL_NAMESPACE,
                        thread_id=run.run_id,
                        after_seq=run.control_seq,
                        follow=True,
                    )
                ):
                    if not item.HasField("event"):
                        continue
                    ev = item.event
                    run.control_seq = ev.seq
                    request = json_format.MessageToDict(ev.payload)
                    if float(request.get("deadline", math.inf)) < time.time():
                        continue  # the asker gave up on it and said so
                    await self._on_control(ex, steps, ev.type, request)
            except StoreError:
                await asyncio.sleep(1.0)  # the store is away; resume from the last seq

    async def _on_control(
        self, ex: Execution, steps: asyncio.Task, kind: str, request: dict[str, Any]
    ) -> None:
        control_id = str(request.get("control_id", ""))
        if kind == "control.cancel":
            ex.cancel = (str(request.get("reason", "")), control_id)
            async with ex.gate.exclusive():  # no save or write is cut off half-way
                steps.cancel()
        elif kind == "control.pause" and ex.pause is None:
            ex.pause = ("requested", control_id)
            await self.recorder.publish(ex, [event("run.pausing", control_id=control_id)])
        elif kind == "control.unpause":  # a ResumeRun of a run whose pause is still pending
            # The answer's type says which: taken back, too late (PAUSED in a moment), or none.
            if ex.pause is not None and not ex.pausing and not ex.shutdown:
                ex.pause = None
                answer = "run.unpaused"
            else:
                answer = "run.pausing" if ex.pause is not None else "control.refused"
            await self.recorder.publish(ex, [event(answer, control_id=control_id)])
        elif kind == "control.checkpoint":
            ack = event("control.applied", control_id=control_id)
            await self.recorder.save(
                ex,
                cpb.TRIGGER_MANUAL,
                name=str(request.get("name", "")),
                metadata={str(k): str(v) for k, v in request.get("metadata", {}).items()},
                events=[ack],
                status=False,
            )


def check_control(run: RunState, action: str) -> None:
    """NotResumable unless `action` applies to a run in this status."""
    if action == "checkpoint":
        return
    if run.status.terminal:
        raise NotResumable(f"run {run.run_id!r} is already {run.status}")
    if action == "pause" and run.status is RunStatus.WAITING:
        raise NotResumable(f"run {run.run_id!r} is WAITING for an answer: resume or cancel it")
    if action == "unpause" and run.status is not RunStatus.RUNNING:
        raise NotResumable(f"run {run.run_id!r} is {run.status}, not pausing")
