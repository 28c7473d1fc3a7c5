"""docker-compose.yml and the Dockerfile against the real services, without Docker.

The compose file's commands are parsed by the services' own argument parsers, with the compose
environment applied; the environment variables it sets must be ones the config modules read;
and each app service's health-check command is run against real processes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from checkpoint_svc import config as checkpoint_config
from engine_svc import config as engine_config
from tests.servers import REPO_ROOT, free_port
from workflow_rpc.settings import env_names

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

# compose service -> (module run by `python -m`, its config module)
APPS: dict[str, tuple[str, ModuleType]] = {
    "checkpoint": ("checkpoint_svc", checkpoint_config),
    "engine": ("engine_svc", engine_config),
}
_LOOPBACK = re.compile(r"127\.0\.0\.1:(\d+)")


@functools.cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded.get("services"), dict)
    return loaded


def svc(name: str) -> dict[str, Any]:
    assert name in compose()["services"], f"docker-compose.yml has no service {name!r}"
    return compose()["services"][name]


def environment(name: str) -> dict[str, str]:
    env = svc(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write `environment` as a mapping"
    return {k: str(v) for k, v in env.items()}


def env_names_read(module: ModuleType) -> frozenset[str]:
    """The environment variables a config module's settings declare."""
    return frozenset(env_names(module.Settings).values())


def settings_of(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings the service's command line and compose environment give, as the real
    parser makes them (with nothing from this machine's environment)."""
    module_name, config = APPS[name]
    for var in env_names_read(config):
        monkeypatch.delenv(var, raising=False)
    for var, value in environment(name).items():
        monkeypatch.setenv(var, value)
    args = svc(name)["command"][3:]
    try:
        return config.parse_settings(args)
    except SystemExit as exc:  # the parser refused a flag or a value
        pytest.fail(f"{name}: `python -m {module_name} {' '.join(args)}` is refused ({exc})")


def container_ports(name: str) -> set[int]:
    """Container-side ports of `ports:` entries such as "50051:50051" or "127.0.0.1:1:2"."""
    ports = set()
    for entry in svc(name).get("ports", []):
        ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def probe(name: str) -> list[str]:
    """The app service's health check as an argv (exec form, no shell)."""
    test = svc(name)["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", f"{name}: use the exec form"
    return [str(part) for part in test[1:]]


def probe_ports(name: str) -> list[int]:
    return [int(p) for part in probe(name) for p in _LOOPBACK.findall(part)]


# ---- the file's shape -------------------------------------------------------------------


def test_services_health_checks_and_start_order() -> None:
    assert set(compose()["services"]) == {"postgres", "redis", "checkpoint", "engine"}
    for name in compose()["services"]:
        check = svc(name).get("healthcheck", {})
        assert check.get("test"), f"{name} has no health check"
    assert "pg_isready" in probe("postgres")
    assert probe("redis") == ["redis-cli", "ping"]
    healthy = {"condition": "service_healthy"}
    assert svc("checkpoint")["depends_on"] == {"postgres": healthy, "redis": healthy}
    assert svc("engine")["depends_on"] == {"checkpoint": healthy}


@pytest.mark.parametrize("name", APPS)
def test_app_commands_run_the_real_entry_points(name: str) -> None:
    module_name, _ = APPS[name]
    command = svc(name)["command"]
    assert isinstance(command, list), f"{name}: write `command` in exec form"
    assert command[:3] == ["python", "-m", module_name]
    assert importlib.util.find_spec(f"{module_name}.__main__") is not None
    assert svc(name)["build"] in (".", {"context": "."}), "built from the repo's Dockerfile"


def test_dockerfile_installs_the_pinned_project() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"^RUN pip install \./clients/python \.(\s|$)", text, re.M)
    copies = dict(re.findall(r"^COPY (\S+) (\S+)\s*$", text, re.M))  # source -> destination
    for source in copies:
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which is gone"
    assert "pyproject.toml" in copies
    # Issue 12, defect 11: a command, a health check, and a build context without the venv.
    assert re.search(r'^CMD \["python", "-m", "checkpoint_svc"\]\s*$', text, re.M)
    assert re.search(r'^\s+CMD \["python", "-m", "workflow_rpc.probe"\]\s*$', text, re.M)
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "node_modules", "data", ".git"} <= ignored
    assert not ignored & {s.rstrip("/") for s in copies}, "the build context lacks a copy"
    for distribution in (Path("."), Path("clients/python")):  # the services, the client
        project = REPO_ROOT / distribution / "pyproject.toml"
        assert (distribution / "pyproject.toml").as_posix() in copies
        find = tomllib.loads(project.read_text())["tool"]["setuptools"]["packages"]["find"]
        wheres = find.get("where", ["."])
        for package in (p.rstrip("*") for p in find["include"]):
            found = [
                (distribution / w / package).as_posix()
                for w in wheres
                if (REPO_ROOT / distribution / w / package).is_dir()
            ]
            assert found, f"{project} includes {package}, found in none of {wheres}"
            path = found[0]
            assert copies.get(path, "").strip("/") in (path, f"./{path}"), (
                f"the image lacks {path} (COPY {path} ./{path})"
            )


# ---- the wiring, through the real parsers --------------------------------------------------


@pytest.mark.parametrize("name", APPS)
def test_compose_environment_is_read_by_the_config_module(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config = APPS[name]
    read = env_names_read(config)
    unknown = set(environment(name)) - read
    assert not unknown, f"{name}: {config.__name__} does not read {sorted(unknown)}"
    # And each value lands in a setting (a name that is read but ignored would not).
    values = {str(v) for v in settings_of(name, monkeypatch).model_dump().values()}
    for var, value in environment(name).items():
        assert value in values, f"{name}: {var}={value!r} does not reach the settings"


def test_checkpoint_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_of("checkpoint", monkeypatch)
    host, port = host_port(s.listen)
    assert host == "0.0.0.0"
    assert port in container_ports("checkpoint")
    assert probe_ports("checkpoint") == [port]

    pg = environment("postgres")
    db = make_url(s.db_url)
    assert db.drivername == "postgresql+asyncpg"
    assert (db.host, db.port or 5432) == ("postgres", 5432)
    assert (db.username, db.password, db.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert s.redis_url is not None
    redis = urlsplit(s.redis_url)
    assert (redis.scheme, redis.hostname, redis.port or 6379) == ("redis", "redis", 6379)
    assert not s.memory_answers_heads, "shared PostgreSQL + Redis: not a single writer"
    if s.metrics_port:
        assert s.metrics_port in container_ports("checkpoint")


def test_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint_port = host_port(settings_of("checkpoint", monkeypatch).listen)[1]
    s = settings_of("engine", monkeypatch)
    host, port = host_port(s.listen)
    assert host == "0.0.0.0"
    assert port in container_ports("engine")
    assert probe_ports("engine") == [port]
    assert s.checkpoint_addr == f"checkpoint:{checkpoint_port}"


# ---- the health checks, against real processes -------------------------------------------


def run_probe(name: str, port: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = probe(name)
    assert argv[0] == "python"
    (listen,) = set(probe_ports(name))
    argv = [
        sys.executable,
        *(a.replace(f"127.0.0.1:{listen}", f"127.0.0.1:{port}") for a in argv[1:]),
    ]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)


@SQLITE
def test_health_checks_pass_on_live_services_and_fail_on_a_closed_port(
    service, engine_factory, tmp_path: Path
) -> None:
    engine = engine_factory(service)
    for name, proc in (("checkpoint", service), ("engine", engine)):
        done = run_probe(name, proc.port, tmp_path)
        assert done.returncode == 0, f"{name} probe failed:\n{done.stderr}"
        closed = run_probe(name, free_port(), tmp_path)
        assert closed.returncode != 0, f"{name} probe passed on a closed port"
    # The image's own HEALTHCHECK: no address, the port of the service's listen variable.
    for variable, proc in (("CHECKPOINT_LISTEN", service), ("ENGINE_LISTEN", engine)):
        env = {**os.environ, variable: f"0.0.0.0:{proc.port}"}
        image_probe = subprocess.run(
            [sys.executable, "-m", "workflow_rpc.probe"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert image_probe.returncode == 0, f"{variable}: {image_probe.stderr}"
