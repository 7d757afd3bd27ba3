"""Engines: where the chunks of a call run, found through one registry.

Every engine has one method, given the same prepared call (``_base.py``)::

    out = engine.execute(call, hooks)

``call`` is a ``_plan.Call``: the frozen ``Plan``'s fields plus the function,
its inputs, ``out=``, ``timeout`` and ``retries``; ``hooks`` carries the
planner's callbacks (progress, run insights, a cluster's chunk function). The
engine returns the output array, or raises the call's first error.

* ``serial``: the calling thread alone;
* ``threads``: a persistent pool of threads, joined by the calling thread;
* ``processes``: a persistent pool of worker processes over shared memory
  (``_processes.py``: it stages the operands into shared memory and sends each
  worker one small message);
* cluster clients (ipyparallel, dask.distributed): adapters in ``_cluster.py``,
  chosen by the client's module.

How to add an engine. An engine that runs chunks in this process subclasses
:class:`InProcessEngine` and writes only ``run(job, task, workers,
on_progress, timeout)``: ``execute`` has already prepared the operands
(``_layout.prepare_operands``), the job (its atomic chunk counter hands out the
work, so scheduling, timing, cancelling and error reports are shared) and the
task, and ``run`` decides where ``task(job, caller)`` runs. Any other engine
subclasses :class:`Engine` and writes ``execute`` itself, as the process
engine does. Then register it: one line in ``ENGINES`` (the table is in
``_config.py``, at the bottom of the import graph, so that the configuration
checks can list the names) or one call to :func:`register`; the planner,
``backend=`` checks, error messages and ``coremap info`` read the names from
it. Engines are imported on first use, as Numba registers its targets
(``DelayedRegistry``) and joblib its external backends: ``import coremap``
loads none of the optional ones. An engine module imports only the engines
layer and below (``_layout``, ``_tasks``, ``_shm``, kernels), never the planner
or the front end; tests/test_house.py checks it.
"""
from __future__ import annotations

import importlib
import os
import threading

from coremap._config import ENGINES
from coremap.engines._base import Engine, Hooks, InProcessEngine
from coremap.engines._serial import SerialEngine
from coremap.engines._threads import ThreadEngine, thread_engine

__all__ = ["ENGINES", "CLUSTER_ADAPTERS", "register", "unregister", "names", "get_engine",
           "adapter_for", "Engine", "InProcessEngine", "Hooks", "SerialEngine",
           "ThreadEngine", "thread_engine"]

# a cluster client's top-level module -> "module:attribute" of its adapter class.
CLUSTER_ADAPTERS: dict[str, str] = {
    "ipyparallel": "coremap.engines._cluster:_IPyParallel",
    "distributed": "coremap.engines._cluster:_Dask",
}
CLUSTER_INSTALL = 'pip install "coremap[cluster]"'

_lock = threading.Lock()
_instances: dict[str, object] = {}


def _forget_after_fork() -> None:
    # A forked child has none of the parent's threads or worker pipes: its engines
    # are built afresh on first use (thread_engine and process_engine do the same).
    global _lock
    _instances.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _load(target):
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register(name: str, factory) -> None:
    """Register an engine: ``factory`` (or ``"module:attribute"``) returns the instance,
    an :class:`Engine` (usually an :class:`InProcessEngine` subclass).

    The factory runs on the first call that uses the engine; ``backend=name``
    then runs calls on it.
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
        if not callable(getattr(engine, "execute", None)):
            raise TypeError(
                f"engine {name!r} ({type(engine).__qualname__}) has no execute(call, hooks) "
                "method: subclass coremap.engines.InProcessEngine (which needs only run) "
                "or coremap.engines.Engine")
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
