"""The audit log (docs/security.md#audit-log): every control action, recorded with who made
it, as an event of one thread per tenant in the engine's namespaces, which no tenant's token
may write. The engine records what it is asked through its RPCs, the checkpoint service the
deletes, prunes and copies made on it; the engine's ListAuditEntries reads them back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from workflow_rpc.callers import CALLER

__all__ = [
    "ANONYMOUS",
    "AUDIT_NAMESPACE",
    "AUDIT_THREAD",
    "EVENT_PREFIX",
    "EntryWrites",
    "entry_payload",
]

log = logging.getLogger("workflow_rpc.audit")

AUDIT_NAMESPACE = "audit"
AUDIT_THREAD = "actions"
# An entry's event type: "audit." and its action.
EVENT_PREFIX = "audit."
# Who made an action while no credentials are checked.
ANONYMOUS = "anonymous"


def entry_payload(action: str, target: str, details: dict[str, Any]) -> dict[str, Any]:
    """An entry's event payload, naming the caller of the call being handled."""
    caller = CALLER.get()
    return {
        "subject": caller.subject if caller is not None else ANONYMOUS,
        "action": action,
        "target": target,
        "details": details,
    }


class EntryWrites:
    """Entries being written, each by a task of its own: a caller that goes away after its
    action does not take the entry with it. A write that fails leaves the entry missing, and
    the log says so (the action stands)."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Task[None]] = set()

    def start(
        self, write: Coroutine[Any, Any, Any], action: str, target: str
    ) -> asyncio.Task[None]:
        async def written() -> None:
            try:
                await write
            except Exception:
                log.exception(
                    "audit entry not recorded", extra={"action": action, "target": target}
                )

        task = asyncio.create_task(written())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def drain(self, seconds: float) -> None:
        """Wait for the entries under way, `seconds` at most (a stop)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=seconds)
