"""A LangGraph StateGraph with a human-in-the-loop `interrupt()`, run against the checkpoint
service from separate processes (see test_langgraph_saver.py):

    python -m tests.langgraph_graph ADDRESS TENANT start THREAD
    python -m tests.langgraph_graph ADDRESS TENANT resume THREAD ANSWER
    python -m tests.langgraph_graph ADDRESS TENANT fork THREAD TOTAL

Each prints one JSON line: the graph's state and whether it waits for an answer.
"""

from __future__ import annotations

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


def main(address: str, tenant: str, action: str, thread: str, *rest: str) -> None:
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
