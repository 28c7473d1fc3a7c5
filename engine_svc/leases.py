"""A run's lease: who executes it, and the fencing token every write of theirs carries
(docs/engine.md#how-a-run-executes)."""

from __future__ import annotations

import asyncio
import logging

from engine_svc.execution import Execution
from engine_svc.run_state import RUNS_NAMESPACE
from engine_svc.store import LeaseLost, Store, StoreError
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

__all__ = ["LeaseHeld", "RunLeases"]

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Someone else holds the run's lease: ask them through the control feed."""


class RunLeases:
    """Takes, renews and gives up runs' leases in one tenant's store."""

    def __init__(self, store: Store, owner: str, ttl: float) -> None:
        self.store = store
        self.owner = owner  # this engine's name; a change from outside uses "<owner>/control"
        self.ttl = ttl  # seconds a lease lasts unless renewed

    async def acquire(self, run_id: str, owner: str) -> int:
        """The run's lease for `owner`: its fencing token; LeaseHeld if another holds it."""
        try:
            lease = await self.store.acquire_lease(
                cpb.AcquireLeaseRequest(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run_id,
                    owner=owner,
                    ttl_seconds=self.ttl,
                )
            )
        except LeaseLost as exc:
            raise LeaseHeld(str(exc)) from exc
        return lease.fencing_token

    async def release(self, run_id: str, owner: str, token: int) -> None:
        await self.store.release_lease(
            cpb.ReleaseLeaseRequest(
                namespace=RUNS_NAMESPACE, thread_id=run_id, owner=owner, fencing_token=token
            )
        )

    async def keep_renewed(self, ex: Execution, work: asyncio.Task | None) -> None:
        """Renew the execution's lease every third of its length until it is released; if
        it is lost, cancel `work` (the execution). A store that is away is retried, said
        once per outage: the run's writes are fenced if someone took over meanwhile."""
        failing = False  # said once per outage, not at every renewal
        while True:
            await asyncio.sleep(self.ttl / 3)
            if ex.released:
                return
            try:
                await self.store.renew_lease(
                    cpb.RenewLeaseRequest(
                        namespace=RUNS_NAMESPACE,
                        thread_id=ex.run.run_id,
                        owner=self.owner,
                        fencing_token=ex.token,
                        ttl_seconds=self.ttl,
                    )
                )
            except StoreError as exc:
                if ex.released:
                    return  # its last checkpoint let the lease go meanwhile
                if isinstance(exc, LeaseLost) and work is not None:
                    log.warning("lease lost; stopping run", extra={"run_id": ex.run.run_id})
                    work.cancel()
                    return
                # The store is away: keep trying; writes are fenced if someone took over.
                if not failing:
                    log.warning(
                        "lease renewal failed; retrying",
                        extra={"run_id": ex.run.run_id, "error": str(exc)},
                    )
                failing = True
                continue
            if failing:
                log.info("lease renewed again", extra={"run_id": ex.run.run_id})
                failing = False
