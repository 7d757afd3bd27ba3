"""Engines: where the chunks of a call run, found through one registry.

An in-process engine takes a :class:`~coremap._kernels._runner.Job` and a
*task*, a callable ``task(job, caller)`` that claims and runs chunks until none
are left, and runs the task on its workers::

    engine.run(job, task, workers, on_progress=None, timeout=None)

The job's atomic counter hands out the work, so every engine shares the same
scheduling, timing, cancelling and error reporting; the planner prepares the
operands, the job and the task (``_execute.py``) and the engine only decides
where the task runs.

* ``serial``: the calling thread alone;
* ``threads``: a persistent pool of threads, joined by the calling thread;
* ``processes``: a persistent pool of worker processes over shared memory
  (``_processes.py``; its operands are staged into shared memory first);
* cluster clients (ipyparallel, dask.distributed): adapters in ``_cluster.py``,
  chosen by the client's module.

Every engine is registered below by the module and attribute that build it, and
imported on first use, as Numba registers its targets (``DelayedRegistry``) and
joblib its external backends: ``import coremap`` loads none of the optional ones.
Adding an engine is one module and one line in ``ENGINES`` (the table is in
``_config.py``, at the bottom of the import graph, so that the configuration
checks can list the names) or one call to :func:`register`; the planner,
``backend=`` checks, error messages and ``coremap info`` read the names from it.
"""
from __future__ import annotations

import importlib
import threading

from coremap._config import ENGINES
from coremap.engines._serial import SerialEngine
from coremap.engines._threads import ThreadEngine, thread_engine

__all__ = ["ENGINES", "CLUSTER_ADAPTERS", "register", "unregister", "names", "get_engine",
           "adapter_for", "SerialEngine", "ThreadEngine", "thread_engine"]

# a cluster client's top-level module -> "module:attribute" of its adapter class.
CLUSTER_ADAPTERS: dict[str, str] = {
    "ipyparallel": "coremap.engines._cluster:_IPyParallel",
    "distributed": "coremap.engines._cluster:_Dask",
}
CLUSTER_INSTALL = 'pip install "coremap[cluster]"'

_lock = threading.Lock()
_instances: dict[str, object] = {}


def _load(target):
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register(name: str, factory) -> None:
    """Register an engine: ``factory`` (or ``"module:attribute"``) returns the instance.

    The factory runs on the first call that uses the engine; ``backend=name``
    then runs chunks on it.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"an engine needs a name other than 'auto', got {name!r}")
    with _lock:
        ENGINES[name] = factory
        _instances.pop(name, None)


def unregister(name: str) -> None:
    """Remove an engine added with :func:`register`."""
    with _lock:
        ENGINES.pop(name, None)
        _instances.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered engine names, in registration order."""
    return tuple(ENGINES)


def get_engine(name: str):
    """The engine instance for a registered name (imported and built on first use)."""
    engine = _instances.get(name)
    if engine is None:
        try:
            target = ENGINES[name]
        except KeyError:
            raise KeyError(f"no engine named {name!r}; registered: "
                           f"{', '.join(map(repr, names()))}") from None
        engine = _load(target)()
        with _lock:
            engine = _instances.setdefault(name, engine)
    return engine


def adapter_for(client):
    """The cluster adapter for a client object, or a TypeError that lists what is accepted."""
    top = (type(client).__module__ or "").split(".")[0]
    target = CLUSTER_ADAPTERS.get(top)
    if target is None:
        raise TypeError(
            f"backend must be 'auto', {', '.join(map(repr, names()))}, an ipyparallel "
            "Client, DirectView or LoadBalancedView, or a dask.distributed Client "
            f"(install them with {CLUSTER_INSTALL}); got "
            f"{type(client).__module__}.{type(client).__qualname__}"
        )
    return _load(target)(client)
