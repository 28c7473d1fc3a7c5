"""The console's JSON API and live streams (docs/console.md#api): thin translations between
HTTP and the engine's RPCs, made with the caller's own credentials.

A run's events go out as Server-Sent Events whose `id:` is the event's seq, so a browser's
EventSource that reconnects sends `Last-Event-ID` and the console follows the run's feed from
there: nothing is missed or repeated, across console and engine restarts alike. The WebSocket
endpoint gives programmatic clients the same events as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import WSMsgType, web
from aiohttp_sse import sse_response

from workflow_client import calls
from workflow_client.aio import AsyncEngineClient
from workflow_client.errors import WorkflowError
from workflow_console.config import Settings
from workflow_console.signin import TOKEN_COOKIE, Caller, caller_of
from workflow_console.views import (
    checkpoint_view,
    definition_view,
    event_view,
    run_view,
    versions_view,
)
from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = ["ConsoleApi", "error_responses"]

log = logging.getLogger("workflow_console")

# The HTTP status of each engine error (anything else: 502, the engine's fault).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
_STATUSES = {name.removeprefix("RUN_STATUS_"): value for name, value in pb.RunStatus.items()}
MAX_PAGE_SIZE = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, error: str, message: str, **more: Any) -> web.Response:
    body = {"error": error, "message": message, **more}
    return web.json_response(body, status=status)


@web.middleware
async def error_responses(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An engine refusal as JSON with its HTTP status; a request the API cannot read, 400."""
    try:
        return await handler(request)
    except WorkflowError as exc:
        status = _HTTP_STATUS.get(exc.code, 502)
        violations = [{"field": f, "description": d} for f, d in exc.violations]
        return _error(status, exc.code.name, exc.details, violations=violations)
    except _BadRequest as exc:
        return _error(400, "INVALID_ARGUMENT", str(exc))


@contextlib.asynccontextmanager
async def _until_gone() -> AsyncIterator[None]:
    """A stream whose reader went away (a page closed or left) just ends."""
    try:
        yield
    except ConnectionResetError:
        pass


class _BadRequest(Exception):
    """A request body or query the API cannot take."""


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _int(value: str | None, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise _BadRequest(f"{name} must be a whole number, not {value!r}") from None


class ConsoleApi:
    """The routes under /api and /ws, over one channel to the engine."""

    def __init__(self, *, settings: Settings, engine: AsyncEngineClient) -> None:
        self.settings = settings
        self.engine = engine

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/session", self.sign_in),
            web.delete("/api/session", self.sign_out),
            web.get("/api/session", self.session),
            web.get("/api/runs", self.list_runs),
            web.get("/api/runs/live", self.runs_live),
            web.get("/api/runs/{run_id}", self.get_run),
            web.get("/api/runs/{run_id}/events", self.run_events),
            web.get("/api/runs/{run_id}/checkpoints", self.checkpoints),
            web.post("/api/runs/{run_id}/{action:pause|resume|cancel|checkpoint|fork}", self.act),
            web.get("/api/workflows/{workflow_id}", self.get_workflow),
            web.post("/api/workflows/{workflow_id}/rollback", self.rollback),
            web.get("/ws/runs/{run_id}", self.run_socket),
        ]

    # ---- calls, as the request's caller ---------------------------------------------

    def _client(self, request: web.Request) -> AsyncEngineClient:
        caller = caller_of(request, self.settings.tenant)
        return self.engine.as_caller(token=caller.token, tenant=caller.tenant)

    async def _do(self, request: web.Request, call: calls.Call[Any]) -> Any:
        return await self._client(request)._do(call)

    # ---- signing in ------------------------------------------------------------------

    async def sign_in(self, request: web.Request) -> web.Response:
        """Check the token with the engine (a one-run list), then keep it in the cookie."""
        token = str((await _body(request)).get("token", "")).strip()
        if not token:
            raise _BadRequest("token is required")
        client = self.engine.as_caller(token=token, tenant=None)
        await client._do(calls.list_runs("", [], 1, ""))
        response = web.json_response({"signed_in": True})
        response.set_cookie(
            TOKEN_COOKIE,
            token,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.settings.secure_cookies,
        )
        return response

    async def sign_out(self, _request: web.Request) -> web.Response:
        response = web.json_response({"signed_in": False})
        response.del_cookie(TOKEN_COOKIE, path="/")
        return response

    async def session(self, request: web.Request) -> web.Response:
        """Whether the caller may list runs: the page shows the sign-in form if not."""
        caller: Caller = caller_of(request, self.settings.tenant)
        await self._do(request, calls.list_runs("", [], 1, ""))
        return web.json_response({"signed_in": caller.token is not None})

    # ---- runs ------------------------------------------------------------------------

    def _runs_call(self, request: web.Request) -> calls.Call[Any]:
        query = request.query
        statuses = []
        for name in filter(None, query.get("status", "").upper().split(",")):
            if name not in _STATUSES or not _STATUSES[name]:
                raise _BadRequest(f"status {name!r} is none of {sorted(_STATUSES)[1:]}")
            statuses.append(_STATUSES[name])
        page_size = min(_int(query.get("page_size"), "page_size", 50), MAX_PAGE_SIZE)
        return calls.list_runs(
            query.get("workflow_id", ""), statuses, page_size, query.get("page_token", "")
        )

    async def list_runs(self, request: web.Request) -> web.Response:
        page = await self._do(request, self._runs_call(request))
        return web.json_response(
            {"runs": [run_view(r) for r in page.runs], "next_page_token": page.next_page_token}
        )

    async def runs_live(self, request: web.Request) -> web.StreamResponse:
        """The first page of runs (the query's filters), sent again whenever it changes."""
        call = self._runs_call(request)
        client = self._client(request)
        async with sse_response(request) as stream, _until_gone():
            last = None
            while stream.is_connected():
                try:
                    page = await client._do(call)
                    body = {
                        "runs": [run_view(r) for r in page.runs],
                        "next_page_token": page.next_page_token,
                    }
                except WorkflowError as exc:
                    body = {"error": exc.code.name, "message": exc.details}
                text = json.dumps(body, sort_keys=True)
                if text != last:
                    await stream.send(text, event="runs")
                    last = text
                await asyncio.sleep(self.settings.runs_refresh)
        return stream

    async def get_run(self, request: web.Request) -> web.Response:
        run = await self._do(request, calls.get_run(request.match_info["run_id"]))
        workflow = await self._do(request, calls.get_workflow(run.workflow_id, run.version))
        return web.json_response(
            {"run": run_view(run), "definition": definition_view(workflow.definition)}
        )

    async def checkpoints(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        with_state = request.query.get("include_state", "") in ("1", "true")
        page_size = min(_int(request.query.get("page_size"), "page_size", 50), MAX_PAGE_SIZE)
        call = calls.run_history(run_id, with_state, page_size, request.query.get("page_token", ""))
        page = await self._do(request, call)
        return web.json_response(
            {
                "checkpoints": [checkpoint_view(c) for c in page.checkpoints],
                "next_page_token": page.next_page_token,
            }
        )

    async def act(self, request: web.Request) -> web.Response:
        run_id, action = request.match_info["run_id"], request.match_info["action"]
        body = await _body(request)
        if action == "pause":
            call = calls.pause_run(run_id)
        elif action == "resume":
            call = calls.resume_run(run_id, body.get("value"))
        elif action == "cancel":
            call = calls.cancel_run(run_id, str(body.get("reason", "")))
        elif action == "checkpoint":
            call = calls.checkpoint_run(run_id, str(body.get("name", "")), None)
        else:
            patch = body.get("state_patch") or {}
            if not isinstance(patch, dict):
                raise _BadRequest("state_patch must be a JSON object")
            call = calls.fork_run(run_id, str(body.get("checkpoint_id", "")), patch, "")
        result = await self._do(request, call)
        if isinstance(result, pb.Run):
            return web.json_response({"run": run_view(result)})
        return web.json_response({"checkpoint_id": result})

    # ---- workflows -------------------------------------------------------------------

    async def get_workflow(self, request: web.Request) -> web.Response:
        workflow_id = request.match_info["workflow_id"]
        version = _int(request.query.get("version"), "version", 0)
        workflow = await self._do(request, calls.get_workflow(workflow_id, version))
        versions = await self._do(request, calls.list_versions(workflow_id))
        return web.json_response(
            {
                "definition": definition_view(workflow.definition),
                "version": workflow.version,
                **versions_view(versions),
            }
        )

    async def rollback(self, request: web.Request) -> web.Response:
        body = await _body(request)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise _BadRequest("version must be a whole number")
        call = calls.rollback(
            request.match_info["workflow_id"], version, str(body.get("reason", "")), ""
        )
        done = await self._do(request, call)
        return web.json_response(
            {"active_version": done.active_version, "previous_version": done.previous_version}
        )

    # ---- a run's events, live ----------------------------------------------------------

    async def _events(
        self, request: web.Request, run_id: str, after_seq: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The run's events after `after_seq` until its terminal one; the client's watch
        reopens the engine's stream from the last seq whenever it breaks (an engine restart)."""
        async for event in self._client(request).watch(run_id, after_seq):
            yield event_view(event)

    def _after_seq(self, request: web.Request) -> int:
        resumed = request.headers.get("Last-Event-ID")
        if resumed:
            return _int(resumed, "Last-Event-ID", 0)
        return _int(request.query.get("after_seq"), "after_seq", 0)

    async def run_events(self, request: web.Request) -> web.StreamResponse:
        """SSE: each event as `id: SEQ` and its JSON; `event: end` after the terminal one."""
        run_id = request.match_info["run_id"]
        after = self._after_seq(request)
        await self._do(request, calls.get_run(run_id))  # NOT_FOUND as JSON, before the stream
        async with sse_response(request) as stream, _until_gone():
            try:
                async for event in self._events(request, run_id, after):
                    await stream.send(json.dumps(event), id=str(event["seq"]))
                await stream.send("{}", event="end")
            except WorkflowError as exc:
                body = {"error": exc.code.name, "message": exc.details}
                await stream.send(json.dumps(body), event="failure")
        return stream

    async def run_socket(self, request: web.Request) -> web.WebSocketResponse:
        """WebSocket: each event as a JSON text message, then {"end": true}, and close."""
        run_id = request.match_info["run_id"]
        after = self._after_seq(request)
        await self._do(request, calls.get_run(run_id))
        socket = web.WebSocketResponse(heartbeat=20)
        await socket.prepare(request)
        reader = asyncio.create_task(self._until_closed(socket))
        try:
            async for event in self._events(request, run_id, after):
                if socket.closed:
                    break
                await socket.send_json(event)
            else:
                await socket.send_json({"end": True})
        except WorkflowError as exc:
            await socket.send_json({"error": exc.code.name, "message": exc.details})
        finally:
            reader.cancel()
            await socket.close()
        return socket

    @staticmethod
    async def _until_closed(socket: web.WebSocketResponse) -> None:
        async for message in socket:
            if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                return
