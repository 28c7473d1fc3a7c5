"""`python` node handlers for the engine tests: they record every execution."""

from __future__ import annotations

import asyncio
from typing import Any

EXECUTIONS: list[str] = []
FAILURES_LEFT: dict[str, int] = {}


async def step(state: dict[str, Any]) -> dict[str, Any]:
    """Counts itself; a short pause so that a run can be interrupted between nodes."""
    name = f"step-{len(EXECUTIONS)}"
    EXECUTIONS.append(name)
    await asyncio.sleep(0.05)
    return {"seen": sorted(k for k in state if k != "input")}


def flaky(state: dict[str, Any]) -> str:
    """Fails while FAILURES_LEFT['flaky'] > 0 (synchronous on purpose: runs in a thread)."""
    EXECUTIONS.append("flaky")
    if FAILURES_LEFT.get("flaky", 0) > 0:
        FAILURES_LEFT["flaky"] -= 1
        raise RuntimeError("transient")
    return "ok"


def record(state: dict[str, Any], node_id: str) -> str:
    """Appends its node id to $ENGINE_TEST_LOG, slowly, so an engine can be killed mid-run."""
    import os
    import time

    with open(os.environ["ENGINE_TEST_LOG"], "a") as log:
        log.write(node_id + "\n")
    time.sleep(0.15)
    return node_id


def tagged(state: dict[str, Any], node_id: str) -> str:
    """Appends "<input tag>:<node id>" to $ENGINE_TEST_LOG: which run ran which node."""
    import os

    line = f"{state['input']['tag']}:{node_id}"
    with open(os.environ["ENGINE_TEST_LOG"], "a") as log:
        log.write(line + "\n")
    return line


def gated(state: dict[str, Any], node_id: str) -> str:
    """Logs itself to $ENGINE_TEST_LOG; fails until the file $ENGINE_TEST_GATE exists."""
    import os

    with open(os.environ["ENGINE_TEST_LOG"], "a") as log:
        log.write(node_id + "\n")
    if not os.path.exists(os.environ["ENGINE_TEST_GATE"]):
        raise RuntimeError(f"gate {os.environ['ENGINE_TEST_GATE']} is closed")
    return node_id


def held(state: dict[str, Any]) -> str:
    """Runs until the file $ENGINE_TEST_GATE exists (a minute at most): a node that is still
    running however slow the machine is, until the test lets it end."""
    import os
    import time

    for _ in range(1200):
        if os.path.exists(os.environ["ENGINE_TEST_GATE"]):
            return "released"
        time.sleep(0.05)
    raise RuntimeError("the gate never opened")


def compute(state: dict[str, Any], node_id: str) -> int:
    """n<i> = n<i-1> + 1 (n0 = input x + 1); logs each execution to $ENGINE_TEST_LOG."""
    import os

    with open(os.environ["ENGINE_TEST_LOG"], "a") as log:
        log.write(node_id + "\n")
    index = int(node_id[1:])
    before = state["input"]["x"] if index == 0 else state[f"n{index - 1}"]
    return int(before) + 1
