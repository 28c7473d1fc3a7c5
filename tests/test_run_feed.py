"""RunFeed (engine_svc/run_feed.py), in-process: how a batched watcher's responses are cut."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from engine_svc import run_feed
from engine_svc.run_feed import RunFeed
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb


def _event(kind: str, node: str) -> cpb.NewEvent:
    event = cpb.NewEvent(type=kind)
    event.payload.update({"node_id": node, "status": "RUNNING"})
    return event


def _now() -> Timestamp:
    now = Timestamp()
    now.GetCurrentTime()
    return now


def _last_save(seq: int) -> tuple[cpb.SaveRequest, cpb.SaveResponse]:
    """The Save that ends the run: its checkpoint.saved at `seq`, then a run.status."""
    done = cpb.NewEvent(type="run.status")
    done.payload.update({"status": "COMPLETED"})
    request = cpb.SaveRequest(events=[done])
    response = cpb.SaveResponse(
        seq=seq,
        checkpoint=cpb.Checkpoint(checkpoint_id="c", step=2),
        thread=cpb.Thread(status=cpb.THREAD_STATUS_COMPLETED),
        events_time=_now(),
    )
    return request, response


async def test_a_batch_waits_a_moment_for_more_but_never_after_the_last_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_feed, "BATCH_LINGER_SECONDS", 60.0)  # long: waiting shows
    feed = RunFeed(namespace="runs", run_id="r")
    feed.appended([_event("node.started", "a")], [1], _now())
    follower = feed.follow(0, 60.0, batched=True)
    first = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0.05)
    assert not first.done(), "the batch went before its linger"
    feed.appended([_event("node.completed", "a")], [2], _now())
    await asyncio.sleep(0.05)
    assert not first.done()
    feed.saved(*_last_save(3))  # the run's last events: sent at once, linger or not
    batch = await asyncio.wait_for(first, 5)
    events = batch.events.events
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.terminal for e in events] == [False, False, False, True]
    feed.close()
    assert [item async for item in follower] == []


async def test_without_a_linger_a_batch_holds_what_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_feed, "BATCH_LINGER_SECONDS", 0.0)
    feed = RunFeed(namespace="runs", run_id="r")
    feed.appended([_event("node.started", "a"), _event("node.started", "b")], [1, 2], _now())
    follower = feed.follow(0, 60.0, batched=True)
    batch = await asyncio.wait_for(anext(follower), 5)
    assert [e.seq for e in batch.events.events] == [1, 2]
    nxt = asyncio.ensure_future(anext(follower))
    feed.appended([_event("node.completed", "a")], [3], _now())
    batch = await asyncio.wait_for(nxt, 5)
    assert [e.seq for e in batch.events.events] == [3]
    feed.close()
    await follower.aclose()
