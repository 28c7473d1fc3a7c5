"""A service's settings from its command line and environment (docs/operations.md#settings).

Each service declares its settings once, as a pydantic-settings class: the field's name gives
the flag (`--lease-ttl`) and the environment variable (`ENGINE_LEASE_TTL`), its annotation and
constraints the type check, its description the help text. A bad value ends the process with
one line per bad setting, not a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    SettingsConfigDict,
    SettingsError,
)

__all__ = ["LogLevel", "ServiceSettings", "env_names", "flag_of", "parse_settings"]


def _log_level(value: object) -> object:
    if isinstance(value, str):
        value = value.strip().upper()
        return "WARNING" if value == "WARN" else value
    return value


# The lowest level a service logs, in any case (WARN for WARNING, as logging takes it).
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_log_level)
]


class ServiceSettings(BaseSettings):
    """What every service's settings share: how flags and variables are read (kebab-case
    flags, plain values, an empty variable as unset, `none` for no value), the log level, the
    metrics port and who may call (docs/security.md). A service adds its env_prefix,
    cli_prog_name and its own settings."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_avoid_json=True,
        cli_parse_none_str="none",
        env_ignore_empty=True,
        validate_default=False,
    )

    log_level: LogLevel = Field("INFO", description="the lowest level logged")
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="serve Prometheus metrics on this port, on the --listen host (0 = off)",
    )
    auth_token_file: Path | None = Field(
        None,
        description="YAML file of hashed bearer tokens, each with its subject, tenant and roles "
        "(read again when it changes)",
    )
    auth_jwt_secret_file: Path | None = Field(
        None, description="file holding the HS256 secret that signs accepted JWTs"
    )
    auth_jwks_file: Path | None = Field(
        None, description="JWKS file of the public keys that sign accepted JWTs"
    )
    auth_jwt_audience: str = Field(
        "durable-workflows", min_length=1, description="the aud claim accepted JWTs carry"
    )
    insecure: CliImplicitFlag[bool] = Field(
        False,
        description="serve a non-loopback address with no credentials checked (anyone who "
        "reaches the port may do anything)",
    )

    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) to serve TLS with (read again when it changes)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA that signs client certificates: every client must show one (mTLS); "
        "the token file may map a certificate's name to an identity",
    )

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return self

    @property
    def auth_configured(self) -> bool:
        """Whether calls must carry a credential (a token, or a client certificate)."""
        return bool(
            self.auth_token_file
            or self.auth_jwt_secret_file
            or self.auth_jwks_file
            or self.tls_client_ca_file
        )


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def flag_of(field: str) -> str:
    """The command-line flag of a settings field."""
    return "--" + field.replace("_", "-")


def env_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Each field's environment variable, by field name."""
    prefix = cls.model_config.get("env_prefix", "")
    return {name: (prefix + name).upper() for name in cls.model_fields}


def parse_settings(cls: type[SettingsT], argv: list[str] | None = None) -> SettingsT:
    """The settings `argv` (default: this process's arguments) and the environment give;
    flags win over environment variables, which win over the declared defaults."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return CliApp.run(cls, cli_args=args, cli_show_env_vars=True)
    except ValidationError as exc:
        env = env_names(cls)
        problems: dict[str, list[str]] = {}
        given: dict[str, object] = {}
        for error in exc.errors(include_url=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            problems.setdefault(field, []).append(error["msg"])
            given.setdefault(field, error["input"])
        _refuse(
            cls,
            [
                f"{flag_of(field)} (env {env[field]}): {' or '.join(messages)}, "
                f"got {given[field]!r}"
                if field in env
                else " or ".join(m.removeprefix("Value error, ") for m in messages)
                for field, messages in problems.items()
            ],
        )
    except SettingsError as exc:  # an environment variable that does not parse at all
        _refuse(cls, [str(exc)])


def _refuse(cls: type[BaseSettings], lines: list[str]) -> NoReturn:
    prog = cls.model_config.get("cli_prog_name") or "settings"
    for line in lines:
        print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(2)
