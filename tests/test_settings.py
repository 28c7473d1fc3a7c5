"""Both services' settings: each declared once, reachable by flag and environment variable,
with help for every one and a one-line refusal of a bad value (issue 12, defect 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest

from checkpoint_svc import config as checkpoint_config
from engine_svc import config as engine_config
from tests.servers import REPO_ROOT
from workflow_rpc.settings import env_names, flag_of

CONFIGS = pytest.mark.parametrize(
    "config", [checkpoint_config, engine_config], ids=["checkpoint_svc", "engine_svc"]
)


def help_text(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return " ".join(done.stdout.split())  # argparse wraps lines


@CONFIGS
def test_every_setting_has_a_flag_an_environment_variable_and_help(config: ModuleType) -> None:
    text = help_text(config.__name__.split(".")[0])
    for name, field in config.Settings.model_fields.items():
        assert field.description, f"{name} has no help"
        assert flag_of(name) in text
        assert f"[env: {env_names(config.Settings)[name]}]" in text
    assert "(default: None)" not in text
    assert text.count("(default:") + text.count("(default factory:") == len(
        config.Settings.model_fields
    ), "one default per setting"


@CONFIGS
def test_a_flag_wins_over_its_environment_variable(
    config: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_names(config.Settings)
    monkeypatch.setenv(env["listen"], "127.0.0.1:1")
    assert config.parse_settings([]).listen == "127.0.0.1:1"
    assert config.parse_settings(["--listen", "127.0.0.1:2"]).listen == "127.0.0.1:2"
    monkeypatch.setenv(env["listen"], "")  # empty is unset, as a shell's `VAR=` means
    assert config.parse_settings([]).listen == config.Settings.model_fields["listen"].default


def test_checkpoint_settings_that_had_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    s = checkpoint_config.parse_settings(
        ["--batch-max", "8", "--queue-max", "100", "--shutdown-grace", "2.5"]
    )
    assert (s.batch_max, s.queue_max, s.shutdown_grace) == (8, 100, 2.5)
    monkeypatch.setenv("CHECKPOINT_BATCH_MAX", "9")
    assert checkpoint_config.parse_settings([]).batch_max == 9
    # the short flags the docs use
    s = checkpoint_config.parse_settings(["--db", "sqlite+aiosqlite:///x.db", "--redis", "none"])
    assert (s.db_url, s.redis_url) == ("sqlite+aiosqlite:///x.db", None)
    for given, heads in (("yes", True), ("no", False), ("auto", True)):
        assert (
            checkpoint_config.parse_settings(["--single-writer", given]).memory_answers_heads
            is heads
        )


def test_engine_list_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_HANDLERS", "a.b, c")
    monkeypatch.setenv("ENGINE_TENANTS", "t1,t2")
    s = engine_config.parse_settings(["--checkpoint", "store:1"])
    assert (s.handlers, s.tenants, s.checkpoint_addr) == (["a.b", "c"], ["t1", "t2"], "store:1")
    assert s.owner, "the lease owner defaults to host-pid"


@pytest.mark.parametrize(
    ("module", "argv", "env", "expected"),
    [
        (
            "engine_svc",
            ["--lease-ttl", "-1"],
            {},
            "python -m engine_svc: error: --lease-ttl (env ENGINE_LEASE_TTL): "
            "Input should be greater than 0, got '-1'",
        ),
        (
            "checkpoint_svc",
            [],
            {"CHECKPOINT_BATCH_MAX": "lots"},
            "python -m checkpoint_svc: error: --batch-max (env CHECKPOINT_BATCH_MAX): "
            "Input should be a valid integer, unable to parse string as an integer, got 'lots'",
        ),
    ],
)
def test_a_bad_value_is_one_line_not_a_traceback(
    module: str, argv: list[str], env: dict[str, str], expected: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert (done.returncode, done.stderr.strip()) == (2, expected)


def test_one_lease_default() -> None:
    """A lease the engine takes and one a client takes without a length last alike."""
    from checkpoint_svc.store import DEFAULT_LEASE_SECONDS

    assert engine_config.Settings.model_fields["lease_ttl"].default == DEFAULT_LEASE_SECONDS


@CONFIGS
def test_every_setting_is_in_the_operations_guide(config: ModuleType) -> None:
    guide = (REPO_ROOT / "docs" / "operations.md").read_text()
    env = env_names(config.Settings)
    for name in config.Settings.model_fields:
        assert f"| `{flag_of(name)}`" in guide and f"`{env[name]}`" in guide, name
