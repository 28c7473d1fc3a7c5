"""Process entry point: the aiohttp server, in the same event loop as its gRPC channel to the
engine; health at /healthz; a graceful stop on SIGTERM (docs/console.md)."""

from __future__ import annotations

import logging
from importlib import resources

from aiohttp import web

from workflow_client.aio import AsyncEngineClient
from workflow_console.api import ConsoleApi, error_responses
from workflow_console.config import Settings, parse_settings
from workflow_console.signin import csrf_protection
from workflow_rpc import logs
from workflow_rpc.serving import run, until_stopped

__all__ = ["build_app", "main", "serve"]

log = logging.getLogger("workflow_console")

STATIC = resources.files("workflow_console") / "static"
# The page's own scripts and styles only: a run's data is shown as text, and even a value
# that got into the page as markup could run no script.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The page's routes: each serves the one page, which draws what its path names.
PAGES = ["/", "/runs", "/runs/{run_id}", "/workflows/{workflow_id}", "/sign-in"]


@web.middleware
async def _security_headers(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.update(_HEADERS)
    return response


async def _page(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-store"})


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "SERVING"})


def build_app(settings: Settings, engine: AsyncEngineClient) -> web.Application:
    app = web.Application(
        middlewares=[_security_headers, error_responses, csrf_protection(settings.secure_cookies)]
    )
    app.add_routes(ConsoleApi(settings=settings, engine=engine).routes())
    app.add_routes([web.get("/healthz", _healthz)])
    app.add_routes([web.get(path, _page) for path in PAGES])
    app.router.add_static("/static", str(STATIC), append_version=True)
    return app


def engine_client(settings: Settings) -> AsyncEngineClient:
    return AsyncEngineClient(
        settings.engine,
        ca_file=str(settings.engine_ca_file) if settings.engine_ca_file else None,
        cert_file=str(settings.engine_cert_file) if settings.engine_cert_file else None,
        key_file=str(settings.engine_key_file) if settings.engine_key_file else None,
        tenant=settings.tenant,
    )


async def serve(settings: Settings) -> None:
    engine = engine_client(settings)
    app = build_app(settings, engine)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    host, _, port = settings.listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]") or None, int(port))
    try:
        await site.start()
    except OSError as exc:
        raise SystemExit(
            f"python -m workflow_console: cannot listen on {settings.listen}: {exc}"
        ) from None
    log.info("listening", extra={"url": f"http://{settings.listen}/", "engine": settings.engine})
    try:
        await until_stopped()
    finally:
        await runner.cleanup()
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logs.configure("workflow_console", settings.log_level)
    run(serve(settings))
