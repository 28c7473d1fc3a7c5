"""The Python client is a slim distribution of its own (issue 12): built from clients/python,
typed, and installing it resolves no database, Redis or service package."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.servers import REPO_ROOT

CLIENT = REPO_ROOT / "clients" / "python"
HEAVY = {"sqlalchemy", "asyncpg", "redis", "hiredis", "aiosqlite", "durable-workflows"}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy: setuptools builds in the source tree (build/, *.egg-info), not in the repo's.
    source = shutil.copytree(
        CLIENT, out / "source", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("workflow_client-*.whl")
    return wheel


def test_the_client_wheel_holds_the_client_typed_and_no_service(client_wheel: Path) -> None:
    names = zipfile.ZipFile(client_wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"workflow_client", "workflow_rpc", "workflow_stubs"}
    for package in tops:
        assert f"{package}/py.typed" in names
    for module in ("engine/v1/engine_pb2", "checkpoint/v1/checkpoint_pb2"):
        assert f"workflow_stubs/{module}.pyi" in names
        assert f"workflow_stubs/{module}_grpc.pyi" in names, "typed stub calls"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "wf = workflow_client.cli:main" in zipfile.ZipFile(client_wheel).read(entry_points).decode()
    )


def test_installing_the_client_pulls_no_database_redis_or_service(
    client_wheel: Path, tmp_path: Path
) -> None:
    """What pip would install for `pip install workflow-client`, resolved for real."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--ignore-installed",
         "--report", str(report), str(client_wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    pulled = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"grpcio", "protobuf", "workflow-client"} <= pulled
    assert not pulled & (HEAVY | {"pydantic", "pydantic-settings", "langgraph-checkpoint"})


def test_the_services_depend_on_the_client_not_the_reverse() -> None:
    services = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("workflow-client[serving]==") for d in services["dependencies"])
    assert "wf" in client["scripts"] and "scripts" not in services
    extras = client["optional-dependencies"].values()
    wanted = [*client["dependencies"], *(d for extra in extras for d in extra)]
    assert not {d.split("=")[0].split("[")[0].lower() for d in wanted} & HEAVY


def test_the_client_loads_no_service_code() -> None:
    """Importing every client module (the saver too) loads none of the services' packages."""
    probe = (
        "import sys, workflow_client, workflow_client.cli, workflow_client.aio, "
        "workflow_client.saver, workflow_client.store_session, workflow_rpc.probe; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    loaded = set(ast.literal_eval(done.stdout))
    assert not loaded & {"sqlalchemy", "asyncpg", "redis", "checkpoint_svc", "engine_svc"}
