"""Who a request calls the engine as, and what protects a signed-in browser
(docs/console.md#signing-in).

A browser signs in with the same bearer tokens the engine takes; the console keeps the token in
an HttpOnly cookie (SameSite=Strict, so no other site's page sends it) and passes it on, so the
engine decides what each caller sees, tenant included. Every state-changing request from a
browser carries the CSRF cookie's value in a header (double submit). A programmatic client
may send `Authorization: Bearer` itself instead, and needs no cookie.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "TOKEN_COOKIE", "Caller", "caller_of", "csrf_protection"]

TOKEN_COOKIE = "wf_token"
CSRF_COOKIE = "wf_csrf"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Caller:
    """The credentials a request's engine calls carry."""

    token: str | None
    """The bearer token (None: none, for an engine that checks none)."""
    tenant: str | None
    """The tenant to name (None: the token's own, or the engine's default)."""


def bearer_of(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def caller_of(request: web.Request, default_tenant: str | None) -> Caller:
    token = bearer_of(request) or request.cookies.get(TOKEN_COOKIE) or None
    return Caller(token, None if token else default_tenant)


def csrf_protection(secure_cookies: bool) -> Callable:
    """A state-changing request from a browser must show the CSRF cookie's value in the
    X-CSRF-Token header; every page gets the cookie."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in _SAFE_METHODS and bearer_of(request) is None:
            kept = request.cookies.get(CSRF_COOKIE, "")
            sent = request.headers.get(CSRF_HEADER, "")
            if not kept or not hmac.compare_digest(kept.encode(), sent.encode()):
                raise web.HTTPForbidden(
                    text='{"error": "CSRF", "message": "missing or wrong X-CSRF-Token"}',
                    content_type="application/json",
                )
        response = await handler(request)
        if CSRF_COOKIE not in request.cookies and not response.prepared:
            response.set_cookie(
                CSRF_COOKIE,
                secrets.token_urlsafe(32),
                path="/",
                samesite="Strict",
                secure=secure_cookies,
            )
        return response

    return middleware
