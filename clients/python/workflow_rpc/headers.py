"""Call metadata and the headers both sides of a Session stream say (docs/api.md#session)."""

from __future__ import annotations

# The tenant a call acts for (docs/api.md#tenants).
TENANT_HEADER = "x-tenant-id"
DEFAULT_TENANT = "default"
# The metadata saying a side reads batches: the client's in its call, the store's in its
# first headers, before which calls go one per message.
BATCHES_HEADER = "x-session-batches"
# In the store's first headers: it checks SaveRequest.required_head (an older store would
# ignore the field).
REQUIRED_HEAD_HEADER = "x-checks-required-head"


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """The call metadata naming a tenant."""
    return ((TENANT_HEADER, tenant),)


__all__ = [
    "BATCHES_HEADER",
    "DEFAULT_TENANT",
    "REQUIRED_HEAD_HEADER",
    "TENANT_HEADER",
    "tenant_metadata",
]
