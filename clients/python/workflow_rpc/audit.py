"""The audit log (docs/security.md#audit-log): every control action, recorded with who made
it, as an event of one thread per tenant in the engine's namespaces, which no tenant's token
may write. The engine records what it is asked through its RPCs, the checkpoint service the
deletes, prunes and copies made on it; the engine's ListAuditEntries reads them back."""

from __future__ import annotations

from typing import Any

from workflow_rpc.callers import CALLER

__all__ = ["ANONYMOUS", "AUDIT_NAMESPACE", "AUDIT_THREAD", "EVENT_PREFIX", "entry_payload"]

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
