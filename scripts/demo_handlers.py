"""`python` node handlers for the demo: slow enough to watch, and each execution's start and
end are logged to $DEMO_LOG so the demo can show that no finished node ran again (a node
cut off by the kill starts again, as it must)."""

from __future__ import annotations

import os
import time
from typing import Any


def _log(node_id: str, seconds: float) -> None:
    with open(os.environ["DEMO_LOG"], "a") as log:
        log.write(f"started {node_id}\n")
    time.sleep(seconds)
    with open(os.environ["DEMO_LOG"], "a") as log:
        log.write(f"finished {node_id}\n")


def fetch(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    _log(node_id, 1.0)
    return {"rows": 12_400, "source": state["input"]["dataset"]}


def check(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    _log(node_id, 1.5)
    return {"ok": True, "checked": state["fetch"]["rows"]}


def build(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    _log(node_id, 1.2)
    return {"artifact": f"{state['fetch']['source']}-model-7"}


def canary(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    _log(node_id, 1.2)
    return {"error_rate": 0.002, "healthy": True}


def deploy(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    _log(node_id, 1.0)
    return {"environment": "production", "artifact": state["build"]["artifact"]}
