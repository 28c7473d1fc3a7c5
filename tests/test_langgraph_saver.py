"""The LangGraph checkpointer over the checkpoint service, checked by LangGraph's own
conformance suite (langgraph-checkpoint-conformance) on SQLite and PostgreSQL + Redis."""

from __future__ import annotations

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate

from workflow_client.saver import CheckpointServiceSaver

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
