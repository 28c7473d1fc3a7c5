"""The engine's logic, behind the gRPC servicer: registry, runs, watching, and taking over
runs whose engine died (their lease expired while they were RUNNING or PENDING)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uuid6

from engine_svc.config import Settings
from engine_svc.definition import Workflow, parse
from engine_svc.executor import RUNS_NAMESPACE, NodeRunner, RunExecutor, RunState
from engine_svc.registry import Registered, StoredWorkflow, WorkflowNotFound, WorkflowRegistry
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb

log = logging.getLogger(__name__)

_RESUMABLE = [cpb.THREAD_STATUS_PENDING, cpb.THREAD_STATUS_RUNNING]
# Retry UNAVAILABLE through gRPC's own service config, not hand-written loops.
_STORE_SERVICE_CONFIG = """{"methodConfig": [{
  "name": [{"service": "checkpoint.v1.CheckpointService"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""


class NotResumable(Exception):
    """ResumeRun on a run that is not waiting (FAILED_PRECONDITION)."""


class RunExists(Exception):
    """StartRun with the id of an existing run (and no matching request_id)."""


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = grpc.aio.insecure_channel(
            settings.checkpoint_addr,
            options=[
                ("grpc.service_config", _STORE_SERVICE_CONFIG),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        self.store = cpb_grpc.CheckpointServiceStub(self.channel)
        self.registry = WorkflowRegistry(self.store)
        self.runner = NodeRunner(set(settings.handlers))
        self.tenants: set[str] = set(settings.tenants)
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._recovery: asyncio.Task | None = None

    def executor(self, tenant: str) -> RunExecutor:
        s = self.settings
        return RunExecutor(
            self.store, tenant, s.owner, self.runner, s.lease_ttl_seconds, s.max_parallel
        )

    async def start(self) -> None:
        if self.settings.recovery_interval_seconds > 0:
            self._recovery = asyncio.create_task(self._recover_loop(), name="recovery")

    async def close(self) -> None:
        tasks = [t for t in (self._recovery, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()  # executors release their leases on the way out
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.channel.close()

    # ---- workflows ---------------------------------------------------------

    async def register(self, tenant: str, definition: pb.WorkflowDefinition) -> Registered:
        return await self.registry.register(tenant, definition)

    async def get_workflow(self, tenant: str, workflow_id: str, version: int) -> StoredWorkflow:
        return await self.registry.get(tenant, workflow_id, version)

    # ---- runs ----------------------------------------------------------------

    async def start_run(
        self,
        tenant: str,
        workflow_id: str,
        version: int,
        run_input: dict[str, Any],
        run_id: str,
        request_id: str,
    ) -> RunState:
        stored = await self.registry.get(tenant, workflow_id, version)
        workflow = parse(stored.definition)
        if run_id and not request_id and await self._run_exists(tenant, run_id):
            raise RunExists(f"run {run_id!r} already exists")
        try:
            run = await self.executor(tenant).start(
                workflow, stored.version, run_id or str(uuid6.uuid7()), run_input, request_id
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                raise RunExists(f"run {run_id!r} already exists") from exc
            raise
        self.tenants.add(tenant)
        if run.status == "PENDING":
            self._launch(tenant, workflow, run.run_id)
        return run

    async def _run_exists(self, tenant: str, run_id: str) -> bool:
        try:
            await self.store.GetThread(
                cpb.GetThreadRequest(namespace=RUNS_NAMESPACE, thread_id=run_id),
                metadata=(("x-tenant-id", tenant),),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def _launch(
        self, tenant: str, workflow: Workflow, run_id: str, answers: dict[str, Any] | None = None
    ) -> None:
        key = (tenant, run_id)
        if key in self._running:
            return
        task = asyncio.create_task(
            self._execute(tenant, workflow, run_id, answers), name=f"run-{run_id}"
        )
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _execute(
        self, tenant: str, workflow: Workflow, run_id: str, answers: dict[str, Any] | None = None
    ) -> None:
        try:
            run = await self.executor(tenant).execute(workflow, run_id, answers)
            log.info("run ended", extra={"run_id": run_id, "status": run.status})
        except grpc.aio.AioRpcError as exc:
            # Another engine holds it, or the store is away: the lease decides who goes on.
            log.warning("run not executed here", extra={"run_id": run_id, "error": exc.details()})
        except Exception:
            log.exception("run crashed", extra={"run_id": run_id})

    async def resume_run(self, tenant: str, run_id: str, value: Any) -> RunState:
        """Answer a WAITING approval; any engine may do it, hours or days later."""
        run, _ = await self.get_run(tenant, run_id)
        if run.status != "WAITING":
            raise NotResumable(f"run {run_id!r} is {run.status}, not waiting for an answer")
        stored = await self.registry.get(tenant, run.workflow_id, run.version)
        self.tenants.add(tenant)
        self._launch(tenant, parse(stored.definition), run_id, {run.waiting_node: value})
        return run

    async def get_run(self, tenant: str, run_id: str) -> tuple[RunState, cpb.Thread]:
        thread = await self.thread(tenant, run_id)
        return await self.executor(tenant).load(run_id), thread

    async def thread(self, tenant: str, run_id: str) -> cpb.Thread:
        """The run's thread row (status, head, times) without its state."""
        md = (("x-tenant-id", tenant),)
        return (
            await self.store.GetThread(
                cpb.GetThreadRequest(namespace=RUNS_NAMESPACE, thread_id=run_id), metadata=md
            )
        ).thread

    async def list_runs(
        self, tenant: str, statuses: list[int], page_size: int, page_token: str
    ) -> tuple[list[cpb.Thread], str]:
        md = (("x-tenant-id", tenant),)
        listed = await self.store.ListThreads(
            cpb.ListThreadsRequest(
                namespace=RUNS_NAMESPACE,
                statuses=statuses,
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=md,
        )
        return list(listed.threads), listed.next_page_token

    async def watch_run(
        self, tenant: str, run_id: str, after_seq: int
    ) -> AsyncIterator[cpb.StreamResponse]:
        md = (("x-tenant-id", tenant),)
        await self.get_run(tenant, run_id)  # NOT_FOUND for an unknown run
        async for item in self.store.Stream(
            cpb.StreamRequest(namespace=RUNS_NAMESPACE, thread_id=run_id, after_seq=after_seq),
            metadata=md,
        ):
            yield item

    # ---- recovery ------------------------------------------------------------

    async def _recover_loop(self) -> None:
        while True:
            for tenant in sorted(self.tenants):
                try:
                    await self.recover(tenant)
                except grpc.aio.AioRpcError as exc:
                    log.warning("recovery scan failed", extra={"error": exc.details()})
                except Exception:  # the scan must outlive any one bad run
                    log.exception("recovery scan failed")
            await asyncio.sleep(self.settings.recovery_interval_seconds)

    async def recover(self, tenant: str) -> int:
        """Take over this tenant's unfinished runs whose lease is free or expired."""
        md = (("x-tenant-id", tenant),)
        listed = await self.store.ListThreads(
            cpb.ListThreadsRequest(
                namespace=RUNS_NAMESPACE,
                statuses=_RESUMABLE,
                lease_expired_only=True,
                page_size=100,
            ),
            metadata=md,
        )
        taken = 0
        now = time.time()
        for thread in listed.threads:
            if (tenant, thread.thread_id) in self._running:
                continue
            # A run started a moment ago has no lease yet: its engine is about to take it.
            if now - thread.updated_at.ToNanoseconds() / 1e9 < self.settings.lease_ttl_seconds:
                continue
            try:
                stored = await self.registry.get(
                    tenant, thread.workflow_id, thread.workflow_version
                )
            except WorkflowNotFound:
                log.error("run of an unknown workflow", extra={"run_id": thread.thread_id})
                continue
            self._launch(tenant, parse(stored.definition), thread.thread_id)
            taken += 1
        if taken:
            log.info("taking over runs", extra={"tenant": tenant, "runs": taken})
        return taken
