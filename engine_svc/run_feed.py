"""A run's events as the engine executing it committed them, for the watchers it serves
(docs/engine.md#watching-a-run).

The store numbers every event and answers each call with the seqs and time it gave them, so the
engine that wrote them can hand them to its own watchers without reading them back from the
store's Stream: one hop and one conversion less per event, and the end of a run seen at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from engine_svc.run_state import TERMINAL, RunStatus
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

# Events held per run: a watcher further behind reads the older ones from the store.
EVENTS_HELD = 10_000
# How long a watcher waits for a seq while later ones are here (the call that appended it has
# not been answered yet) before it reads that seq from the store: someone else appended it.
GAP_WAIT_SECONDS = 0.5
# Events in one batched WatchRun response, at most.
BATCH_MAX = 500
# How long a batched response waits for more events after its first (never after the run's
# last): a progress bar loses nothing at this pace, and a fast run's watcher gets a few
# responses per step less (docs/engine.md#watching-a-run).
BATCH_LINGER_SECONDS = 0.005

_TERMINAL = frozenset(status.thread_status for status in TERMINAL)

# An event as held: as its call sent it (a Save's answer standing for its "checkpoint.saved"),
# with its time and whether it ended the run, until a watcher asks for it; then as WatchRun
# gives it.
_Pending = tuple[cpb.NewEvent | cpb.SaveResponse, Timestamp, bool]
_Held = pb.WatchRunResponse | _Pending


class RunFeed:
    """The events of one run that this engine's calls appended, by seq.

    A watcher follows it while it holds the watcher's next seq in order, and goes to the
    store's Stream for anything else: events before the execution began, events someone else
    appended, or all of them once the execution ends without ending the run.
    """

    def __init__(self, *, namespace: str, run_id: str, limit: int = EVENTS_HELD) -> None:
        self.namespace = namespace
        self.run_id = run_id
        self.limit = limit
        self.first = 0
        """The lowest seq held; 0 while none is."""
        self.high = 0
        """The highest seq held."""
        self.closed = False
        """The execution is over: nothing more comes here."""
        self.terminal = False
        """The last Save recorded ended the run (COMPLETED, FAILED, CANCELLED)."""
        self._held: dict[int, _Held] = {}
        self._waiters: list[asyncio.Future[None]] = []

    # ---- what the executor records ------------------------------------------------------

    def saved(self, request: cpb.SaveRequest, response: cpb.SaveResponse) -> None:
        """A Save's events: "checkpoint.saved" at its seq, then the request's own."""
        if not response.HasField("events_time") or not response.HasField("thread"):
            return  # a replayed answer: those seqs are the store's to give
        self.terminal = response.thread.status in _TERMINAL
        self._record(response.seq, [response, *request.events], response.events_time, self.terminal)

    def appended(
        self, events: Sequence[cpb.NewEvent], seqs: Sequence[int], when: Timestamp
    ) -> None:
        """The events of a PutWrites or Publish, at the seqs its answer gave them."""
        if len(seqs) != len(events) or not seqs or not when.seconds:
            return
        if list(seqs) != list(range(seqs[0], seqs[0] + len(seqs))):
            return
        self._record(seqs[0], list(events), when, False)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _record(
        self,
        first_seq: int,
        events: Sequence[cpb.NewEvent | cpb.SaveResponse],
        when: Timestamp,
        ends_run: bool,
    ) -> None:
        last = first_seq + len(events) - 1
        held = self._held
        for seq, event in enumerate(events, first_seq):
            held[seq] = (event, when, ends_run and seq == last)
        self.first = min(self.first or first_seq, first_seq)
        self.high = max(self.high, last)
        while len(self._held) > self.limit:
            self._held.pop(self.first, None)
            self.first += 1
        self._wake()

    # ---- what watchers read -------------------------------------------------------------

    def holds(self, cursor: int) -> bool:
        """Whether the event after `cursor` is here or still to come here: nothing before it
        is missing. (A watcher may be ahead of the feed: the store's Stream can deliver an
        event before the answer to the call that appended it reaches the executor.)"""
        return bool(self.first) and self.first <= cursor + 1

    def ended_at(self, cursor: int) -> bool:
        """The run ended here and a watcher at `cursor` has seen all of it."""
        return self.closed and self.terminal and cursor >= self.high

    def _item(self, seq: int) -> pb.WatchRunResponse | None:
        held = self._held.get(seq)
        if held is None or isinstance(held, pb.WatchRunResponse):
            return held
        event, when, terminal = held
        new = _checkpoint_saved(event) if isinstance(event, cpb.SaveResponse) else event
        built = self._held[seq] = run_event(  # once, whoever watches
            seq, new.type, when, new.payload, terminal or new.terminal
        )
        return built

    async def follow(
        self, cursor: int, heartbeat_seconds: float, *, batched: bool = False
    ) -> AsyncIterator[pb.WatchRunResponse]:
        """The events after `cursor` in order (`batched`: all those here at once in one
        response), and a heartbeat when idle that long. Ends when the next one will not come
        here: the execution is over, it was let go (too far behind), or it is missing while
        later ones are here."""
        idle_since = time.monotonic()
        missing_since: float | None = None
        while True:
            item = self._item(cursor + 1)
            if item is not None:
                cursor += 1
                idle_since, missing_since = time.monotonic(), None
                if not batched:
                    yield item
                    continue
                together = [item.event]
                until = idle_since + BATCH_LINGER_SECONDS
                while len(together) < BATCH_MAX and not together[-1].terminal:
                    more = self._item(cursor + 1)
                    if more is not None:
                        together.append(more.event)
                        cursor += 1
                        continue
                    wait = until - time.monotonic()
                    if wait <= 0 or self.closed:
                        break
                    await self._changed(wait)
                yield pb.WatchRunResponse(events=pb.RunEvents(events=together))
                continue
            if self.closed or cursor + 1 < self.first:
                return
            now = time.monotonic()
            if self.high > cursor + 1:
                missing_since = missing_since or now
                wait = GAP_WAIT_SECONDS - (now - missing_since)
                if wait <= 0:
                    return
            else:
                wait = heartbeat_seconds - (now - idle_since)
                if wait <= 0:
                    idle_since = now
                    beat = pb.WatchRunResponse(heartbeat=pb.Heartbeat(last_seq=cursor))
                    beat.heartbeat.time.GetCurrentTime()
                    yield beat
                    continue
            await self._changed(wait)

    async def _changed(self, seconds: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _checkpoint_saved(response: cpb.SaveResponse) -> cpb.NewEvent:
    """The "checkpoint.saved" event the store appended for a Save, as its feed holds it
    (docs/engine.md#watching-a-run)."""
    cp = response.checkpoint
    event = cpb.NewEvent(type="checkpoint.saved")
    event.payload.update(
        {
            "checkpoint_id": cp.checkpoint_id,
            "parent_id": cp.parent_id,
            "step": cp.step,
            "trigger": cpb.Trigger.Name(cp.trigger).removeprefix("TRIGGER_"),
            "name": cp.name,
            "status": str(RunStatus.of_thread(response.thread.status) or "UNSPECIFIED"),
            "progress_percent": cp.progress_percent,
            "eta_seconds": cp.eta_seconds,
            "completed_nodes": len(cp.completed_nodes),
        }
    )
    return event


def watch_response(item: cpb.StreamResponse, *, batched: bool = False) -> pb.WatchRunResponse:
    """An item of the store's Stream of a run, as WatchRun gives it (`batched`: an event as
    a batch of one)."""
    if item.HasField("heartbeat"):
        return pb.WatchRunResponse(
            heartbeat=pb.Heartbeat(time=item.heartbeat.time, last_seq=item.heartbeat.last_seq)
        )
    ev = item.event
    watched = run_event(ev.seq, ev.type, ev.time, ev.payload, ev.terminal)
    if batched:
        return pb.WatchRunResponse(events=pb.RunEvents(events=[watched.event]))
    return watched


def run_event(
    seq: int, kind: str, when: Timestamp, payload: struct_pb2.Struct, terminal: bool
) -> pb.WatchRunResponse:
    """A run's event as WatchRun gives it, from the event as stored: the fields read straight
    from its payload (a JSON round trip of the Struct cost more than the rest of the event)."""
    fields = payload.fields

    def text(name: str) -> str:
        return fields[name].string_value if name in fields else ""

    def number(name: str) -> float:
        return fields[name].number_value if name in fields else 0.0

    status = RunStatus.of_name(text("status"))
    event = pb.RunEvent(
        seq=seq,
        type=kind,
        time=when,
        status=status.proto if status is not None else 0,
        node_id=text("node_id"),
        attempt=int(number("attempt")),
        error=text("error"),
        completed_nodes=int(number("completed_nodes")),
        total_nodes=int(number("total_nodes")),
        terminal=terminal,
        eta_seconds=number("eta_seconds"),
    )
    if "output" in fields:
        event.output.CopyFrom(fields["output"])
    if "duration_seconds" in fields:
        seconds = number("duration_seconds")
        event.duration.CopyFrom(
            duration_pb2.Duration(nanos=int(seconds % 1 * 1e9), seconds=int(seconds))
        )
    if "progress_percent" in fields:
        event.progress_percent = number("progress_percent")
    elif event.total_nodes:
        event.progress_percent = 100.0 * event.completed_nodes / event.total_nodes
    return pb.WatchRunResponse(event=event)
