"""A run's super-steps: every ready node at once (bounded), one checkpoint per step, until
the run ends, waits for an approval, pauses, fails or stops at a breakpoint
(docs/engine.md#how-a-run-executes)."""

from __future__ import annotations

import asyncio

from engine_svc import expressions
from engine_svc.execution import Execution
from engine_svc.node_execution import NodeExecution
from engine_svc.recording import RunRecorder, done_event, started_events
from engine_svc.run_state import SKIPPED_CHANNEL, RunState, RunStatus, status_event
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = ["StepLoop"]


class StepLoop:
    """Steps the runs executing here."""

    def __init__(self, recorder: RunRecorder, nodes: NodeExecution) -> None:
        self.recorder = recorder
        self.nodes = nodes

    async def cancelled(self, ex: Execution) -> RunState:
        """End the execution of a run a CancelRun stopped."""
        reason, control_id = ex.cancel or ("", "")
        run = ex.run
        run.status = RunStatus.CANCELLED
        run.error = f"cancelled: {reason or 'no reason given'}"
        event = status_event(RunStatus.CANCELLED, control_id=control_id, **ex.progress())
        await self.recorder.save(
            ex, cpb.TRIGGER_INTERRUPT, name="cancel", events=[event], release=True
        )
        return run

    async def _paused(self, ex: Execution) -> RunState:
        ex.pausing = True
        why, control_id = ex.pause or ("", "")
        run = ex.run
        if ex.shutdown:  # another engine (or this one, restarted) goes on from here at once
            await self.recorder.save(ex, cpb.TRIGGER_PAUSE, name="engine-shutdown", release=True)
            return run
        run.status = RunStatus.PAUSED
        event = status_event(RunStatus.PAUSED, control_id=control_id, reason=why, **ex.progress())
        await self.recorder.save(ex, cpb.TRIGGER_PAUSE, name="pause", events=[event], release=True)
        return run

    async def run(self, ex: Execution) -> RunState:
        """Step until the run ends, waits for an answer, pauses, fails or breaks."""
        run, workflow = ex.run, ex.workflow
        opening: list[cpb.NewEvent] = []  # sent with the first node.started events
        if run.status is RunStatus.PENDING:
            run.status = RunStatus.RUNNING
            opening.append(status_event(RunStatus.RUNNING, **ex.progress()))
        gate = asyncio.Semaphore(ex.parallel)
        # With a checkpoint after every step, the step's last node rides on it (one call less
        # per step), and so do the node.started events of the next step.
        step_checkpoints = pb.CHECKPOINT_TRIGGER_STEP_COMPLETED in workflow.triggers
        before_critical = pb.CHECKPOINT_TRIGGER_BEFORE_CRITICAL in workflow.triggers
        while True:
            if ex.pause is not None:
                return await self._paused(ex)
            ready = ex.ready()
            if not ready:
                break
            runnable = [n for n in ready if n.type != "approval"]
            if not runnable:  # only approvals are left to start: wait for an answer
                node = ready[0]
                try:
                    skipped = bool(node.when) and not expressions.evaluate(node.when, run.state())
                except expressions.ExpressionError as exc:
                    error = await self.nodes.when_failed(ex, node, exc)
                    return await self._failed(ex, {node.id: error})
                if skipped:
                    await self.recorder.write(
                        ex, node.id, SKIPPED_CHANNEL, True, done_event(ex, node)
                    )
                    continue
                run.status = RunStatus.WAITING
                run.waiting_node, run.waiting_for = node.id, str(node.config.get("prompt", ""))
                event = status_event(RunStatus.WAITING, node_id=node.id, **ex.progress())
                await self.recorder.save(
                    ex, cpb.TRIGGER_INTERRUPT, name=node.id, events=[event], release=True
                )
                return run  # nothing holds a task or a lease while it waits
            held = [
                f"before:{n.id}"
                for n in runnable
                if n.id in run.interrupt_before and f"before:{n.id}" not in run.breaks_passed
            ]
            if held:
                return await self._breakpoint(ex, held)
            critical = [n.id for n in runnable if n.critical]
            if critical and before_critical:
                name = "before:" + ",".join(critical)
                await self.recorder.save(ex, cpb.TRIGGER_BEFORE_CRITICAL, name=name)
            state = run.state()
            first = [
                n.id for n in runnable[: ex.parallel] if not n.when and n.id not in ex.announced
            ]
            if first or opening:
                await self.recorder.publish(ex, [*opening, *started_events(ex, first)])
                opening = []
            announced, ex.announced = ex.announced | set(first), set()
            ex.running = len(runnable)
            results = await asyncio.gather(
                *(
                    self.nodes.run(ex, n, state, gate, n.id in announced, step_checkpoints)
                    for n in runnable
                )
            )
            failures = {nid: err for nid, err in results if err}
            run.step += 1
            if failures:
                return await self._failed(ex, failures)
            hit = [
                f"after:{n.id}"
                for n in runnable
                if n.id in run.interrupt_after
                and n.id in run.completed
                and f"after:{n.id}" not in run.breaks_passed
            ]
            if hit:
                return await self._breakpoint(ex, hit)
            if ex.all_done():
                break
            if step_checkpoints:
                following = self.announceable(ex) if ex.pause is None else []
                ex.announced = set(following)
                await self.recorder.save(
                    ex, cpb.TRIGGER_STEP_COMPLETED, events=started_events(ex, following)
                )
        run.status = RunStatus.COMPLETED
        event = status_event(RunStatus.COMPLETED, **ex.progress())
        await self.recorder.save(ex, cpb.TRIGGER_STEP_COMPLETED, events=[event], release=True)
        return run

    async def _failed(self, ex: Execution, failures: dict[str, str]) -> RunState:
        """The run FAILED with its nodes' errors, checkpointed, its lease let go."""
        run = ex.run
        run.status = RunStatus.FAILED
        run.error = "; ".join(f"{k}: {v}" for k, v in failures.items())
        event = status_event(RunStatus.FAILED, error=run.error, **ex.progress())
        await self.recorder.save(ex, cpb.TRIGGER_ERROR, name="error", events=[event], release=True)
        return run

    async def _breakpoint(self, ex: Execution, keys: list[str]) -> RunState:
        """Pause at breakpoints ("before:<id>", "after:<id>"); ResumeRun goes past them."""
        run = ex.run
        run.breaks_passed += keys
        run.status = RunStatus.PAUSED
        name = ",".join(keys)
        event = status_event(
            RunStatus.PAUSED, reason="breakpoint", breakpoint=name, **ex.progress()
        )
        await self.recorder.save(ex, cpb.TRIGGER_INTERRUPT, name=name, events=[event], release=True)
        return run

    @staticmethod
    def announceable(ex: Execution) -> list[str]:
        """The nodes the next step starts at once, whose node.started may go out ahead with
        a checkpoint: ready, not approvals, without a condition or a checkpoint or breakpoint
        before them, within max_parallel."""
        before_critical = pb.CHECKPOINT_TRIGGER_BEFORE_CRITICAL in ex.workflow.triggers
        return [
            n.id
            for n in ex.ready()
            if n.type != "approval"
            and not n.when
            and not (n.critical and before_critical)
            and n.id not in ex.run.interrupt_before
        ][: ex.parallel]
