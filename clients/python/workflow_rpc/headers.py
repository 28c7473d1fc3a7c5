"""Call metadata and the headers both sides of a Session stream say (docs/api.md#session)."""

from __future__ import annotations

# The tenant a call acts for (docs/api.md#tenants).
TENANT_HEADER = "x-tenant-id"
DEFAULT_TENANT = "default"
# The tenant under which the engine keeps its own records (the tenants it has seen): reserved,
# and with credentials checked only the system role may name it (docs/security.md#tenants).
SYSTEM_TENANT = "engine.system"
# The caller's credential: "Bearer TOKEN" (docs/security.md#bearer-tokens).
AUTHORIZATION_HEADER = "authorization"
# The metadata saying a side reads batches: the client's in its call, the store's in its
# first headers, before which calls go one per message.
BATCHES_HEADER = "x-session-batches"
# In the store's first headers: it checks SaveRequest.required_head (an older store would
# ignore the field).
REQUIRED_HEAD_HEADER = "x-checks-required-head"


def tenant_metadata(tenant: str | None, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The call metadata naming a tenant (None: none named, so the service takes the
    credential's, or DEFAULT_TENANT) and carrying a bearer token, if given."""
    named = ((TENANT_HEADER, tenant),) if tenant is not None else ()
    return (*named, (AUTHORIZATION_HEADER, f"Bearer {token}")) if token else named


__all__ = [
    "AUTHORIZATION_HEADER",
    "BATCHES_HEADER",
    "DEFAULT_TENANT",
    "REQUIRED_HEAD_HEADER",
    "SYSTEM_TENANT",
    "TENANT_HEADER",
    "tenant_metadata",
]
