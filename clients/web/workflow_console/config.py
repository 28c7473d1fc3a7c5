"""The console's settings, each declared once: flag, environment variable, type and help
(docs/console.md#settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, CliImplicitFlag, SettingsConfigDict

from workflow_rpc.settings import LogLevel
from workflow_rpc.settings import parse_settings as parse_service_settings

__all__ = ["Settings", "parse_settings"]


class Settings(BaseSettings):
    """Web console: runs and workflows of the engine, live, in a browser."""

    model_config = SettingsConfigDict(
        env_prefix="CONSOLE_",
        cli_prog_name="python -m workflow_console",
        cli_kebab_case=True,
        cli_avoid_json=True,
        cli_parse_none_str="none",
        env_ignore_empty=True,
    )

    engine: str = Field("127.0.0.1:50052", min_length=1, description="the engine's host:port")
    listen: str = Field("127.0.0.1:8080", description="host:port to serve the console on")
    tenant: str | None = Field(
        None,
        description="the tenant to show a caller who has not signed in (no token: an engine "
        "that checks none); default: the engine's default tenant",
    )
    engine_ca_file: Path | None = Field(
        None, description="PEM CA of the engine's TLS certificate (TLS to the engine)"
    )
    engine_cert_file: Path | None = Field(
        None, description="PEM client certificate for an engine that asks for one (mTLS)"
    )
    engine_key_file: Path | None = Field(None, description="PEM key of --engine-cert-file")
    secure_cookies: CliImplicitFlag[bool] = Field(
        False,
        description="mark the sign-in cookie Secure (behind an HTTPS proxy: the browser sends "
        "it over HTTPS only)",
    )
    runs_refresh: float = Field(
        1.0, gt=0, description="seconds between looks at the runs list for a page showing it"
    )
    log_level: LogLevel = Field("INFO", description="the lowest level logged")


def parse_settings(argv: list[str] | None = None) -> Settings:
    return parse_service_settings(Settings, argv)
