"""Suite-wide guards: every test must leave no stray thread, process, segment or setting."""
from __future__ import annotations

import os
import threading

import pytest

try:
    import multiprocessing

    _children = multiprocessing.active_children
except ImportError:  # pragma: no cover
    _children = list


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("coremap_")}
    except FileNotFoundError:
        return set()


def _threads() -> set[str]:
    # coremap's own pool threads are persistent by design (one per worker, reused)
    return {
        t.name for t in threading.enumerate()
        if t.is_alive() and not t.name.startswith("coremap-thread-")
    }


@pytest.fixture(autouse=True)
def _no_leaks():
    env_before = {k: v for k, v in os.environ.items() if k.startswith("COREMAP_")}
    threads_before = _threads()
    shm_before = _shm_entries()
    yield
    env_after = {k: v for k, v in os.environ.items() if k.startswith("COREMAP_")}
    assert env_after == env_before, "a COREMAP_* variable leaked out of the test"
    # coremap's own worker processes are persistent by design (reused across calls)
    stray = [p for p in _children() if not p.name.startswith("coremap-worker-")]
    assert stray == [], f"child processes left running: {stray}"
    extra = _threads() - threads_before
    assert not extra, f"threads left running: {extra}"
    assert _shm_entries() - shm_before == set(), "a coremap_ shared-memory segment leaked"
    from coremap.engines import thread_engine

    assert thread_engine().size <= 64, "the thread pool grew without bound"
