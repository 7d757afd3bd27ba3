"""Engines: where the chunks of a call run.

An engine takes a :class:`~coremap._kernels._runner.Job` and a *task*, a
callable ``task(job, caller)`` that claims and runs chunks until none are left,
and runs the task on its workers. The job's atomic counter hands out the work,
so every engine shares the same scheduling.

* ``serial``: the calling thread alone;
* ``threads``: a persistent pool of threads, joined by the calling thread;
* ``processes``: a persistent pool of worker processes over shared memory
  (``_processes.py``; imported on first use);
* cluster clients: later engines register here, loaded lazily.
"""
from __future__ import annotations

from coremap.engines._serial import SerialEngine
from coremap.engines._threads import ThreadEngine, thread_engine

__all__ = ["SerialEngine", "ThreadEngine", "thread_engine", "get_engine"]

_serial = SerialEngine()


def get_engine(name: str):
    """The engine instance for a resolved engine name."""
    if name == "serial":
        return _serial
    if name == "threads":
        return thread_engine()
    if name == "processes":
        from coremap.engines._processes import process_engine

        return process_engine()
    raise KeyError(name)
