"""Native malloc settings both services make: the arena cap first thing, before any thread
starts, and a trim now and then."""

from __future__ import annotations

import ctypes
import os

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_malloc() -> None:
    """Give freed heap pages back to the system (glibc keeps them after a burst of big
    messages): called now and then while the service runs."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before gRPC starts its threads. Each thread that frees a
    big message otherwise keeps its own arena's pages: fuzzed traffic grew RSS by ~65 MiB
    and back in waves, against ~10 MiB with two arenas (tests/test_fuzz.py). An operator's
    MALLOC_ARENA_MAX wins; other C libraries are left alone."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
