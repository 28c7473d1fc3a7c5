"""One node of a step: its condition, its attempts under its retry policy and timeout, and
its result recorded the moment it finishes (docs/nodes.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from engine_svc import expressions, metrics
from engine_svc.definition import NodeSpec
from engine_svc.execution import Execution
from engine_svc.nodes import NodeCall, NodeRunner
from engine_svc.recording import RunRecorder, done_event, started_events
from engine_svc.run_state import OUTPUT_CHANNEL, SKIPPED_CHANNEL, event
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = ["NodeExecution"]


class NodeExecution:
    """Runs the nodes of one tenant's runs with the engine's node runner."""

    def __init__(self, runner: NodeRunner, tenant: str, recorder: RunRecorder) -> None:
        self.runner = runner
        self.tenant = tenant
        self.recorder = recorder

    async def run(
        self,
        ex: Execution,
        node: NodeSpec,
        state: dict[str, Any],
        gate: asyncio.Semaphore,
        announced: bool,
        may_defer: bool,
    ) -> tuple[str, str]:
        """Run one node with its retry policy; record its output at once. (node id, error);
        a node held back by a pause is neither done nor failed."""
        try:
            skipped = bool(node.when) and not expressions.evaluate(node.when, state)
        except expressions.ExpressionError as exc:  # the node's failure, not the engine's
            ex.running -= 1
            return node.id, await self.when_failed(ex, node, exc)
        if skipped:
            ex.running -= 1
            await self.recorder.write(
                ex, node.id, SKIPPED_CHANNEL, True, done_event(ex, node), step_saves=may_defer
            )
            return node.id, ""
        policy = node.retry
        attempt = 0
        call = NodeCall(self.tenant, ex.run.run_id)
        async with gate:
            if ex.pause is not None:
                ex.running -= 1
                return node.id, ""  # not started: it runs when the run is resumed
            if not announced:
                await self.recorder.publish(ex, started_events(ex, [node.id]))
            started = time.monotonic()

            async def once() -> Any:
                nonlocal attempt
                attempt += 1
                async with asyncio.timeout(node.timeout):  # no task of its own, unlike wait_for
                    return await self.runner.run(call, node, state)

            try:
                try:  # the first attempt without the retry machinery: most nodes need no more
                    output = await once()
                except Exception:
                    if policy.max_attempts <= 1:
                        raise
                    # The same waits as one AsyncRetrying over every attempt: initial_backoff,
                    # then growing by `multiplier`, at most max_backoff.
                    await asyncio.sleep(min(policy.initial_backoff, policy.max_backoff))
                    async for trying in AsyncRetrying(
                        stop=stop_after_attempt(policy.max_attempts - 1),
                        wait=wait_exponential(
                            multiplier=policy.initial_backoff * policy.multiplier,
                            max=policy.max_backoff,
                            exp_base=policy.multiplier,
                        ),
                        reraise=True,
                    ):
                        with trying:
                            output = await once()
            except Exception as exc:  # the node's failure, not the engine's
                ex.running -= 1
                if isinstance(exc, TimeoutError):
                    error = f"timed out after {node.timeout:g}s"
                else:
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                await self.failed(ex, node, attempt, error)
                return node.id, error
        duration = time.monotonic() - started
        ex.finished(node.id, round(duration, 6))
        metrics.nodes(node.type, "completed").inc()
        metrics.node_seconds(node.type).observe(duration)
        ex.running -= 1
        completed = done_event(ex, node, attempt=attempt, duration_seconds=duration, output=output)
        deferred = may_defer and ex.running == 0  # the step's checkpoint comes next
        await self.recorder.write(
            ex, node.id, OUTPUT_CHANNEL, output, completed, deferred=deferred, step_saves=may_defer
        )
        if pb.CHECKPOINT_TRIGGER_NODE_COMPLETED in ex.workflow.triggers:
            await self.recorder.save(ex, cpb.TRIGGER_NODE_COMPLETED, name=node.id, status=False)
        return node.id, ""

    async def failed(self, ex: Execution, node: NodeSpec, attempt: int, error: str) -> None:
        """A node's failure, as its event says it."""
        metrics.nodes(node.type, "failed").inc()
        failed = event(
            "node.failed",
            node_id=node.id,
            attempt=attempt,
            error=error,
            status=ex.run.status,
            **ex.progress(),
        )
        await self.recorder.publish(ex, [failed])

    async def when_failed(self, ex: Execution, node: NodeSpec, exc: Exception) -> str:
        """A `when` that cannot be evaluated on the run's state fails its node (attempt 0:
        the node never started); the error the run ends with."""
        error = f"when: {exc}"
        await self.failed(ex, node, 0, error)
        return error
