"""Workflow versions kept in the checkpoint service's `workflows` namespace."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format

from engine_svc.config import Settings
from engine_svc.definition import DefinitionInvalid
from engine_svc.engine import Engine
from engine_svc.registry import WorkflowNotFound, WorkflowRegistry
from engine_svc.store import GrpcStore
from workflow_stubs.engine.v1 import engine_pb2 as pb


def definition(seconds: float = 1, workflow_id: str = "etl") -> pb.WorkflowDefinition:
    return json_format.ParseDict(
        {
            "workflow_id": workflow_id,
            "nodes": [
                {"id": "extract", "type": "noop"},
                {
                    "id": "wait",
                    "type": "sleep",
                    "depends_on": ["extract"],
                    "config": {"seconds": seconds},
                },
            ],
        },
        pb.WorkflowDefinition(),
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_versions_are_created_only_for_changes(stub, tenant) -> None:
    s, _ = stub
    registry = WorkflowRegistry(lambda t: GrpcStore(stub=s, tenant=t))
    first = await registry.register(tenant, definition(1))
    assert (first.version, first.created) == (1, True)
    same = await registry.register(tenant, definition(1))
    assert (same.version, same.created) == (1, False)
    second = await registry.register(tenant, definition(2))
    assert (second.version, second.created) == (2, True)

    active = await registry.get(tenant, "etl")
    assert (active.version, active.active_version) == (2, 2)
    assert json_format.MessageToDict(active.definition)["nodes"][1]["config"] == {"seconds": 2}
    old = await registry.get(tenant, "etl", version=1)
    assert old.version == 1 and old.active_version == 2
    assert json_format.MessageToDict(old.definition)["nodes"][1]["config"] == {"seconds": 1}
    with pytest.raises(WorkflowNotFound):
        await registry.get(tenant, "etl", version=3)
    with pytest.raises(WorkflowNotFound):
        await registry.get(tenant, "nope")
    with pytest.raises(WorkflowNotFound):
        await registry.get("another-tenant", "etl")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_concurrent_registrations_get_distinct_versions(stub, tenant) -> None:
    s, _ = stub
    registry = WorkflowRegistry(lambda t: GrpcStore(stub=s, tenant=t))
    results = await asyncio.gather(
        *(registry.register(tenant, definition(seconds)) for seconds in range(1, 6))
    )
    assert sorted(r.version for r in results) == [1, 2, 3, 4, 5]
    assert all(r.created for r in results)
    assert (await registry.get(tenant, "etl")).active_version == 5


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_invalid_definition_is_not_stored(stub, tenant) -> None:
    s, _ = stub
    registry = WorkflowRegistry(lambda t: GrpcStore(stub=s, tenant=t))
    bad = definition(-1)
    with pytest.raises(DefinitionInvalid) as err:
        await registry.register(tenant, bad)
    assert "nodes[1].config.seconds" in dict(err.value.violations)
    with pytest.raises(WorkflowNotFound):
        await registry.get(tenant, "etl")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_runs_start_on_the_active_version_whichever_engine_changed_it(
    service, tenant
) -> None:
    """An engine starts runs on its copy of the active version without reading it first;
    once another engine registered or rolled back, the store refuses the copy in the run's
    first checkpoint and the run starts on the version active now."""
    a, b = _engine(service, "engine-a"), _engine(service, "engine-b")
    reads = 0
    read = a.registry.get

    async def counted(*args, **kwargs):
        nonlocal reads
        reads += 1
        return await read(*args, **kwargs)

    a.registry.get = counted  # type: ignore[method-assign]
    try:
        await a.register(tenant, definition(0))
        assert (await a.start_run(tenant, "etl", 0, {}, "", "")).run.version == 1
        assert reads == 1
        assert (await a.start_run(tenant, "etl", 0, {}, "", "")).run.version == 1
        assert reads == 1, "the second start read the workflow again"
        await b.register(tenant, definition(0.001))
        assert (await a.start_run(tenant, "etl", 0, {}, "", "")).run.version == 2
        assert reads == 2
        await b.rollback(tenant, "etl", 1, "canary failed", "test")
        started = await a.start_run(tenant, "etl", 0, {}, "", "")
        assert started.run.version == 1
        thread = await a.thread(tenant, started.run.run_id)
        assert thread.workflow_version == 1
    finally:
        await a.close()
        await b.close()


def _engine(service, owner: str) -> Engine:
    settings = Settings()
    settings.checkpoint_addr = service.address
    settings.recovery_interval = 0
    settings.owner = owner
    return Engine(settings)


class _AnswerLost:
    """The store's stub, except that the first Save's answer is lost after the store applied
    it (a broken connection): the adapter sees UNAVAILABLE and sends it again."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.lost = 0

    def __getattr__(self, name: str):
        return getattr(self._stub, name)

    async def Save(self, request, **kwargs):
        response = await self._stub.Save(request, **kwargs)
        if not self.lost:
            self.lost += 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "lost"
            )
        return response


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_registration_or_rollback_whose_answer_was_lost_happens_once(stub, tenant) -> None:
    s, _ = stub
    lossy = _AnswerLost(s)
    registry = WorkflowRegistry(lambda t: GrpcStore(stub=lossy, tenant=t))
    first = await registry.register(tenant, definition(1))
    assert lossy.lost == 1
    assert (first.version, first.created) == (1, True), "the retry saw its own version"
    await registry.register(tenant, definition(2))
    lossy.lost = 0
    assert await registry.rollback(tenant, "etl", 1, "bad", "me") == (1, 2)
    assert lossy.lost == 1
    versions = await registry.versions(tenant, "etl")
    assert [c.kind for c in versions.history] == ["rollback", "registered", "registered"]
    assert (versions.active, versions.history[0].previous_version) == (1, 2)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_definitions_outlive_retention(service_factory, backend, tenant) -> None:
    """The registry saves its versions kept forever (SaveRequest.keep_forever): a store that
    expires everything after a second and keeps one checkpoint per thread keeps them all."""
    from tests.servers import checkpoint_stub

    svc = service_factory(backend, "--sql-ttl", "1", "--keep-last", "1", "--sweep-interval", "0.2")
    channel, s, _ = await checkpoint_stub(svc.address, tenant)
    registry = WorkflowRegistry(lambda t: GrpcStore(stub=s, tenant=t))
    try:
        for seconds in (1, 2, 3):
            await registry.register(tenant, definition(seconds))
        await registry.rollback(tenant, "etl", 1, "back", "test")
        await asyncio.sleep(2)  # everything past --sql-ttl; several sweeps ran
        registry.forget(tenant, "etl")
        for version in (1, 2, 3):
            assert (await registry.get(tenant, "etl", version=version)).version == version
        assert len((await registry.versions(tenant, "etl")).history) == 4
    finally:
        await channel.close()
