"""RunJson: a run's checkpoint state encoded piece by piece says what the whole encoding
says, through the changes an execution and the calls around it make
(docs/engine.md#checkpoints)."""

from __future__ import annotations

import json
import random

from engine_svc.run_json import RunJson
from engine_svc.run_state import RunState


def test_piece_by_piece_is_the_whole_state_through_an_execution() -> None:
    rng = random.Random(7)
    run = RunState("r", "wf", 1, {"x": 1, "name": "é"}, total=400)
    encoder = RunJson()
    values = [None, 1, 2.5, "text", [1, {"a": None}], {"nested": {"deep": [True, False]}}]

    def record(name: str, key: str, value: object) -> None:  # as the executor records them
        getattr(run, name)[key] = value
        encoder.put(name, key, value)

    for n in range(400):
        node = f"n{n}"
        choice = rng.random()
        if choice < 0.7:
            record("outputs", node, rng.choice(values))
            run.completed.append(node)
            record("durations", node, rng.random())
        elif choice < 0.8:
            run.skipped.append(node)
        elif choice < 0.85 and run.outputs:  # an output recorded again (a re-run)
            key = rng.choice(list(run.outputs))
            record("outputs", key, {"replaced": n})
            record("durations", key, float(n))
        elif choice < 0.88:  # changed from outside: replaced, cut (a continued thread)
            run.outputs = dict(list(run.outputs.items())[: len(run.outputs) // 2])
            run.completed = run.completed[: len(run.completed) // 2]
        elif choice < 0.9 and run.outputs:
            del run.outputs[next(iter(run.outputs))]  # (a patch) seen by the size
        elif choice < 0.92:
            run.outputs[f"resumed{n}"] = {"answer": n}  # (a resume) seen by the size
        run.step, run.eta_seconds, run.status = n, n / 7, rng.choice(["RUNNING", "PAUSED"])
        assert json.loads(encoder.encode(run.__dict__)) == json.loads(run.to_json()), n


def test_an_output_changed_in_place_keeps_its_recorded_encoding() -> None:
    """An output a later node changed in place stays as the node returned it, as its pending
    write has it; a value recorded anew is encoded anew."""
    run = RunState("r", "wf", 1, {})
    encoder = RunJson()
    encoder.encode(run.__dict__)
    run.outputs["a"] = {"n": 1}
    encoder.put("outputs", "a", run.outputs["a"])
    run.outputs["a"]["n"] = 2  # a later node mutated the state it was given
    assert json.loads(encoder.encode(run.__dict__))["outputs"]["a"] == {"n": 1}
    run.outputs["a"] = {"n": 3}
    encoder.put("outputs", "a", run.outputs["a"])
    assert json.loads(encoder.encode(run.__dict__))["outputs"]["a"] == {"n": 3}
