"""Files read again when they change, without a restart: the token file, the JWT keys, the
TLS certificates (docs/security.md)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["ReloadedFiles"]

log = logging.getLogger("workflow_rpc.reloading")

T = TypeVar("T")


class ReloadedFiles(Generic[T]):
    """Files' parsed content, parsed again when one's size or mtime changes, looked at
    `every` seconds apart at most (a stat per call would be waste). A change that does not
    parse (OSError, ValueError) leaves the last good content in force, and says so in the log;
    a bad file at start is the caller's error. Safe from any thread (gRPC asks for TLS
    files from its own)."""

    def __init__(
        self, paths: Sequence[Path], parse: Callable[[list[bytes]], T], what: str, every: float
    ) -> None:
        self.paths, self.what, self.every = list(paths), what, every
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.value = parse(self._read())
        self._checked = time.monotonic()

    def _stamps(self) -> list[tuple[int, int]]:
        return [((st := os.stat(p)).st_mtime_ns, st.st_size) for p in self.paths]

    def _read(self) -> list[bytes]:
        return [p.read_bytes() for p in self.paths]

    def reload(self, *, now_if_changed: bool = False) -> bool:
        """Whether the content was parsed again just now, from changed files (looked at
        whenever asked with `now_if_changed`: a caller that met something the content lacks)."""
        every = 0.0 if now_if_changed else self.every
        if time.monotonic() - self._checked < every:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._checked < every:  # another thread looked meanwhile
                return False
            self._checked = now
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return False
                self.value, self._stamp = self._parse(self._read()), stamp
            except (OSError, ValueError) as exc:
                log.error(
                    f"{self.what} not reloaded: the last good ones stay in force",
                    extra={"paths": [str(p) for p in self.paths], "error": str(exc)},
                )
                return False
        log.info(f"{self.what} reloaded", extra={"paths": [str(p) for p in self.paths]})
        return True

    def current(self) -> T:
        self.reload()
        return self.value
