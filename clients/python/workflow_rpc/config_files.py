"""The operators' YAML files (token file, key ring) read as pydantic models, with errors in
one line naming the field (docs/security.md). Server side: pydantic comes with `serving`."""

from __future__ import annotations

from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["parse_yaml_file"]

M = TypeVar("M", bound=BaseModel)


def parse_yaml_file(raw: bytes, model: type[M], what: str) -> M:
    """A YAML file as `model`, or ValueError in one line: "not a WHAT: FIELD: why"."""
    try:
        loaded = yaml.safe_load(raw)
        if loaded is None:  # an empty file (one half-written, say)
            raise ValueError(f"not a {what}: it is empty")
        return model.model_validate(loaded)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ValueError(f"not a {what}: {where}: {first['msg']}{more}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not a {what}: {exc}".splitlines()[0]) from None
