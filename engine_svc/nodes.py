"""What each node type does. The executor decides when a node runs; this decides how.

`python` handlers come only from the modules the operator allowed (`--handlers`); `http`
requests go through one shared httpx client; `subworkflow` and `rollback` nodes act through
the engine (callbacks, so this module knows nothing of leases or the store).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine_svc import expressions, values
from engine_svc.definition import NodeSpec
from engine_svc.http_policy import HttpPolicy, Refused

if TYPE_CHECKING:
    import httpx


class NodeFailed(RuntimeError):
    """The node did not produce an output (retried per its policy)."""


@dataclass(frozen=True, slots=True)
class NodeCall:
    """Where a node runs: the run it belongs to, for nodes that start child runs."""

    tenant: str
    run_id: str


# A node type the engine runs itself: (where, node, the run's state) -> the node's output.
EngineNode = Callable[[NodeCall, NodeSpec, dict[str, Any]], Awaitable[Any]]


def render(template: Any, state: dict[str, Any]) -> Any:
    """Fill `${expression}` placeholders from the run's state, in strings, lists and maps.

    A string that is one placeholder becomes the expression's value (a number stays a
    number); placeholders inside longer strings are formatted into them (JSON for non-strings).
    """
    if isinstance(template, str):
        whole = expressions.PLACEHOLDER.fullmatch(template.strip())
        if whole:
            return expressions.evaluate(whole.group(1), state)

        def one(m: re.Match[str]) -> str:
            value = expressions.evaluate(m.group(1), state)
            return value if isinstance(value, str) else json.dumps(value)

        return expressions.PLACEHOLDER.sub(one, template)
    if isinstance(template, list):
        return [render(v, state) for v in template]
    if isinstance(template, dict):
        return {k: render(v, state) for k, v in template.items()}
    return template


def expected_statuses(config: dict[str, Any]) -> set[int] | None:
    """The statuses an `http` node accepts; None means any 2xx."""
    status = config.get("expect_status")
    if status is None:
        return None
    return {int(s) for s in (status if isinstance(status, list) else [status])}


class NodeRunner:
    """Runs one attempt of one node and returns its JSON output."""

    def __init__(
        self,
        allowed_modules: set[str],
        engine_nodes: dict[str, EngineNode] | None = None,
        http_policy: HttpPolicy | None = None,
    ) -> None:
        self.allowed_modules = allowed_modules
        self.engine_nodes = engine_nodes or {}
        self.http_policy = http_policy or HttpPolicy()
        self._http: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def resolve(self, spec: str) -> Callable[..., Any]:
        """The function a `python` node names: one defined in an allowed module itself (or in
        a module under it), not a name it imported (`mod:os` or `mod:system` would reach past
        the allowlist) nor one starting with "_" (docs/security.md#nodes-that-cannot-escape).
        Registration checks it too; a definition stored before that is refused here."""
        module_name, _, function = spec.partition(":")
        if module_name not in self.allowed_modules:
            raise NodeFailed(f"module {module_name!r} is not allowed (--handlers)")
        if function.startswith("_"):
            raise NodeFailed('a name starting with "_" is not a handler')
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # not there, or its own code failed to import
            raise NodeFailed(f"handler {spec!r} not found: {type(exc).__name__}: {exc}") from exc
        found = getattr(module, function, None)
        if found is None:
            raise NodeFailed(f"no function {function!r} in {module_name}")
        home = getattr(found, "__module__", None) or ""
        if (
            inspect.isclass(found)
            or inspect.ismodule(found)
            or not callable(found)
            or not (home == module_name or home.startswith(module_name + "."))
        ):
            raise NodeFailed(f"{function!r} is not a function of {module_name}")
        return found

    def handler_problems(self, nodes: Sequence[NodeSpec]) -> list[tuple[str, str]]:
        """What registration refuses in `python` nodes (nodes in definition order), as field
        violations: what the run would fail with when it reached them."""
        problems = []
        for i, node in enumerate(nodes):
            if node.type == "python":
                try:
                    self.resolve(node.config["handler"])
                except NodeFailed as exc:
                    problems.append((f"nodes[{i}].config.handler", str(exc)))
        return problems

    async def run(self, call: NodeCall, node: NodeSpec, state: dict[str, Any]) -> Any:
        try:
            output = await self._run(call, node, state)
        except expressions.ExpressionError as exc:
            raise NodeFailed(str(exc)) from exc
        if problem := values.problem_of(output, "output"):  # it could never be read back
            raise NodeFailed(f"{problem[0]}: {problem[1]}")
        return output

    async def _run(self, call: NodeCall, node: NodeSpec, state: dict[str, Any]) -> Any:
        cfg = node.config
        if node.type == "noop":
            return None
        if node.type == "sleep":
            # At least that long by the monotonic clock: uvloop's timers have millisecond
            # resolution and may fire a fraction of one early.
            seconds, started = float(cfg["seconds"]), time.monotonic()
            await asyncio.sleep(seconds)
            short = seconds - (time.monotonic() - started)
            if short > 0:
                await asyncio.sleep(short + 0.001)
            return None
        if node.type == "transform":
            # Off the event loop: a long one (bounded by EVAL_SECONDS) holds no other run.
            return await asyncio.to_thread(expressions.evaluate, cfg["expression"], state)
        if node.type == "python":
            handler = self.resolve(cfg["handler"])
            # A handler takes the run's state, and the node's id if it has a second parameter.
            args = (state, node.id) if len(inspect.signature(handler).parameters) > 1 else (state,)
            if inspect.iscoroutinefunction(handler):
                return await handler(*args)
            return await asyncio.to_thread(handler, *args)
        if node.type == "http":
            return await self._request(cfg, state)
        if node.type in self.engine_nodes:
            return await self.engine_nodes[node.type](call, node, state)
        raise NodeFailed(f"node type {node.type!r} is not runnable here")

    async def _request(self, cfg: dict[str, Any], state: dict[str, Any]) -> Any:
        import httpx  # at the first http node (engine_svc/http_client.py says why)

        from engine_svc.http_client import guarded_client

        if self._http is None:
            self._http = guarded_client(self.http_policy)
        method = str(cfg.get("method", "GET")).upper()
        body = render(cfg["body"], state) if "body" in cfg else None
        seconds = float(cfg.get("timeout_seconds", 30.0))
        limit = self.http_policy.max_bytes
        try:
            # The whole exchange within timeout_seconds (httpx's own timeout is per read: a
            # server trickling bytes would hold the node for ever).
            async with asyncio.timeout(seconds):
                request = self._http.build_request(
                    method,
                    str(render(cfg["url"], state)),
                    headers={k: str(v) for k, v in render(cfg.get("headers", {}), state).items()},
                    content=body if isinstance(body, str) else None,
                    json=body if body is not None and not isinstance(body, str) else None,
                    timeout=seconds,
                )
                response = await self._http.send(request, stream=True)
                try:
                    content = bytearray()
                    async for chunk in response.aiter_bytes():
                        content += chunk
                        if len(content) > limit:
                            raise NodeFailed(
                                f"{method} {response.url}: the response is over "
                                f"{limit} bytes (--http-max-bytes)"
                            )
                finally:
                    await response.aclose()
                response._content = bytes(content)  # read: .text and .json() use it
        except TimeoutError as exc:
            raise NodeFailed(f"{method} {cfg['url']}: no whole answer within {seconds}s") from exc
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, Refused) as exc:  # a URL too
            raise NodeFailed(f"{method} {cfg['url']}: {type(exc).__name__}: {exc}") from exc
        wanted = expected_statuses(cfg)
        if (wanted is None and not response.is_success) or (
            wanted is not None and response.status_code not in wanted
        ):
            raise NodeFailed(
                f"{method} {response.url} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text
        return {"status": response.status_code, "body": payload}
