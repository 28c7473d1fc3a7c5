"""Each node type's config, declared as a model (docs/nodes.md): what keys it takes, their
types and bounds. A definition's configs are validated against them at registration, every
problem reported with its field path; a key a type does not take is refused, so a typo
(`secconds`) is an error, not a setting silently ignored.

Configs arrive as google.protobuf.Struct, whose numbers are all doubles: whole-number fields
are declared as floats that must be whole.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine_svc import expressions

__all__ = ["CONFIG_MODELS", "HTTP_METHODS", "config_problems"]

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _NodeConfig(BaseModel):
    """JSON's types as they are (strict: `true` is not 1, "1" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kind: ClassVar[str]


class NoopConfig(_NodeConfig):
    kind = "noop"


class SleepConfig(_NodeConfig):
    kind = "sleep"
    seconds: float = Field(ge=0)
    """How long the node sleeps."""


class TransformConfig(_NodeConfig):
    kind = "transform"
    expression: str
    """A safe expression over the run's state; its value is the node's output."""

    @field_validator("expression")
    @classmethod
    def _parses(cls, value: str) -> str:
        if problem := expressions.check(value):
            raise ValueError(problem)
        return value


class PythonConfig(_NodeConfig):
    kind = "python"
    handler: str
    """"module:function" of a module the engine's --handlers names."""

    @field_validator("handler")
    @classmethod
    def _module_and_function(cls, value: str) -> str:
        if not _HANDLER.match(value):
            raise ValueError('must be "module:function"')
        return value


class HttpConfig(_NodeConfig):
    kind = "http"
    url: str
    """http:// or https://, with ${expression} placeholders over the state."""
    method: str = "GET"
    """One of HTTP_METHODS, any case."""
    headers: dict[str, Any] = Field(default_factory=dict)
    """Values may hold placeholders."""
    body: Any = None
    """JSON, or a string; placeholders are rendered."""
    expect_status: Any = None
    """A status or a list of them; none: any 2xx."""
    timeout_seconds: float = Field(30.0, ge=0.001)
    """Per request."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("required: an http:// or https:// URL")
        if "${" in url:  # a template: its placeholders must be expressions; the rest is literal
            for placeholder in expressions.PLACEHOLDER.findall(url):
                if problem := expressions.check(placeholder):
                    raise ValueError(f"placeholder ${{{placeholder}}}: {problem}")
            if "${" in expressions.PLACEHOLDER.sub("", url):
                raise ValueError("an unclosed (or empty) ${ placeholder")
            return url
        try:
            parsed = urlparse(url)
            parsed.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if not parsed.netloc:
            raise ValueError("required: an http:// or https:// URL")
        return url

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method.upper() not in HTTP_METHODS:
            raise ValueError(f"one of {', '.join(sorted(HTTP_METHODS))}")
        return method

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, status: Any) -> Any:
        statuses = status if isinstance(status, list) else [] if status is None else [status]
        if any(
            isinstance(s, bool)
            or not isinstance(s, int | float)
            or not (100 <= s <= 599 and float(s).is_integer())
            for s in statuses
        ):
            raise ValueError("an HTTP status (100-599) or a list of them")
        return status


class ApprovalConfig(_NodeConfig):
    kind = "approval"
    prompt: str = Field(min_length=1)
    """Shown to whoever answers (Run.waiting_for), as written."""


class SubworkflowConfig(_NodeConfig):
    kind = "subworkflow"
    workflow_id: str = Field(min_length=1)
    """The workflow the child run runs."""
    version: float = Field(0, ge=0)
    """0: the active one."""
    input: Any = None
    """A template over the parent's state; none: the parent's whole state."""

    @field_validator("version")
    @classmethod
    def _whole(cls, value: float) -> float:
        return _whole(value)


class RollbackConfig(_NodeConfig):
    kind = "rollback"
    workflow_id: str = Field(min_length=1)
    """The workflow whose active version changes."""
    version: float = Field(ge=1)
    """The version made active."""
    reason: str = ""
    """Recorded in the version history."""

    @field_validator("version")
    @classmethod
    def _whole(cls, value: float) -> float:
        return _whole(value)


def _whole(value: float) -> float:
    if not float(value).is_integer():
        raise ValueError("must be a whole number")
    return value


CONFIG_MODELS: dict[str, type[_NodeConfig]] = {
    model.kind: model
    for model in (
        NoopConfig,
        SleepConfig,
        TransformConfig,
        PythonConfig,
        HttpConfig,
        ApprovalConfig,
        SubworkflowConfig,
        RollbackConfig,
    )
}


def config_problems(kind: str, config: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(field path, what is wrong) for each problem of a `kind` node's config."""
    model = CONFIG_MODELS[kind]
    try:
        model.model_validate(config)
    except ValidationError as exc:
        return [_violation(model, where, error) for error in exc.errors(include_url=False)]
    return []


def _violation(model: type[_NodeConfig], where: str, error: Any) -> tuple[str, str]:
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    kind = error["type"]
    if kind == "missing":
        return path, "required"
    if kind == "extra_forbidden":
        known = ", ".join(model.model_fields) or "none"
        return path, f"not a setting of {model.kind} nodes (they take: {known})"
    message = str(error["msg"]).removeprefix("Value error, ")
    return path, message
