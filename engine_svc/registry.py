"""Workflow definitions and their versions, kept as a checkpointed thread in the store's
`workflows` namespace (DESIGN section 2): each version is one checkpoint, the head is the
active version, and retention never prunes that namespace.

Version numbers are allocated through checkpoint ids (`v0000000001`, ...): two engines
registering at once cannot both take the same number, because the store refuses a taken id.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from engine_svc.definition import fingerprint, parse
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb

WORKFLOWS_NAMESPACE = "workflows"
_CONFLICTS = (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED)
_ATTEMPTS = 10


class RegistrationContended(RuntimeError):
    """Other engines kept registering the same workflow meanwhile: try again (ABORTED)."""


class WorkflowNotFound(LookupError):
    """No such workflow, or no such version of it."""


@dataclass(frozen=True, slots=True)
class Registered:
    workflow_id: str
    version: int
    created: bool  # False: the definition equals the active version


@dataclass(frozen=True, slots=True)
class StoredWorkflow:
    definition: pb.WorkflowDefinition
    version: int
    active_version: int


def version_id(version: int) -> str:
    return f"v{version:010d}"


class WorkflowRegistry:
    def __init__(self, store: cpb_grpc.CheckpointServiceStub) -> None:
        self.store = store

    async def register(self, tenant: str, definition: pb.WorkflowDefinition) -> Registered:
        """Validate (DefinitionInvalid) and store; an unchanged definition is not a new version."""
        parse(definition)
        md = (("x-tenant-id", tenant),)
        digest = fingerprint(definition)
        for _ in range(_ATTEMPTS):
            head = await self._head(md, definition.workflow_id)
            if head is not None and head.checkpoint.metadata.get("fingerprint") == digest:
                active = int(head.checkpoint.metadata["version"])
                return Registered(definition.workflow_id, active, created=False)
            latest = int(head.checkpoint.metadata["latest_version"]) if head else 0
            version = latest + 1
            checkpoint = cpb.Checkpoint(
                namespace=WORKFLOWS_NAMESPACE,
                thread_id=definition.workflow_id,
                checkpoint_id=version_id(version),
                state=json_format.MessageToJson(definition).encode(),
                trigger=cpb.TRIGGER_MANUAL,
                name=f"version {version}",
                metadata={
                    "version": str(version),
                    "latest_version": str(version),
                    "fingerprint": digest,
                },
            )
            request = cpb.SaveRequest(
                checkpoint=checkpoint,
                expected_parent_id=head.checkpoint.checkpoint_id if head else "",
            )
            try:
                await self.store.Save(request, metadata=md)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _CONFLICTS:
                    continue  # another engine registered meanwhile: look again
                raise
            return Registered(definition.workflow_id, version, created=True)
        raise RegistrationContended(
            f"could not register {definition.workflow_id}: too many concurrent registrations"
        )

    async def get(self, tenant: str, workflow_id: str, version: int = 0) -> StoredWorkflow:
        """A version of a workflow (0: the active one)."""
        md = (("x-tenant-id", tenant),)
        head = await self._head(md, workflow_id)
        if head is None:
            raise WorkflowNotFound(f"workflow {workflow_id!r} not found")
        active = int(head.checkpoint.metadata["version"])
        found = head
        if version and version != active:
            try:
                found = await self.store.Restore(
                    cpb.RestoreRequest(
                        namespace=WORKFLOWS_NAMESPACE,
                        thread_id=workflow_id,
                        checkpoint_id=version_id(version),
                    ),
                    metadata=md,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise WorkflowNotFound(
                        f"workflow {workflow_id!r} has no version {version}"
                    ) from exc
                raise
        definition = json_format.Parse(found.checkpoint.state, pb.WorkflowDefinition())
        return StoredWorkflow(definition, int(found.checkpoint.metadata["version"]), active)

    async def _head(self, md: tuple, workflow_id: str) -> cpb.RestoreResponse | None:
        try:
            return await self.store.Restore(
                cpb.RestoreRequest(namespace=WORKFLOWS_NAMESPACE, thread_id=workflow_id),
                metadata=md,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
