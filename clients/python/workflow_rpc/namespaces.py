"""The namespaces the engine keeps its records in, within each tenant. With credentials
checked, the store lets only the system role (the engine) save, write, publish or lease in them:
a tenant's own token changes runs through the engine, never behind it (docs/security.md)."""

from __future__ import annotations

from workflow_rpc.audit import AUDIT_NAMESPACE

__all__ = [
    "CONTROL_NAMESPACE",
    "ENGINE_NAMESPACES",
    "RUNS_NAMESPACE",
    "TENANTS_NAMESPACE",
    "WORKFLOWS_NAMESPACE",
]

RUNS_NAMESPACE = "runs"
"""A thread per run: its checkpoints, node writes and event feed."""
WORKFLOWS_NAMESPACE = "workflows"
"""A thread per workflow: its versions."""
CONTROL_NAMESPACE = "run-control"
"""A thread per run: pause, cancel and checkpoint requests for the engine holding it."""
TENANTS_NAMESPACE = "tenants"
"""Under the engine's own tenant: the tenants it has seen."""
ENGINE_NAMESPACES = frozenset(
    {RUNS_NAMESPACE, WORKFLOWS_NAMESPACE, CONTROL_NAMESPACE, TENANTS_NAMESPACE, AUDIT_NAMESPACE}
)
"""What only the system role writes; the audit log (workflow_rpc/audit.py) among them."""
