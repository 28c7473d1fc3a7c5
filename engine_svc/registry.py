"""Workflow definitions and their versions, kept as a checkpointed thread in the store's
`workflows` namespace (docs/architecture.md): each version is one checkpoint, the head is the
active version, and retention never prunes that namespace.

Version numbers are allocated through checkpoint ids (`v0000000001`, ...): two engines
registering at once cannot both take the same number, because the store refuses a taken id.
A rollback is one more checkpoint (`v<latest>-r<uuid7>`, so ids keep sorting by time) holding
the chosen version's definition: the head is always the active version, and the thread's
checkpoints are the history of which version was active, who changed it and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import uuid6
from google.protobuf import json_format

from engine_svc.definition import DefinitionInvalid, NodeSpec, Violations, fingerprint, parse
from engine_svc.store import AlreadyExists, Conflict, NotFound, Store
from workflow_rpc.namespaces import WORKFLOWS_NAMESPACE
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

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
class VersionChange:
    kind: str  # "registered" or "rollback"
    version: int
    previous_version: int
    reason: str
    requested_by: str
    time: object  # google.protobuf.Timestamp


@dataclass(frozen=True, slots=True)
class Versions:
    active: int
    versions: list[tuple[int, object]]  # (version, created_at), newest first
    history: list[VersionChange] = field(default_factory=list)  # newest first


@dataclass(frozen=True, slots=True)
class StoredWorkflow:
    definition: pb.WorkflowDefinition
    version: int
    active_version: int
    # The workflow thread's head as read, when this is the active version ("" otherwise): a
    # run started on a cached copy requires it in its first checkpoint (SaveRequest.
    # required_head), so the copy is never used once another engine changed it.
    head_id: str = ""

    def requirement(self) -> cpb.RequiredHead:
        """The workflow thread's head as this copy was read, for a Save to require."""
        return cpb.RequiredHead(
            namespace=WORKFLOWS_NAMESPACE,
            thread_id=self.definition.workflow_id,
            checkpoint_id=self.head_id,
        )


def version_id(version: int) -> str:
    return f"v{version:010d}"


_PARSED_MAX = 1024


class WorkflowRegistry:
    def __init__(
        self,
        store_of: Callable[[str], Store],
        *,
        check: Callable[[Sequence[NodeSpec]], Violations] | None = None,
    ) -> None:
        self._store_of = store_of  # a tenant's store
        # What this engine refuses in a definition beyond its shape (python handlers it
        # could not call), as field violations.
        self._check = check
        # Definitions parsed from JSON, by tenant and fingerprint (their content): parsing a
        # 100-node definition costs about a millisecond, on every StartRun otherwise.
        self._parsed: dict[tuple[str, str], pb.WorkflowDefinition] = {}
        # The active version of each workflow as last read, by tenant and workflow id.
        self._active: dict[tuple[str, str], StoredWorkflow] = {}

    def cached(self, tenant: str, workflow_id: str) -> StoredWorkflow | None:
        """The active version as this engine last read it: maybe not current, so only for
        a Save that requires its `head_id`."""
        return self._active.get((tenant, workflow_id))

    def forget(self, tenant: str, workflow_id: str) -> None:
        self._active.pop((tenant, workflow_id), None)

    async def register(self, tenant: str, definition: pb.WorkflowDefinition) -> Registered:
        """Validate (DefinitionInvalid) and store; an unchanged definition is not a new version."""
        workflow = parse(definition)
        if self._check is not None and (problems := self._check(workflow.nodes)):
            raise DefinitionInvalid(problems)
        store = self._store_of(tenant)
        digest = fingerprint(definition)
        for _ in range(_ATTEMPTS):
            head = await self._head(store, definition.workflow_id)
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
                    "kind": "registered",
                    "version": str(version),
                    "latest_version": str(version),
                    "previous_version": head.checkpoint.metadata["version"] if head else "0",
                    "fingerprint": digest,
                },
            )
            request = cpb.SaveRequest(
                checkpoint=checkpoint,
                expected_parent_id=head.checkpoint.checkpoint_id if head else "",
                # A retry after a lost answer gets the first one, not a conflict with itself.
                request_id=f"register:{uuid6.uuid7()}",
                keep_forever=True,  # a definition outlives retention
            )
            self.forget(tenant, definition.workflow_id)
            try:
                await store.save(request)
            except (AlreadyExists, Conflict):
                continue  # another engine registered meanwhile: look again
            return Registered(definition.workflow_id, version, created=True)
        raise RegistrationContended(
            f"could not register {definition.workflow_id}: too many concurrent registrations"
        )

    async def rollback(
        self, tenant: str, workflow_id: str, version: int, reason: str, requested_by: str
    ) -> tuple[int, int]:
        """Make `version` the active one; (active, previous). New runs take it at once."""
        store = self._store_of(tenant)
        for _ in range(_ATTEMPTS):
            head = await self._head(store, workflow_id)
            if head is None:
                raise WorkflowNotFound(f"workflow {workflow_id!r} not found")
            meta = head.checkpoint.metadata
            previous, latest = int(meta["version"]), int(meta["latest_version"])
            target = await self._version(store, workflow_id, version)
            checkpoint = cpb.Checkpoint(
                namespace=WORKFLOWS_NAMESPACE,
                thread_id=workflow_id,
                checkpoint_id=f"{version_id(latest)}-r{uuid6.uuid7()}",
                state=target.checkpoint.state,
                trigger=cpb.TRIGGER_MANUAL,
                name=f"rollback to version {version}",
                metadata={
                    "kind": "rollback",
                    "version": str(version),
                    "latest_version": str(latest),
                    "previous_version": str(previous),
                    "fingerprint": target.checkpoint.metadata["fingerprint"],
                    "reason": reason,
                    "requested_by": requested_by,
                },
            )
            request = cpb.SaveRequest(
                checkpoint=checkpoint,
                expected_parent_id=head.checkpoint.checkpoint_id,
                request_id=f"rollback:{checkpoint.checkpoint_id}",  # unique: it holds a uuid7
                keep_forever=True,
            )
            self.forget(tenant, workflow_id)
            try:
                await store.save(request)
            except (AlreadyExists, Conflict):
                continue  # a registration or rollback came in between: look again
            return version, previous
        raise RegistrationContended(f"could not roll {workflow_id} back: too much contention")

    async def versions(self, tenant: str, workflow_id: str) -> Versions:
        store = self._store_of(tenant)
        head = await self._head(store, workflow_id)
        if head is None:
            raise WorkflowNotFound(f"workflow {workflow_id!r} not found")
        found: list[tuple[int, object]] = []
        history: list[VersionChange] = []
        token = ""
        while True:
            page = await store.list_checkpoints(
                cpb.ListRequest(
                    namespace=WORKFLOWS_NAMESPACE,
                    thread_id=workflow_id,
                    page_size=1000,
                    page_token=token,
                )
            )
            for c in page.checkpoints:
                meta = c.metadata
                kind = meta.get("kind", "registered")
                if kind == "registered":
                    found.append((int(meta["version"]), c.created_at))
                history.append(
                    VersionChange(
                        kind,
                        int(meta["version"]),
                        int(meta.get("previous_version", "0")),
                        meta.get("reason", ""),
                        meta.get("requested_by", ""),
                        c.created_at,
                    )
                )
            token = page.next_page_token
            if not token:
                break
        return Versions(int(head.checkpoint.metadata["version"]), found, history)

    async def _version(self, store: Store, workflow_id: str, version: int) -> cpb.RestoreResponse:
        try:
            return await store.restore(
                cpb.RestoreRequest(
                    namespace=WORKFLOWS_NAMESPACE,
                    thread_id=workflow_id,
                    checkpoint_id=version_id(version),
                )
            )
        except NotFound as exc:
            missing = f"workflow {workflow_id!r} has no version {version}"
            raise WorkflowNotFound(missing) from exc

    async def get(self, tenant: str, workflow_id: str, version: int = 0) -> StoredWorkflow:
        """A version of a workflow (0: the active one)."""
        store = self._store_of(tenant)
        head = await self._head(store, workflow_id)
        if head is None:
            raise WorkflowNotFound(f"workflow {workflow_id!r} not found")
        active = int(head.checkpoint.metadata["version"])
        found = head
        if version and version != active:
            found = await self._version(store, workflow_id, version)
        key = (tenant, found.checkpoint.metadata.get("fingerprint", ""))
        definition = self._parsed.get(key) if key[1] else None
        if definition is None:
            definition = json_format.Parse(found.checkpoint.state, pb.WorkflowDefinition())
            if key[1]:
                if len(self._parsed) >= _PARSED_MAX:
                    self._parsed.clear()
                self._parsed[key] = definition
        if found is not head:
            return StoredWorkflow(definition, int(found.checkpoint.metadata["version"]), active)
        stored = StoredWorkflow(definition, active, active, head.checkpoint.checkpoint_id)
        if len(self._active) >= _PARSED_MAX:
            self._active.clear()
        self._active[(tenant, workflow_id)] = stored
        return stored

    async def _head(self, store: Store, workflow_id: str) -> cpb.RestoreResponse | None:
        try:
            return await store.restore(
                cpb.RestoreRequest(namespace=WORKFLOWS_NAMESPACE, thread_id=workflow_id)
            )
        except NotFound:
            return None
