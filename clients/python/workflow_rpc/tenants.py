"""The tenant of a call a server handles, from its `x-tenant-id` metadata, or from its
credential's when it names none (docs/security.md#tenants)."""

from __future__ import annotations

import re
from typing import Any

from workflow_rpc.callers import ANY_TENANT, CALLER
from workflow_rpc.headers import DEFAULT_TENANT, TENANT_HEADER
from workflow_rpc.statuses import InvalidArgument

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def tenant_of(context: Any) -> str:
    """The call's one tenant: a second `x-tenant-id` is refused, never silently ignored
    (which of two headers wins must not depend on the path a call takes). A Session
    stream's calls read it once (the context's `known_tenant`). With credentials checked,
    the header was checked against the caller's tenant (workflow_rpc/identities.py), and a
    call without one acts for the caller's."""
    known = getattr(context, "known_tenant", None)
    if known is not None:
        return known
    values = [v for k, v in context.invocation_metadata() or () if k == TENANT_HEADER]
    if not values:
        caller = CALLER.get()
        return caller.tenant if caller and caller.tenant != ANY_TENANT else DEFAULT_TENANT
    if len(values) > 1:
        raise InvalidArgument(
            f"{len(values)} {TENANT_HEADER} headers; a call names exactly one tenant",
            [(TENANT_HEADER, "given more than once")],
        )
    value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
    if not TENANT_PATTERN.match(value):
        raise InvalidArgument(
            f"bad {TENANT_HEADER} metadata {value[:64]!r}",
            [(TENANT_HEADER, "1-128 of A-Z a-z 0-9 . _ -, starting alphanumeric")],
        )
    if hasattr(context, "known_tenant"):
        context.known_tenant = value
    return value


__all__ = ["TENANT_PATTERN", "tenant_of"]
