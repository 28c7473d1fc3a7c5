"""Workflow definitions: validation with field-level violations, levels, fingerprints,
and the safe expression language. Plain classes, no services."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from engine_svc import expressions
from engine_svc.definition import DefinitionInvalid, find_cycle, fingerprint, parse
from workflow_stubs.engine.v1 import engine_pb2 as pb


def definition(nodes: list[dict], **extra) -> pb.WorkflowDefinition:
    return json_format.ParseDict(
        {"workflow_id": "wf", "nodes": nodes, **extra}, pb.WorkflowDefinition()
    )


def violations(msg: pb.WorkflowDefinition) -> dict[str, str]:
    with pytest.raises(DefinitionInvalid) as err:
        parse(msg)
    return dict(err.value.violations)


def test_a_valid_dag_parses_into_levels() -> None:
    wf = parse(
        definition(
            [
                {"id": "fetch", "type": "http", "config": {"url": "https://example.test/data"}},
                {
                    "id": "check_a",
                    "type": "transform",
                    "depends_on": ["fetch"],
                    "config": {"expression": "len(fetch) > 0"},
                },
                {
                    "id": "check_b",
                    "type": "sleep",
                    "depends_on": ["fetch"],
                    "config": {"seconds": 1},
                },
                {
                    "id": "approve",
                    "type": "approval",
                    "depends_on": ["check_a", "check_b"],
                    "config": {"prompt": "Deploy?"},
                    "critical": True,
                },
                {
                    "id": "deploy",
                    "type": "python",
                    "depends_on": ["approve"],
                    "config": {"handler": "handlers.deploy:run"},
                    "when": "approve == true",
                    "retry": {"max_attempts": 3, "initial_backoff": "0.5s"},
                    "timeout": "30s",
                },
            ]
        )
    )
    assert wf.levels() == [["fetch"], ["check_a", "check_b"], ["approve"], ["deploy"]]
    deploy = wf.node("deploy")
    assert deploy.retry.max_attempts == 3 and deploy.retry.initial_backoff == 0.5
    assert deploy.timeout == 30.0 and wf.node("approve").critical
    assert pb.CHECKPOINT_TRIGGER_STEP_COMPLETED in wf.triggers


def test_every_problem_is_reported_with_its_field() -> None:
    found = violations(
        definition(
            [
                {"id": "a", "type": "noop", "depends_on": ["ghost"]},
                {"id": "a", "type": "noop"},
                {"id": "b", "type": "teleport"},
                {"id": "c", "type": "sleep", "config": {"seconds": -1}},
                {"id": "d", "type": "transform", "config": {"expression": "1 +"}},
                {"id": "e", "type": "http", "config": {"url": "ftp://x", "method": "BREW"}},
                {"id": "f", "type": "python", "config": {"handler": "no colon"}},
                {"id": "g", "type": "approval"},
                {"id": "h", "type": "noop", "when": "((", "retry": {"max_attempts": -1}},
                {"id": "bad id!", "type": "noop"},
            ],
            checkpoint={"triggers": ["CHECKPOINT_TRIGGER_TIME_BASED"]},
        )
    )
    assert found["nodes[0].depends_on[0]"] == "unknown node 'ghost'"
    assert found["nodes[1].id"] == "duplicate of nodes[0]"
    assert "unknown node type 'teleport'" in found["nodes[2].type"]
    assert "nodes[3].config.seconds" in found
    assert "does not parse" in found["nodes[4].config.expression"]
    assert "nodes[5].config.url" in found and "nodes[5].config.method" in found
    assert "nodes[6].config.handler" in found
    assert found["nodes[7].config.prompt"] == "required"
    assert "nodes[8].when" in found and "nodes[8].retry.max_attempts" in found
    assert "nodes[9].id" in found
    assert "checkpoint.interval" in found


def test_configs_are_checked_against_their_declared_models() -> None:
    """Issue 12: node configs validated by declared models (engine_svc/node_configs.py): a key
    a type does not take is refused (a typo is not a setting silently ignored), JSON types
    are strict, whole numbers must be whole."""
    found = violations(
        definition(
            [
                {"id": "a", "type": "sleep", "config": {"secconds": 1}},
                {"id": "b", "type": "sleep", "config": {"seconds": True}},
                {"id": "c", "type": "rollback", "config": {"workflow_id": "w", "version": 1.5}},
                {"id": "d", "type": "noop", "config": {"x": 1}},
                {"id": "e", "type": "http", "config": {"url": "https://x", "expect_status": [99]}},
                {"id": "f", "type": "approval", "config": {"prompt": 7}},
            ]
        )
    )
    assert found["nodes[0].config.seconds"] == "required"
    assert found["nodes[0].config.secconds"] == (
        "not a setting of sleep nodes (they take: seconds)"
    )
    assert found["nodes[1].config.seconds"] == "Input should be a valid number"
    assert found["nodes[2].config.version"] == "must be a whole number"
    assert "not a setting of noop nodes" in found["nodes[3].config.x"]
    assert "HTTP status" in found["nodes[4].config.expect_status"]
    assert found["nodes[5].config.prompt"] == "Input should be a valid string"


def test_cycles_are_named() -> None:
    found = violations(
        definition(
            [
                {"id": "a", "type": "noop", "depends_on": ["c"]},
                {"id": "b", "type": "noop", "depends_on": ["a"]},
                {"id": "c", "type": "noop", "depends_on": ["b"]},
                {"id": "d", "type": "noop"},
            ]
        )
    )
    assert found["nodes"].startswith("cycle: ")
    assert set(found["nodes"][7:].split(" -> ")) == {"a", "b", "c"}
    assert find_cycle({"x": (), "y": ("x",)}) is None
    assert violations(definition([{"id": "s", "type": "noop", "depends_on": ["s"]}])) == {
        "nodes[0].depends_on[0]": "a node cannot depend on itself"
    }


def test_a_wide_and_deep_dag_has_its_levels() -> None:
    nodes = []
    for level in range(25):
        for k in range(4):
            deps = [f"n{level - 1}_{j}" for j in range(4)] if level else []
            nodes.append({"id": f"n{level}_{k}", "type": "noop", "depends_on": deps})
    wf = parse(definition(nodes))
    assert len(wf.levels()) == 25 and all(len(lv) == 4 for lv in wf.levels())


def test_fingerprint_says_whether_a_definition_changed() -> None:
    a = definition([{"id": "x", "type": "noop"}])
    b = definition([{"id": "x", "type": "noop"}])
    c = definition([{"id": "x", "type": "sleep", "config": {"seconds": 1}}])
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_expressions_are_safe_and_useful() -> None:
    state = {"input": {"rows": [1, 2, 3]}, "fetch": {"status": 200}}
    assert expressions.evaluate("sum(input['rows']) * 2", state) == 12
    assert expressions.evaluate("fetch['status'] == 200 and len(input['rows']) > 2", state)
    assert expressions.evaluate("state['fetch']['status']", state) == 200
    for hostile in (
        "__import__('os').system('true')",
        "().__class__.__bases__",
        "open('/etc/passwd')",
        "input.__class__",
    ):
        with pytest.raises(expressions.ExpressionError):
            expressions.evaluate(hostile, state)
    with pytest.raises(expressions.ExpressionError):
        expressions.evaluate("missing + 1", state)
    assert expressions.check("a +") is not None and expressions.check("1 + 1") is None
