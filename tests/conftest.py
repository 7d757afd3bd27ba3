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
    # Only this test process's segments (the creator pid is in the name): another
    # coremap process running beside the suite must not make a test fail.
    mine = f"coremap_{os.getpid()}_"
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(mine)}
    except FileNotFoundError:
        return set()


# Persistent pools by design: coremap's thread engine (one thread per worker,
# reused), and dask's offload pool, which dask starts lazily and keeps.
PERSISTENT_THREADS = ("coremap-thread-", "Dask-Offload")


def _threads() -> set[str]:
    return {
        t.name for t in threading.enumerate()
        if t.is_alive() and not t.name.startswith(PERSISTENT_THREADS)
    }


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_in_tmp(tmp_path_factory):
    """Compiled kernels are cached in a temporary directory, never in the user's."""
    before = os.environ.get("COREMAP_CACHE_DIR")
    os.environ["COREMAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield
    if before is None:
        del os.environ["COREMAP_CACHE_DIR"]
    else:
        os.environ["COREMAP_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _no_leaks():
    env_before = {k: v for k, v in os.environ.items() if k.startswith("COREMAP_")}
    threads_before = _threads()
    shm_before = _shm_entries()
    children_before = set(_children())
    yield
    env_after = {k: v for k, v in os.environ.items() if k.startswith("COREMAP_")}
    assert env_after == env_before, "a COREMAP_* variable leaked out of the test"
    # children that existed before the test (a module's cluster) are not its doing
    # (a dask nanny restarting a worker the test killed is the cluster's doing too)
    stray = [p for p in _children() if p not in children_before
             and not p.name.startswith("Dask Worker process")]
    assert stray == [], f"child processes left running: {stray}"
    extra = _threads() - threads_before
    assert not extra, f"threads left running: {extra}"
    assert _shm_entries() - shm_before == set(), "a coremap_ shared-memory segment leaked"
    from coremap.engines import thread_engine

    assert thread_engine().size <= 64, "the thread pool grew without bound"
