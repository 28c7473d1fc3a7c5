"""The engine's logic, behind the gRPC servicer: registry, runs, watching, and taking over
runs whose engine died (their lease expired while they were RUNNING or PENDING)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, NamedTuple

import grpc
import uuid6
from google.protobuf import json_format

from engine_svc import metrics
from engine_svc.config import Settings
from engine_svc.control_feed import CONTROL_NAMESPACE, check_control
from engine_svc.definition import NodeSpec, Workflow, parse
from engine_svc.executor import RunExecutor, RunNotFound, Started, WorkflowChanged
from engine_svc.http_policy import HttpPolicy
from engine_svc.leases import LeaseHeld
from engine_svc.nodes import NodeCall, NodeFailed, NodeRunner, render
from engine_svc.registry import (
    Registered,
    RegistrationContended,
    StoredWorkflow,
    Versions,
    WorkflowNotFound,
    WorkflowRegistry,
)
from engine_svc.run_feed import RunFeed, watch_response
from engine_svc.run_state import RUNS_NAMESPACE, NotARun, NotResumable, RunState, RunStatus
from engine_svc.store import (
    ANSWER_RETRY_SECONDS,
    AlreadyExists,
    GrpcStore,
    LeaseLost,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
)
from workflow_client.store_session import StoreSession
from workflow_rpc.audit import (
    AUDIT_NAMESPACE,
    AUDIT_THREAD,
    EVENT_PREFIX,
    EntryWrites,
    entry_payload,
)
from workflow_rpc.headers import SYSTEM_TENANT, tenant_metadata
from workflow_rpc.namespaces import TENANTS_NAMESPACE
from workflow_rpc.statuses import InvalidArgument
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb

log = logging.getLogger(__name__)

_RESUMABLE = [cpb.THREAD_STATUS_PENDING, cpb.THREAD_STATUS_RUNNING]
# The engines' own records live under a reserved tenant (SYSTEM_TENANT, TENANTS_NAMESPACE):
# which tenants have runs, so that a fresh replica knows where to look for runs to take over.

# Starts of a run of the active version, at most, while other engines keep changing it.
_START_ATTEMPTS = 5

__all__ = ["ControlTimeout", "Engine", "NotResumable", "RunExists"]


def _unknown_breakpoints(
    workflow: Workflow, before: list[str] | None, after: list[str] | None
) -> list[tuple[str, str]]:
    """Breakpoints naming nodes the workflow does not have, as (field, description)."""
    ids = {n.id for n in workflow.nodes}
    return [
        (f"{name}[{i}]", f"unknown node {node!r}")
        for name, nodes in (("interrupt_before", before), ("interrupt_after", after))
        for i, node in enumerate(nodes or [])
        if node not in ids
    ]


class RunExists(Exception):
    """StartRun with the id of an existing run (and no matching request_id)."""


class ControlTimeout(Exception):
    """The engine running a run did not act on a pause, cancel or checkpoint in time."""


class Controlled(NamedTuple):
    """What a control request did: the run after it, the checkpoint it took (if any), and
    the type of the event by which the engine running the run answered ("" if the change
    was made here)."""

    run: RunState
    checkpoint_id: str
    answer: str = ""


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # No retry policy on the channel: the store adapter (engine_svc/store.py) retries.
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # After a store restart, reconnect within a second or two, not gRPC's
            # default backoff of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        tls = settings.checkpoint_tls()
        self.channel = (
            grpc.aio.secure_channel(settings.checkpoint_addr, tls, options=options)
            if tls is not None
            else grpc.aio.insecure_channel(settings.checkpoint_addr, options=options)
        )
        self._stub = cpb_grpc.CheckpointServiceStub(self.channel)
        # The engine's own credential for the store (docs/security.md#the-engine-and-the-store).
        self._token = settings.checkpoint_token()
        self._stores: dict[tuple[str, bool], Store] = {}  # by tenant and session: store()
        self.runner = NodeRunner(
            set(settings.handlers),
            {"subworkflow": self._child_run, "rollback": self._rollback_node},
            HttpPolicy(allow=tuple(settings.http_allow), max_bytes=settings.http_max_bytes),
        )
        self.registry = WorkflowRegistry(self.store, check=self.runner.handler_problems)
        self.tenants: set[str] = set(settings.tenants)
        self._noted: set[str] = set()  # tenants recorded under SYSTEM_TENANT by this process
        self._executors: dict[str, RunExecutor] = {}
        self._workflows: dict[tuple[str, str, int], Workflow] = {}
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._not_runs: set[tuple[str, str]] = set()  # runs/ threads holding no run
        self._recovery: asyncio.Task | None = None
        self._closing = False  # close() began: no run is launched again after its end
        self._audits = EntryWrites()

    def executor(self, tenant: str) -> RunExecutor:
        if tenant not in self._executors:
            s = self.settings
            session = (
                StoreSession(stub=self._stub, metadata=tenant_metadata(tenant, self._token))
                if s.store_calls == "session"
                else None
            )
            store = GrpcStore(
                stub=self._stub,
                tenant=tenant,
                token=self._token,
                session=session,
                retry_seconds=s.store_retry,
            )
            self._executors[tenant] = RunExecutor(
                store,
                tenant,
                s.owner,
                self.runner,
                lease_ttl=s.lease_ttl,
                max_parallel=s.max_parallel,
            )
        return self._executors[tenant]

    def store(self, tenant: str) -> Store:
        """The tenant's store for calls someone is waiting on (an RPC of the engine's),
        retried for a moment only: on the tenant's session once it has one (its runs, or a
        start, made it), unary before (a tenant only read here opens no stream)."""
        executor = self._executors.get(tenant)
        key = (tenant, executor is not None)
        if (store := self._stores.get(key)) is None:
            base = (
                executor.store
                if executor
                else GrpcStore(stub=self._stub, tenant=tenant, token=self._token)
            )
            store = self._stores[key] = base.with_retry(ANSWER_RETRY_SECONDS)
        return store

    async def start(self) -> None:
        if self.settings.recovery_interval > 0:
            self._recovery = asyncio.create_task(self._recover_loop(), name="recovery")

    async def close(self) -> None:
        """Graceful: running nodes get the grace period to finish, no new ones start, each
        run is checkpointed (still RUNNING, so another engine continues it at once) and its
        lease released. What is still running after the grace period is cut off; its
        unsaved nodes run again wherever the run continues."""
        self._closing = True
        if self._recovery is not None:
            self._recovery.cancel()
        # Entries under way are written before the store channel closes.
        await self._audits.drain(self.settings.shutdown_grace)
        for executor in self._executors.values():
            for ex in executor.live.values():
                if ex.pause is None:
                    ex.pause, ex.shutdown = ("engine shutdown", ""), True
        tasks = list(self._running.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
            for task in late:
                task.cancel()  # executors release their leases on the way out
        for task in [*tasks, *([self._recovery] if self._recovery else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runner.close()
        for executor in self._executors.values():
            await executor.close()
        await self.channel.close()

    # ---- workflows ---------------------------------------------------------

    async def register(self, tenant: str, definition: pb.WorkflowDefinition) -> Registered:
        return await self.registry.register(tenant, definition)

    async def get_workflow(self, tenant: str, workflow_id: str, version: int) -> StoredWorkflow:
        return await self.registry.get(tenant, workflow_id, version)

    async def versions(self, tenant: str, workflow_id: str) -> Versions:
        return await self.registry.versions(tenant, workflow_id)

    async def rollback(
        self,
        tenant: str,
        workflow_id: str,
        version: int,
        reason: str,
        requested_by: str,
        subject: str | None = None,
    ) -> tuple[int, int]:
        """Make `version` active: (active, previous), and its audit entry (`subject`: who,
        when not the call's caller). Runs under way keep their version."""
        active, previous = await self.registry.rollback(
            tenant, workflow_id, version, reason, requested_by
        )
        log.info(
            "workflow rolled back",
            extra={"workflow_id": workflow_id, "version": version, "reason": reason},
        )
        details = {
            "version": version,
            "previous_version": previous,
            "reason": reason,
            "requested_by": requested_by,
        }
        await asyncio.shield(self.audit(tenant, "rollback", workflow_id, details, subject))
        return active, previous

    async def _rollback_node(self, call: NodeCall, node: NodeSpec, state: dict[str, Any]) -> Any:
        """A `rollback` node: e.g. after a failed canary check, from inside a workflow."""
        cfg = node.config
        by = f"run {call.run_id} (node {node.id})"
        try:
            active, previous = await self.rollback(
                call.tenant,
                cfg["workflow_id"],
                int(cfg["version"]),
                str(cfg.get("reason", "")),
                by,
                subject=by,
            )
        except WorkflowNotFound as exc:
            raise NodeFailed(str(exc)) from exc
        return {
            "workflow_id": cfg["workflow_id"],
            "active_version": active,
            "previous_version": previous,
        }

    async def _workflow_of(self, tenant: str, run: RunState) -> Workflow:
        return self._parsed(tenant, await self.registry.get(tenant, run.workflow_id, run.version))

    def _parsed(self, tenant: str, stored: StoredWorkflow) -> Workflow:
        """Versions never change once stored: each is parsed once per process."""
        key = (tenant, stored.definition.workflow_id, stored.version)
        if key not in self._workflows:
            self._workflows[key] = parse(stored.definition)
        return self._workflows[key]

    # ---- runs ----------------------------------------------------------------

    async def start_run(
        self,
        tenant: str,
        workflow_id: str,
        version: int,
        run_input: dict[str, Any],
        run_id: str,
        request_id: str,
        interrupt_before: list[str] | None = None,
        interrupt_after: list[str] | None = None,
    ) -> Started:
        """Start a run; with the id of a COMPLETED run of the same workflow, start it again
        on top of that run's state (a thread that remembers).

        A new run of the active version requires, in its first checkpoint, the workflow's
        head that the version came from, when the store checks it: so it starts on this
        engine's copy without reading the workflow first, and never on a version that another
        engine replaced before the checkpoint committed (docs/engine.md#starting-a-run). If
        the head moved, the workflow is read and the start made again."""
        executor = self.executor(tenant)
        new_run = not run_id or bool(request_id)  # else it may continue a COMPLETED run
        new_id = run_id or str(uuid6.uuid7())
        for _ in range(_START_ATTEMPTS):
            cached = None
            if new_run and not version and executor.store.checks_required_heads():
                cached = self.registry.cached(tenant, workflow_id)
            stored = cached or await self.registry.get(tenant, workflow_id, version)
            workflow = self._parsed(tenant, stored)
            unknown = _unknown_breakpoints(workflow, interrupt_before, interrupt_after)
            if unknown and cached is not None:  # the copy may be old: read the workflow
                self.registry.forget(tenant, workflow_id)
                continue
            if unknown:
                listed = "; ".join(f"{f}: {d}" for f, d in unknown)
                raise InvalidArgument(f"breakpoints name unknown nodes: {listed}", unknown)
            if not new_run and await self._run_exists(tenant, run_id):
                existing = await executor.load(run_id)
                done = existing.status is RunStatus.COMPLETED
                if not done or existing.workflow_id != workflow_id:
                    raise RunExists(
                        f"run {run_id!r} already exists ({existing.status}, workflow "
                        f"{existing.workflow_id!r}); only a COMPLETED run of the same "
                        "workflow can be continued"
                    )
                run = await executor.continue_thread(
                    workflow, stored.version, run_id, run_input, interrupt_before, interrupt_after
                )
                self._launch(tenant, workflow, run_id)
                return Started(run, 0)
            # The active version, from a copy or read just now: only while it is the active one.
            checked = (
                not version and bool(stored.head_id) and executor.store.checks_required_heads()
            )
            first = executor.start(
                workflow,
                stored.version,
                new_id,
                run_input,
                request_id,
                interrupt_before,
                interrupt_after,
                stored.requirement() if checked else None,
            )
            try:
                return await self._begin(tenant, workflow, new_id, first)
            except WorkflowChanged:  # another engine registered or rolled back meanwhile
                self.registry.forget(tenant, workflow_id)
        raise RegistrationContended(
            f"could not start a run of {workflow_id}: it kept changing (registrations or "
            "rollbacks) meanwhile"
        )

    async def _begin(
        self, tenant: str, workflow: Workflow, run_id: str, first: Awaitable[Started]
    ) -> Started:
        """Record a new run's first checkpoint (`first`, which takes its lease), then execute
        it here."""
        try:
            started = await first
        except (LeaseLost, AlreadyExists) as exc:  # the run exists (its parent check, its id)
            raise RunExists(f"run {run_id!r} already exists") from exc
        await self._note_tenant(tenant)
        run = started.run
        # A replayed start (a retry whose first answer was lost, or a client's) of a run that
        # has not ended is launched too: its execution takes the lease, or finds it held.
        if started.token or run.status in (RunStatus.PENDING, RunStatus.RUNNING):
            # A copy: the reply shows the run as it started.
            copy = started._replace(run=RunState.from_json(run.to_json()))
            self._launch(tenant, workflow, run.run_id, copy)
        return started

    async def fork_run(
        self,
        tenant: str,
        run_id: str,
        checkpoint_id: str,
        patch: dict[str, Any],
        new_run_id: str,
    ) -> Started:
        """A new run from a checkpoint of `run_id`, with `patch`; the original is untouched."""
        executor = self.executor(tenant)
        await self.thread(tenant, run_id)  # NOT_FOUND for an unknown run
        source = await executor.at_checkpoint(run_id, checkpoint_id)
        workflow = await self._workflow_of(tenant, source)
        new_run_id = new_run_id or str(uuid6.uuid7())
        first = executor.fork(workflow, source, checkpoint_id, patch, new_run_id)
        return await self._begin(tenant, workflow, new_run_id, first)

    # ---- the audit log (workflow_rpc/audit.py) --------------------------------------

    def audit(
        self,
        tenant: str,
        action: str,
        target: str,
        details: dict[str, Any],
        subject: str | None = None,
    ) -> asyncio.Task[None]:
        """An entry in the tenant's audit log, written by a task of its own: the caller going
        away does not take the entry with it (a store that stays away past the retries leaves
        it missing, and the log says so). `subject`: who, when not the call's caller."""
        payload = entry_payload(action, target, details)
        if subject is not None:
            payload["subject"] = subject
        event = cpb.NewEvent(type=EVENT_PREFIX + action)
        event.payload.update(payload)
        request = cpb.PublishRequest(
            namespace=AUDIT_NAMESPACE,
            thread_id=AUDIT_THREAD,
            events=[event],
            request_id=f"audit:{uuid6.uuid7()}",  # a retry after a lost answer: once
        )
        return self._audits.start(self.store(tenant).publish(request), action, target)

    async def audit_entries(
        self, tenant: str, after_seq: int, page_size: int
    ) -> tuple[list[cpb.Event], int]:
        """The audit log's events after `after_seq`, at most `page_size`, and the after_seq of
        the next page (0 at the end)."""
        request = cpb.StreamRequest(
            namespace=AUDIT_NAMESPACE, thread_id=AUDIT_THREAD, after_seq=after_seq, until_now=True
        )
        found: list[cpb.Event] = []
        async with contextlib.aclosing(self.store(tenant).stream(request)) as items:
            async for item in items:
                if item.HasField("event"):
                    found.append(item.event)
                    if len(found) > page_size:  # one more than a page: there is a next one
                        break
        more = len(found) > page_size
        found = found[:page_size]
        return found, found[-1].seq if more else 0

    async def history(
        self, tenant: str, run_id: str, include_state: bool, page_size: int, page_token: str
    ) -> tuple[list[cpb.Checkpoint], str]:
        await self.thread(tenant, run_id)  # NOT_FOUND for an unknown run
        return await self.executor(tenant).history(run_id, include_state, page_size, page_token)

    async def _note_tenant(self, tenant: str) -> None:
        """Record once that `tenant` has runs (idempotent across engines by request id)."""
        if tenant in self._noted:
            return
        await self.store(SYSTEM_TENANT).publish(
            cpb.PublishRequest(
                namespace=TENANTS_NAMESPACE,
                thread_id=tenant,
                events=[cpb.NewEvent(type="tenant.seen")],
                request_id=f"tenant-seen:{tenant}",
            )
        )
        self._noted.add(tenant)
        self.tenants.add(tenant)

    async def _discover_tenants(self) -> None:
        token = ""
        while True:
            listed = await self.store(SYSTEM_TENANT).list_threads(
                cpb.ListThreadsRequest(
                    namespace=TENANTS_NAMESPACE, page_size=1000, page_token=token
                )
            )
            self.tenants.update(t.thread_id for t in listed.threads)
            token = listed.next_page_token
            if not token:
                return

    async def _run_exists(self, tenant: str, run_id: str) -> bool:
        """A run is a thread with a checkpoint: a thread row that another call created first
        (a lease, a Publish on `runs/<id>`) is not a run yet, and may be started."""
        try:
            thread = await self.thread(tenant, run_id)
        except RunNotFound:
            return False
        return bool(thread.head_checkpoint_id)

    def _launch(
        self, tenant: str, workflow: Workflow, run_id: str, started: Started | None = None
    ) -> None:
        key = (tenant, run_id)
        if (running := self._running.get(key)) is not None:
            # Its execution here is ending (it let the lease go with its last checkpoint, and
            # a resume took it since): run it again once that one is over, unless the engine
            # is stopping (then another engine, or this one restarted, takes it over).
            def again(_: asyncio.Task) -> None:
                if not self._closing:
                    self._launch(tenant, workflow, run_id)

            running.add_done_callback(again)
            return
        self._not_runs.discard(key)  # a run started (or resumed) under that id now
        task = asyncio.create_task(
            self._execute(tenant, workflow, run_id, started), name=f"run-{run_id}"
        )
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _execute(
        self, tenant: str, workflow: Workflow, run_id: str, started: Started | None
    ) -> None:
        try:
            run = await self.executor(tenant).execute(workflow, run_id, started)
            log.info("run stopped", extra={"run_id": run_id, "status": run.status})
        except (LeaseLost, RunNotFound) as exc:  # another engine has it, or it was deleted
            log.warning("run not executed here", extra={"run_id": run_id, "error": str(exc)})
        except NotARun as exc:  # someone else's data under runs/: never take it over again
            log.error("not a run", extra={"run_id": run_id, "error": str(exc)})
            if len(self._not_runs) > 10_000:
                self._not_runs.clear()
            self._not_runs.add((tenant, run_id))
        except StoreUnavailable as exc:
            # Nothing more runs without saving; recovery continues it when the store is back.
            log.error("checkpoint service unreachable; run stopped", extra={"run_id": run_id})
            log.debug("store error", extra={"error": str(exc)})
        except StoreError as exc:
            log.warning("run not executed here", extra={"run_id": run_id, "error": str(exc)})
        except Exception:
            log.exception("run crashed", extra={"run_id": run_id})

    async def resume_run(self, tenant: str, run_id: str, value: Any) -> RunState:
        """Continue a PAUSED run, answer a WAITING approval or re-run what a FAILED run did
        not finish; any engine may do it, hours or days later. A RUNNING run whose pause is
        still pending keeps running: the pause is taken back."""
        executor = self.executor(tenant)
        run = await executor.load(run_id)
        give_up = time.monotonic() + 5.0
        while run.status is RunStatus.RUNNING:
            try:
                done = await self.control(tenant, run_id, "unpause", {})
            except NotResumable:  # it paused (or ended) meanwhile: resume it as it is now
                run = await executor.load(run_id)
                break
            if done.answer == "run.unpaused":
                return done.run
            run = await executor.load(run_id)
            if done.answer != "run.pausing" or time.monotonic() > give_up:
                break  # no pause to take back: RUNNING is not resumable
            await asyncio.sleep(0.1)  # the pause is being applied: resume it once PAUSED
        if run.status not in (RunStatus.PAUSED, RunStatus.WAITING, RunStatus.FAILED):
            raise NotResumable(
                f"run {run_id!r} is {run.status}: only PAUSED, WAITING and FAILED runs resume"
            )
        if run.status is RunStatus.WAITING and value is None:  # null would reach the next node
            raise InvalidArgument(
                f"run {run_id!r} waits at {run.waiting_node!r}, which needs an answer: "
                "a JSON value other than null",
                [("value", "required (not null) to answer the approval")],
            )
        workflow = await self._workflow_of(tenant, run)
        give_up = time.monotonic() + 5.0
        while True:
            try:
                run = await executor.resume(workflow, run_id, value)
                break
            except LeaseHeld:  # the engine that paused or failed it is just letting go
                if time.monotonic() > give_up:
                    raise NotResumable(f"run {run_id!r} is held by an engine") from None
                await asyncio.sleep(0.1)
        await self._note_tenant(tenant)
        self._launch(tenant, workflow, run_id)
        return run

    async def control(
        self, tenant: str, run_id: str, action: str, payload: dict[str, Any]
    ) -> Controlled:
        """Pause, cancel or checkpoint a run, wherever it runs (or take back its pending
        pause: "unpause").

        A run no engine holds is changed here; otherwise the request goes on the run's
        control feed, and this waits until the holder acknowledges it (or lets go of the run,
        then it is changed here). The request carries a deadline: once this has given up,
        the holder ignores it."""
        executor = self.executor(tenant)
        run = await executor.load(run_id)
        check_control(run, action)
        workflow = await self._workflow_of(tenant, run)
        thread = await self.thread(tenant, run_id)
        control_id = str(uuid6.uuid7())
        deadline = time.monotonic() + self.settings.control_wait
        feed: asyncio.Queue[cpb.Event] = asyncio.Queue()
        follower = asyncio.create_task(self._follow(tenant, run_id, thread.last_seq, feed))
        published = 0
        last_saved = ""
        try:
            while True:
                try:
                    changed, head = await executor.change_directly(
                        workflow,
                        run_id,
                        action,
                        {**payload, "control_id": control_id, "control_seq": published},
                    )
                    return Controlled(changed, head)
                except LeaseHeld:
                    pass
                if not published:
                    published = await self._publish_control(
                        tenant, run_id, action, payload, control_id
                    )
                    if live := executor.live.get(run_id):  # executed here: read it at once
                        live.follow_control.set()
                while True:  # events until ours, a status change, or a second gone
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ControlTimeout(
                            f"the engine running {run_id!r} did not act on the {action} "
                            f"within {self.settings.control_wait:g}s; nothing changed"
                        )
                    try:
                        ev = await asyncio.wait_for(feed.get(), min(1.0, left))
                    except TimeoutError:
                        break
                    got = json_format.MessageToDict(ev.payload)
                    if ev.type == "checkpoint.saved":
                        last_saved = got.get("checkpoint_id", "")
                    if got.get("control_id") == control_id:
                        return Controlled(await executor.load(run_id), last_saved, ev.type)
                    if ev.type == "run.status":
                        check_control(await executor.load(run_id), action)
                        break
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await follower

    async def _publish_control(
        self, tenant: str, run_id: str, action: str, payload: dict[str, Any], control_id: str
    ) -> int:
        event = cpb.NewEvent(type=f"control.{action}")
        event.payload.update(
            {
                **payload,
                "control_id": control_id,
                "deadline": time.time() + self.settings.control_wait,
            }
        )
        published = await self.store(tenant).publish(
            cpb.PublishRequest(
                namespace=CONTROL_NAMESPACE,
                thread_id=run_id,
                events=[event],
                request_id=f"control:{control_id}",
            )
        )
        return published.seqs[-1]

    async def _follow(
        self, tenant: str, run_id: str, after_seq: int, into: asyncio.Queue[cpb.Event]
    ) -> None:
        async for item in self.store(tenant).stream(
            cpb.StreamRequest(
                namespace=RUNS_NAMESPACE, thread_id=run_id, after_seq=after_seq, follow=True
            )
        ):
            if item.HasField("event"):
                into.put_nowait(item.event)

    async def _child_run(self, call: NodeCall, node: NodeSpec, state: dict[str, Any]) -> Any:
        """A `subworkflow` node: a child run with an id derived from the parent's, so the
        node run again (a retry, or after a crash) finds the same child instead of a second."""
        cfg = node.config
        child_id = f"{call.run_id}.{node.id}"
        child_input = render(cfg["input"], state) if "input" in cfg else state
        try:
            started = await self.start_run(
                call.tenant,
                cfg["workflow_id"],
                int(cfg.get("version", 0)),
                child_input if isinstance(child_input, dict) else {"value": child_input},
                child_id,
                f"child:{child_id}",
            )
            child = started.run
            # A retry of the node re-runs what the child did not.
            if child.status is RunStatus.FAILED:
                child = await self.resume_run(call.tenant, child_id, None)
            ended = await self._ended(call.tenant, child_id)
        except WorkflowNotFound as exc:
            raise NodeFailed(str(exc)) from exc
        except asyncio.CancelledError:
            parent = self.executor(call.tenant).live.get(call.run_id)
            if parent is not None and parent.cancel is not None:
                asyncio.get_running_loop().create_task(
                    self._cancel_quietly(call.tenant, child_id, "parent run cancelled")
                )
            raise
        if ended.status is not RunStatus.COMPLETED:
            raise NodeFailed(f"child run {child_id} ended {ended.status}: {ended.error}")
        return ended.outputs

    async def _cancel_quietly(self, tenant: str, run_id: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.control(tenant, run_id, "cancel", {"reason": reason})

    async def _ended(self, tenant: str, run_id: str) -> RunState:
        """Wait for a run to reach a terminal status."""
        async for item in self.watch_run(tenant, run_id, 0):
            del item
        return await self.executor(tenant).load(run_id)

    async def get_run(self, tenant: str, run_id: str) -> tuple[RunState, cpb.Thread]:
        thread = await self.thread(tenant, run_id)
        return await self.executor(tenant).load(run_id), thread

    async def thread(self, tenant: str, run_id: str) -> cpb.Thread:
        """The run's thread row (status, head, times) without its state."""
        try:
            answer = await self.store(tenant).get_thread(
                cpb.GetThreadRequest(namespace=RUNS_NAMESPACE, thread_id=run_id)
            )
        except NotFound as exc:
            raise RunNotFound(f"run {run_id!r} not found") from exc
        return answer.thread

    async def list_runs(
        self, tenant: str, statuses: list[int], page_size: int, page_token: str, workflow_id: str
    ) -> tuple[list[cpb.Thread], str]:
        """A page of runs, newest first, of `workflow_id` if set."""
        listed = await self.store(tenant).list_threads(
            cpb.ListThreadsRequest(
                namespace=RUNS_NAMESPACE,
                statuses=statuses,
                page_size=page_size,
                page_token=page_token,
                workflow_id=workflow_id,
                newest_first=True,
            )
        )
        return list(listed.threads), listed.next_page_token

    async def watch_run(
        self, tenant: str, run_id: str, after_seq: int, *, batched: bool = False
    ) -> AsyncIterator[pb.WatchRunResponse]:
        """The run's feed from `after_seq`, until the run is over. While this engine executes
        the run, its events come from the calls that appended them (RunFeed), else from the
        store's Stream (docs/engine.md#watching-a-run). A FAILED run that is resumed goes on,
        so the store's own end-at-terminal is not enough: the thread says whether a terminal
        event is the last one."""
        if self._feed(tenant, run_id) is None:
            await self.thread(tenant, run_id)  # NOT_FOUND for an unknown run
        cursor = after_seq
        while True:
            feed = self._feed(tenant, run_id)
            if feed is not None and feed.holds(cursor):
                beat = self.settings.heartbeat
                async for watched in feed.follow(cursor, beat, batched=batched):
                    if watched.HasField("events"):
                        cursor = watched.events.events[-1].seq
                    elif watched.HasField("event"):
                        cursor = watched.event.seq
                    yield watched
                # Ended here, unless it was resumed meanwhile: the thread says.
                if feed.ended_at(cursor):
                    end = await self._end_of(tenant, run_id)
                    if end is not None and end <= cursor:
                        return
            # What the feed here cannot give: the store has it (and switches back once the
            # feed here holds what comes next).
            end_at: int | None = None
            request = cpb.StreamRequest(
                namespace=RUNS_NAMESPACE, thread_id=run_id, after_seq=cursor, follow=True
            )
            # Closed on the way out, not when collected: the store's call ends at once.
            async with contextlib.aclosing(self.store(tenant).stream(request)) as items:
                async for item in items:
                    yield watch_response(item, batched=batched)
                    if not item.HasField("event"):
                        continue
                    cursor = item.event.seq
                    if item.event.terminal and end_at is None:
                        end_at = await self._end_of(tenant, run_id)
                    if end_at is not None and cursor >= end_at:
                        return
                    feed = self._feed(tenant, run_id)
                    if end_at is None and feed is not None and feed.holds(cursor):
                        break
                else:
                    return

    async def _end_of(self, tenant: str, run_id: str) -> int | None:
        """The last seq of the run's feed if the run has ended (its thread is terminal)."""
        thread = await self.thread(tenant, run_id)
        status = RunStatus.of_thread(thread.status)
        return thread.last_seq if status is not None and status.terminal else None

    def _feed(self, tenant: str, run_id: str) -> RunFeed | None:
        executor = self._executors.get(tenant)
        return executor.feeds.get(run_id) if executor is not None else None

    # ---- recovery ------------------------------------------------------------

    async def _recover_loop(self) -> None:
        while True:
            try:
                await self._discover_tenants()
            except StoreError as exc:
                log.warning("tenant discovery failed", extra={"error": str(exc)})
            for tenant in sorted(self.tenants):
                try:
                    await self.recover(tenant)
                except StoreError as exc:
                    log.warning("recovery scan failed", extra={"error": str(exc)})
                except Exception:  # the scan must outlive any one bad run
                    log.exception("recovery scan failed")
            await asyncio.sleep(self.settings.recovery_interval)

    async def recover(self, tenant: str) -> int:
        """Take over this tenant's unfinished runs whose lease is free or expired."""
        orphans: list[cpb.Thread] = []
        token = ""
        while True:  # every page: runs skipped below must not hide the ones after them
            listed = await self.store(tenant).list_threads(
                cpb.ListThreadsRequest(
                    namespace=RUNS_NAMESPACE,
                    statuses=_RESUMABLE,
                    lease_expired_only=True,
                    page_size=500,
                    page_token=token,
                )
            )
            orphans += listed.threads
            token = listed.next_page_token
            if not token:
                break
        taken = 0
        now = time.time()
        for thread in orphans:
            key = (tenant, thread.thread_id)
            if key in self._running or key in self._not_runs:
                continue
            # A run started a moment ago has no lease yet: its engine is about to take it.
            if now - thread.updated_at.ToNanoseconds() / 1e9 < self.settings.lease_ttl:
                continue
            try:
                stored = await self.registry.get(
                    tenant, thread.workflow_id, thread.workflow_version
                )
            except WorkflowNotFound:
                log.error("run of an unknown workflow", extra={"run_id": thread.thread_id})
                continue
            self._launch(tenant, self._parsed(tenant, stored), thread.thread_id)
            metrics.TAKEOVERS.inc()
            taken += 1
        if taken:
            log.info("taking over runs", extra={"tenant": tenant, "runs": taken})
        return taken
