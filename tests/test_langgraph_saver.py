"""The LangGraph checkpointer over the checkpoint service, checked by LangGraph's own
conformance suite (langgraph-checkpoint-conformance) on SQLite and PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate

from tests.servers import checkpoint_stub
from workflow_client.saver import CheckpointServiceSaver
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

ROOT = Path(__file__).resolve().parent.parent

ALL = {
    "put",
    "put_writes",
    "get_tuple",
    "list",
    "delete_thread",
    "delete_for_runs",
    "copy_thread",
    "prune",
}


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_langgraph_conformance(service, tenant) -> None:
    @checkpointer_test(name=f"checkpoint-service-{tenant}")
    async def saver():
        made = CheckpointServiceSaver(service.address, tenant=tenant)
        try:
            yield made
        finally:
            await made.aclose()

    report = await validate(saver)
    report.print_report()
    detected = {name for name, result in report.results.items() if result.detected}
    assert detected == ALL, "every capability, not only the base ones"
    failures = {name: result.failures for name, result in report.results.items() if result.failures}
    assert not failures
    assert all(report.results[name].passed for name in ALL)
    assert report.passed_all()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_sync_methods(service, tenant) -> None:
    """LangGraph's sync API (put, put_writes, get_tuple, list, delete_thread) on a blocking
    channel of its own."""
    saver = CheckpointServiceSaver(service.address, tenant=tenant)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    saved = []
    for step in range(3):
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"n": step}
        config = saver.put(config, checkpoint, {"source": "loop", "step": step}, {})
        saved.append(config["configurable"]["checkpoint_id"])
    saver.put_writes(config, [("n", 99), ("__error__", "boom")], task_id="task-1")
    got = saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
    assert got is not None and got.checkpoint["channel_values"] == {"n": 2}
    assert got.parent_config["configurable"]["checkpoint_id"] == saved[1]
    assert sorted(got.pending_writes) == [("task-1", "__error__", "boom"), ("task-1", "n", 99)]
    listed = list(saver.list({"configurable": {"thread_id": "t"}}, filter={"step": 1}))
    assert [t.config["configurable"]["checkpoint_id"] for t in listed] == [saved[1]]
    assert [t.metadata["step"] for t in saver.list({"configurable": {"thread_id": "t"}})] == [
        2,
        1,
        0,
    ]
    saver.copy_thread("t", "t-copy")
    copied = list(saver.list({"configurable": {"thread_id": "t-copy"}}))
    assert [t.config["configurable"]["checkpoint_id"] for t in copied] == saved[::-1]
    saver.prune(["t-copy"], strategy="keep_latest")
    assert len(list(saver.list({"configurable": {"thread_id": "t-copy"}}))) == 1
    saver.delete_thread("t")
    assert saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}) is None
    run = {"configurable": {"thread_id": "r", "checkpoint_ns": ""}}
    run = saver.put(run, empty_checkpoint(), {"run_id": "run-1", "step": 0}, {})
    saver.delete_for_runs(["run-1"])
    assert saver.get_tuple(run) is None
    saver.close()


def _graph(service, tenant: str, *args: str) -> dict:
    """One process of the order graph (tests/langgraph_graph.py); its printed result."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.langgraph_graph", service.address, tenant, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_a_graph_started_in_one_process_and_resumed_in_another(service, tenant) -> None:
    """A real StateGraph: interrupt() waits for a human; another process answers; a third
    goes back in time with update_state and takes another branch. The checkpoints are
    visible on the store's own event feed."""
    started = await asyncio.to_thread(_graph, service, tenant, "start", "order-1")
    assert started == {"values": {"items": [3, 4, 5], "total": 12}, "waiting": True}
    resumed = await asyncio.to_thread(_graph, service, tenant, "resume", "order-1", "true")
    assert resumed["waiting"] is False
    assert resumed["values"]["receipt"] == "charged 12"
    forked = await asyncio.to_thread(_graph, service, tenant, "fork", "order-1", "100")
    assert forked["values"]["receipt"] == "charged 100"

    saver = CheckpointServiceSaver(service.address, tenant=tenant)
    history = [t async for t in saver.alist({"configurable": {"thread_id": "order-1"}})]
    receipts = [t.checkpoint["channel_values"].get("receipt") for t in history]
    assert "charged 12" in receipts and receipts[0] == "charged 100", "both branches kept"
    await saver.aclose()

    channel, store, md = await checkpoint_stub(service.address, tenant)
    saved = []
    async for item in store.Stream(
        cpb.StreamRequest(namespace="lg:", thread_id="order-1", follow=True), metadata=md
    ):
        if item.HasField("heartbeat"):
            break
        if item.event.type == "checkpoint.saved":
            saved.append(item.event.payload["checkpoint_id"])
    await channel.close()
    assert len(saved) == len(history) and set(saved) == {
        t.config["configurable"]["checkpoint_id"] for t in history
    }


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_cancelled_astream_then_a_second_event_loop(service, tenant) -> None:
    """One async saver, a graph streamed and cancelled half-way in one asyncio.run, finished
    in a second one. The saver once kept a channel of the first (closed) loop: "Event loop is
    closed" raised inside grpc.aio, at the next call and when the channel was collected."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.langgraph_graph", service.address, tenant, "cancel", "c1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["values"]["done"] == ["first", "slow", "last"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_writes_put_together_are_stored_as_each_task_put_them(service, tenant) -> None:
    """A step's tasks put their writes in the same turn of the loop, and they go to the store
    in one call: each task's writes still land as if put alone, special writes (an error)
    still replace their slot, and another checkpoint's writes stay apart."""
    saver = CheckpointServiceSaver(service.address, tenant=tenant)
    try:
        config = {"configurable": {"thread_id": "together", "checkpoint_ns": ""}}
        first = await saver.aput(config, empty_checkpoint(), {}, {})
        second = await saver.aput(first, empty_checkpoint(), {}, {})
        await asyncio.gather(
            *(
                saver.aput_writes(second, [("out", i), ("log", f"task {i}")], f"t{i}")
                for i in range(4)
            ),
            saver.aput_writes(second, [("__error__", "first")], "failing"),
            saver.aput_writes(first, [("late", True)], "older"),
        )
        await asyncio.gather(
            saver.aput_writes(second, [("out", "again")], "t0"),  # kept once, not replaced
            saver.aput_writes(second, [("__error__", "second")], "failing"),  # replaces
        )
        got = await saver.aget_tuple(second)
        writes = sorted((task, channel, value) for task, channel, value in got.pending_writes)
        assert writes == sorted(
            [(f"t{i}", "out", i) for i in range(4)]
            + [(f"t{i}", "log", f"task {i}") for i in range(4)]
            + [("failing", "__error__", "second")]
        )
        older = await saver.aget_tuple(first)
        assert older.pending_writes == [("older", "late", True)]
    finally:
        await saver.aclose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_writes_cancelled_before_they_are_sent_leave_nothing_behind(service, tenant) -> None:
    """A task cancelled in the turn it put its writes (a sibling failed): the writes put
    after it for the same checkpoint (the step run again) are stored, not refused; and a
    fan-out bigger than one call takes goes in several."""
    saver = CheckpointServiceSaver(service.address, tenant=tenant)
    try:
        config = {"configurable": {"thread_id": "cancelled", "checkpoint_ns": ""}}
        saved = await saver.aput(config, empty_checkpoint(), {}, {})
        put = asyncio.ensure_future(saver.aput_writes(saved, [("out", 1)], "t1"))
        await asyncio.sleep(0)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        await saver.aput_writes(saved, [("out", 2)], "t1")
        await asyncio.gather(
            *(saver.aput_writes(saved, [("fan", i), ("log", i)], f"f{i}") for i in range(600))
        )
        got = await saver.aget_tuple(saved)
        assert ("t1", "out", 2) in got.pending_writes
        assert len(got.pending_writes) == 1 + 1200
    finally:
        await saver.aclose()
