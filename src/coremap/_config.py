"""Defaults for ``parallel_map``: per-thread overrides, then environment, then built-ins.

This is the one place that reads ``COREMAP_*`` environment variables. They are
read lazily, when a call needs a default, so setting one after ``import
coremap`` still works.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import cast

SCHEDULES = ("guided", "dynamic", "static")

# The engine registry: name -> "module:attribute" of a zero-argument factory of the
# engine, imported on first use by ``coremap.engines.get_engine`` (as Numba's
# DelayedRegistry and joblib's EXTERNAL_BACKENDS load theirs). The table lives at
# the bottom of the import graph so that every layer can list the names; adding
# an engine is its module plus one line here (or ``coremap.engines.register``).
ENGINES: dict[str, object] = {
    "serial": "coremap.engines._serial:SerialEngine",
    "threads": "coremap.engines._threads:thread_engine",
    "processes": "coremap.engines._processes:process_engine",
}

# Element counts, chunk lengths and indices are int64 in the runner (_runner.pyx).
MAX_ELEMENTS = 2**63 - 1
# workers= above this many per usable core is refused: more threads or processes
# than that only add switching and memory, and a typo like workers=10**9 would
# otherwise start threads until the system refuses (issue: hardening, item 12).
# 32 per core leaves room for I/O-bound vectorized functions on threads.
WORKERS_PER_CORE_MAX = 32
# ... and never fewer than this many, whatever the affinity mask says.
WORKERS_MIN_LIMIT = 64

_local = threading.local()


def usable_cores() -> int:
    """Cores this process may run on (affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_positive_int(value: object, name: str = "workers", maximum: int | None = None) -> int:
    """Return ``value`` as a positive int (at most ``maximum``), or raise a message that
    says why not."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive int or None, got {type(value).__name__} {value!r}"
        )
    number = int(value)  # an Integral converts exactly (NumPy integers included)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")
    return number


def max_workers() -> int:
    """The largest ``workers=`` accepted (see ``WORKERS_PER_CORE_MAX``)."""
    return max(WORKERS_MIN_LIMIT, WORKERS_PER_CORE_MAX * usable_cores())


def check_workers(value: object, name: str = "workers") -> int:
    """``value`` as a number of workers: a positive int, at most ``max_workers()``."""
    workers = check_positive_int(value, name)
    limit = max_workers()
    if workers > limit:
        raise ValueError(
            f"{name}={workers:,} is more than {WORKERS_PER_CORE_MAX} per usable core "
            f"({usable_cores()} usable, so at most {limit}); pass a smaller number or None "
            "for one per core")
    return workers


def backends() -> tuple[str, ...]:
    """The backend names: ``"auto"`` and the registered engines (``ENGINES``)."""
    return ("auto", *ENGINES)


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "BACKENDS":  # read from the engine registry, so a new engine is listed
        return backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_backend(backend: object) -> object:
    """A backend name must be known; other objects (cluster clients) pass through."""
    if isinstance(backend, str) and backend not in backends():
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, backends()))} or a cluster "
            f"client, got {backend!r}"
        )
    return backend


def _stack() -> list[dict[str, object]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _from_env(key: str) -> object | None:
    raw = os.environ.get(f"COREMAP_{key.upper()}")
    if raw is None or raw == "":
        return None
    if key == "workers":
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(
                f"COREMAP_WORKERS must be a positive integer, got {raw!r}"
            ) from None
        return check_workers(value, "COREMAP_WORKERS")
    if key == "backend":
        if raw not in backends():
            raise ValueError(f"COREMAP_BACKEND must be one of {backends()}, got {raw!r}")
        return raw
    return raw


def get(key: str) -> object | None:
    """The current default for ``key``: innermost ``config()``, then env, then None."""
    for frame in reversed(_stack()):
        if key in frame:
            return frame[key]
    return _from_env(key)


# os.environ.get costs ~1.7 us for a missing key (a KeyError raised and caught
# inside Mapping.get); the fast path reads two variables per call, so it looks
# in the environment's underlying dict instead (CPython's os._Environ._data,
# bytes keys on POSIX), falling back to os.environ elsewhere.
_ENV_DATA = getattr(os.environ, "_data", None)
if not (isinstance(_ENV_DATA, dict) and os.name == "posix"):
    _ENV_DATA = None


def _raw_env_pair() -> tuple[object, object]:
    if _ENV_DATA is not None:
        return _ENV_DATA.get(b"COREMAP_WORKERS"), _ENV_DATA.get(b"COREMAP_BACKEND")
    return os.environ.get("COREMAP_WORKERS"), os.environ.get("COREMAP_BACKEND")


def defaults_key() -> tuple[object, ...]:
    """A cheap fingerprint of the current defaults (for caches of decisions)."""
    stack = getattr(_local, "stack", None)
    return (tuple(tuple(f.items()) for f in stack) if stack else None, *_raw_env_pair())


def in_worker() -> bool:
    """True inside a process-engine worker (set by the worker at start)."""
    return bool(os.environ.get("COREMAP_IN_WORKER"))


def cache_dir() -> str | None:
    """Where compiled kernels are cached on disk; None when ``COREMAP_CACHE_DIR=off``.

    ``COREMAP_CACHE_DIR`` moves it; otherwise the platform's user cache directory
    (as platformdirs chooses it, written out here rather than taken as a
    dependency for three lines): ``$XDG_CACHE_HOME/coremap`` or
    ``~/.cache/coremap`` on Linux and other POSIX systems,
    ``~/Library/Caches/coremap`` on macOS, ``%LOCALAPPDATA%\\coremap\\Cache`` on Windows.
    """
    raw = os.environ.get("COREMAP_CACHE_DIR")
    if raw:
        return None if raw.strip().lower() == "off" else os.path.abspath(os.path.expanduser(raw))
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
        return os.path.join(base, "coremap", "Cache")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/coremap")
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.expanduser("~/.cache")
    return os.path.join(base, "coremap")


def default_workers() -> int:
    value = get("workers")
    # config() and COREMAP_WORKERS both store check_workers' result, an int
    return usable_cores() if value is None else int(cast(int, value))


def default_backend() -> object:
    value = get("backend")
    return "auto" if value is None else value


@contextlib.contextmanager
def config(*, workers: int | None = None, backend: object = None) -> Iterator[None]:
    """Set defaults for ``parallel_map`` in this thread, for the ``with`` block.

    Parameters
    ----------
    workers : int, optional
        Default number of workers (the environment variable ``COREMAP_WORKERS``
        sets it for a whole process).
    backend : str or client, optional
        Default backend: ``"auto"``, ``"threads"``, ``"serial"`` or
        ``"processes"`` (``COREMAP_BACKEND``).

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> with cm.config(workers=2, backend="threads"):
    ...     y = cm.parallel_map(np.arange(4.0), np.sqrt)
    """
    frame: dict[str, object] = {}
    if workers is not None:
        frame["workers"] = check_workers(workers)
    if backend is not None:
        frame["backend"] = check_backend(backend)
    stack = _stack()
    stack.append(frame)
    try:
        yield
    finally:
        stack.pop()  # with-blocks nest, so this frame is the innermost
