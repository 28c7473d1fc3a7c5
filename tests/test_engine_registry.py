"""Workflow versions kept in the checkpoint service's `workflows` namespace."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import json_format

from engine_svc.definition import DefinitionInvalid
from engine_svc.registry import WorkflowNotFound, WorkflowRegistry
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
    registry = WorkflowRegistry(s)
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
    registry = WorkflowRegistry(s)
    results = await asyncio.gather(
        *(registry.register(tenant, definition(seconds)) for seconds in range(1, 6))
    )
    assert sorted(r.version for r in results) == [1, 2, 3, 4, 5]
    assert all(r.created for r in results)
    assert (await registry.get(tenant, "etl")).active_version == 5


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_invalid_definition_is_not_stored(stub, tenant) -> None:
    s, _ = stub
    registry = WorkflowRegistry(s)
    bad = definition(-1)
    with pytest.raises(DefinitionInvalid) as err:
        await registry.register(tenant, bad)
    assert "nodes[1].config.seconds" in dict(err.value.violations)
    with pytest.raises(WorkflowNotFound):
        await registry.get(tenant, "etl")
