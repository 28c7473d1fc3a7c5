"""Who is calling: the identity a server's credentials check found for the call being handled
(docs/security.md#identities-and-roles). Light on purpose: the tenant lookup reads it on every
call, and the clients' distribution carries it without the verifiers (identities.py)."""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass

__all__ = ["ANY_TENANT", "CALLER", "Identity", "Role", "roles_by_method"]

# The tenant of an operator's credential: it may act on any tenant it names.
ANY_TENANT = "*"


class Role(enum.StrEnum):
    """What a credential may do, by kind of call (docs/security.md#identities-and-roles)."""

    READER = "reader"
    """Get, list, watch and read history."""
    WRITER = "writer"
    """Start, resume, pause, cancel, fork, checkpoint, register, roll back; save and lease."""
    WORKER = "worker"
    """Reserved for remote task workers."""
    ADMIN = "admin"
    """Retention, delete, prune, copy."""
    SYSTEM = "system"
    """The engine's own calls to the store: everything, for the tenants it passes."""


# The roles a role includes: a writer may read, an admin may write, the system may do all.
_INCLUDES: dict[Role, frozenset[Role]] = {
    Role.READER: frozenset({Role.READER}),
    Role.WRITER: frozenset({Role.READER, Role.WRITER}),
    Role.WORKER: frozenset({Role.WORKER}),
    Role.ADMIN: frozenset({Role.READER, Role.WRITER, Role.ADMIN}),
    Role.SYSTEM: frozenset(Role),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """A verified credential."""

    subject: str
    """Who it is (a token's name, a JWT's `sub`), as logs and the audit name them."""
    tenant: str
    """The one tenant it acts for, or ANY_TENANT for an operator (who names one per call)."""
    roles: frozenset[Role]
    """What it may do."""

    def may(self, role: Role) -> bool:
        """Whether one of its roles includes `role`."""
        return any(role in _INCLUDES[held] for held in self.roles)

    def acts_for(self, tenant: str) -> bool:
        return self.tenant in (ANY_TENANT, tenant)


CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)
"""The identity of the call this task handles; None while the server checks no credentials."""


def roles_by_method(service: str, names: dict[Role, tuple[str, ...]]) -> dict[str, Role]:
    """The role each RPC of `service` (its full name) needs, by full method name, from the
    RPC names each role opens."""
    return {f"/{service}/{name}": role for role, listed in names.items() for name in listed}
