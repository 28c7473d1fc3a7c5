"""A LangGraph StateGraph with a human-in-the-loop `interrupt()`, run against the checkpoint
service from separate processes (see test_langgraph_saver.py):

    python -m tests.langgraph_graph ADDRESS TENANT start THREAD
    python -m tests.langgraph_graph ADDRESS TENANT resume THREAD ANSWER
    python -m tests.langgraph_graph ADDRESS TENANT fork THREAD TOTAL
    python -m tests.langgraph_graph ADDRESS TENANT cancel THREAD

Each prints one JSON line: the graph's state and whether it waits for an answer. `cancel`
streams a slow async graph, cancels it half-way, then finishes it in a second event loop
(asyncio.run twice, one async saver).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from workflow_client.saver import CheckpointServiceSaver


class Order(TypedDict, total=False):
    items: list[int]
    total: int
    approved: bool
    receipt: str


def price(state: Order) -> Order:
    return {"total": sum(state["items"])}


def approve(state: Order) -> Order:
    answer = interrupt({"question": f"charge {state['total']}?"})
    return {"approved": bool(answer)}


def charge(state: Order) -> Order:
    verdict = "charged" if state.get("approved") else "declined"
    return {"receipt": f"{verdict} {state['total']}"}


def build(saver: CheckpointServiceSaver):
    graph = StateGraph(Order)
    graph.add_node("price", price)
    graph.add_node("approve", approve)
    graph.add_node("charge", charge)
    graph.add_edge(START, "price")
    graph.add_edge("price", "approve")
    graph.add_edge("approve", "charge")
    graph.add_edge("charge", END)
    return graph.compile(checkpointer=saver)


class Steps(TypedDict, total=False):
    done: list[str]


async def _step(name: str, state: Steps) -> Steps:
    if name == "slow":
        await asyncio.sleep(1.0)
    return {"done": [*state.get("done", []), name]}


def build_slow(saver: CheckpointServiceSaver):
    graph = StateGraph(Steps)
    for name in ("first", "slow", "last"):

        async def node(state: Steps, name: str = name) -> Steps:
            return await _step(name, state)

        graph.add_node(name, node)
    graph.add_edge(START, "first")
    graph.add_edge("first", "slow")
    graph.add_edge("slow", "last")
    graph.add_edge("last", END)
    return graph.compile(checkpointer=saver)


def cancel(address: str, tenant: str, thread: str) -> None:
    saver = CheckpointServiceSaver(address, tenant=tenant)
    app = build_slow(saver)
    config = {"configurable": {"thread_id": thread}}

    async def started_then_cancelled() -> None:
        async def consume() -> None:
            async for _ in app.astream({"done": []}, config, durability="async"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # inside the slow node, writes of the first in flight
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def finished() -> Steps:
        await app.ainvoke(None, config, durability="sync")
        return (await app.aget_state(config)).values

    asyncio.run(started_then_cancelled())
    values = asyncio.run(finished())  # a second event loop, the same saver
    print(json.dumps({"values": values, "waiting": False}))


def main(address: str, tenant: str, action: str, thread: str, *rest: str) -> None:
    if action == "cancel":
        cancel(address, tenant, thread)
        return
    saver = CheckpointServiceSaver(address, tenant=tenant)
    app = build(saver)
    config = {"configurable": {"thread_id": thread}}
    if action == "start":
        app.invoke({"items": [3, 4, 5]}, config, durability="sync")
    elif action == "resume":
        app.invoke(Command(resume=json.loads(rest[0])), config, durability="sync")
    elif action == "fork":
        # Time travel: back to the checkpoint after `price`, with another total, and on.
        after_price = next(s for s in app.get_state_history(config) if s.next == ("approve",))
        forked = app.update_state(after_price.config, {"total": int(rest[0])}, as_node="price")
        app.invoke(None, forked, durability="sync")
        app.invoke(Command(resume=True), config, durability="sync")
    state = app.get_state(config)
    print(json.dumps({"values": state.values, "waiting": bool(state.interrupts)}))
    saver.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
