"""The thread engine: native kernels on the native pool, Python chunks on Python threads.

    engine.execute(call) (_base.py) ──> ThreadEngine.run(job, task, workers=k)
      native task:  job.run_native(helpers=k-1)            (_runner.pyx, _pool.h)
                      caller computes; posts the job to k-1 native pool workers
                      once the work left is worth waking them; no GIL on any worker
                      unlink the job, wait until no worker is inside it
      Python task:  task(job, caller=True)                  (ufunc, vectorized, Python)
                      └─ job.on_escalate() ──> put (task, job) on k-1 worker queues
                    wait: job.finished (helpers finish their chunk)
    Python worker i: loop { (task, job) = queue.get(); task(job, caller=False) }

Why two pools. A native kernel needs no interpreter, so its helpers are POSIX
threads that park on a condition variable and are woken together by one
broadcast: nothing between ``parallel_map`` and the last chunk takes the GIL on
a worker. A Python chunk (a ufunc, a ``vectorized=True`` function) needs the GIL
for its Python part anyway; it runs on Python threads, which CPython creates,
tracks and stops at exit. A native thread taking the GIL per chunk would need a
thread state per chunk (``PyGILState_Ensure``), which is unsafe while the
interpreter finalizes, for no gain: the GIL hand-off, not the wake-up,
bounds a Python chunk's cost.

The caller always computes (also with ``progress`` or ``timeout``): it never
waits for a helper to *arrive*, only for helpers already inside the job to
finish their chunk. So a nested call (a ``vectorized=True`` function calling
``parallel_map`` from a pool thread), or a call while every worker is busy with
other callers, finishes in the calling thread alone: no deadlock, no spurious
``TimeoutError``. Progress and the deadline are checked by the caller between
its pieces (native) or chunks (Python), and while it waits for the helpers.

When the call returns or raises, nothing of it writes into the caller's arrays
any more: on Ctrl-C, an error or ``timeout`` the job is cancelled and the caller
waits until every thread inside has left (each stops within one piece of a
chunk, see ``_runner.pyx``). A Python function stuck inside a chunk cannot be
stopped; for Python tasks with ``timeout`` the caller therefore only watches
the deadline (it computes nothing itself) and the call computes into a private
buffer that is copied into ``out`` only on success (``python_chunks_outlive_timeout``,
see ``_base.py``).

Python workers are created on first use and live for the process (daemon
threads); native workers likewise (``_runner.pool_shutdown`` stops them). A
forked child starts with neither pool and builds fresh ones on first use.
A thread the system refuses (thread or memory limit) is registered nowhere:
the call runs with the workers already started (Python: after a
``RuntimeWarning``; a call with ``timeout`` that gets none raises at once),
the native pool likewise with the helpers it has (``cm_pool_ensure``).
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings

from coremap._kernels import _runner
from coremap.engines._base import POLL_S, InProcessEngine

_engine = None
_engine_lock = threading.Lock()
_local = threading.local()  # .in_pool: this thread is a Python pool worker


def thread_engine() -> ThreadEngine:
    """The process-wide thread engine, created on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = ThreadEngine()
    return _engine


def _forget_after_fork() -> None:
    # The child has none of the parent's threads: forget them (the native pool
    # resets itself, see _pool.h).
    global _engine, _engine_lock
    _engine = None
    _engine_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _worker_loop(q: queue.SimpleQueue) -> None:
    _local.in_pool = True
    while True:
        item = q.get()
        if item is None:
            return
        task, job = item
        try:
            task(job, False)
        except BaseException:  # a task records its own errors; never let the worker die
            job.cancel()
        finally:
            if job.finished and job.event is not None:
                job.event.set()
        del item, task, job


def _monitor(job, on_progress, deadline, timeout, poll):
    """The caller's periodic check: report progress, raise at the deadline; or None."""
    if on_progress is None and deadline is None:
        return None
    last = [0.0]

    def monitor():
        now = time.monotonic()
        if on_progress is not None and now - last[0] >= poll:
            last[0] = now
            on_progress(job.done)
        if deadline is not None and now >= deadline and not job.finished:
            raise TimeoutError(
                f"the call did not finish within {timeout} s "
                f"({job.done:,} of {job.n:,} elements done)"
            )

    return monitor


class ThreadEngine(InProcessEngine):
    """Native and Python worker threads that run chunk tasks; see the module docstring."""

    name = "threads"
    python_chunks_outlive_timeout = True  # a stuck Python chunk cannot be stopped

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []

    @property
    def size(self) -> int:
        """Worker threads started: Python pool threads plus native pool workers."""
        return len(self._threads) + _runner.pool_size()

    def _ensure(self, n: int) -> list[queue.SimpleQueue]:
        """The queues of ``n`` worker threads, started as needed; fewer (with a
        warning) if the system refuses a thread: the call runs with those there are."""
        with self._lock:
            while len(self._threads) < n:
                q: queue.SimpleQueue = queue.SimpleQueue()
                t = threading.Thread(
                    target=_worker_loop,
                    args=(q,),
                    name=f"coremap-thread-{len(self._threads)}",
                    daemon=True,
                )
                try:
                    t.start()
                except RuntimeError as exc:  # "can't start new thread" (thread/memory limit)
                    # a thread that did not start is registered nowhere; those
                    # started before it are complete and alive: keep them
                    warnings.warn(
                        f"coremap could not start a worker thread ({exc}); running with "
                        f"{len(self._threads)} of the {n} requested", RuntimeWarning,
                        stacklevel=2)
                    break
                self._queues.append(q)
                self._threads.append(t)
            return self._queues[:n]

    def run(self, job, task, workers: int, on_progress=None, poll: float = POLL_S,
            timeout: float | None = None) -> None:
        """Run ``task`` on ``workers`` threads (the caller is one of them).

        ``on_progress(done)`` is called about every ``poll`` seconds and at the
        end. With ``timeout``, ``TimeoutError`` is raised after the deadline,
        once the job is cancelled and (except for a Python task, see the module
        docstring) every thread has stopped writing.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job.event = threading.Event()
        job.monitor = _monitor(job, on_progress, deadline, timeout, poll)
        if getattr(task, "native", False):
            task(job, True, helpers=workers - 1, poll_ns=int(poll * 1e9))
        else:
            self._run_python(job, task, workers, deadline, poll)
        if on_progress is not None:
            on_progress(job.done)

    def _run_python(self, job, task, workers, deadline, poll) -> None:
        def post(count):
            queues = self._ensure(count)
            for q in queues:
                q.put((task, job))
            return len(queues)

        # A stuck Python chunk cannot be interrupted: with a deadline the caller
        # only watches (unless it is itself a pool worker: a nested call must not
        # wait for pool threads that may be busy with its parent).
        watch_only = deadline is not None and not getattr(_local, "in_pool", False)
        if watch_only and post(workers) == 0:
            # nobody would compute: say so now rather than at the deadline
            raise RuntimeError(
                "coremap could not start a worker thread to run this call with a "
                "timeout (the system's thread limit?); retry without timeout= to run "
                "it in the calling thread")
        elif workers > 1 and job.target_ns > 0:
            job.arm_escalation(lambda: post(workers - 1))
        elif workers > 1:  # untimed (static schedule): every worker from the start
            post(workers - 1)
        try:
            if not watch_only:
                task(job, True)
            while not job.finished:
                job.event.wait(poll)
                if job.monitor is not None:
                    job.monitor()
        except TimeoutError:
            job.cancel()
            if not watch_only:
                _drain(job, poll)
            raise
        except BaseException:
            # Ctrl-C or an error in the caller's own chunk: stop the others and
            # wait for their chunk in flight, so nothing writes after we raise.
            job.cancel()
            _drain(job, poll)
            raise

    def shutdown(self) -> None:
        """Stop the worker threads (they are re-created on the next call)."""
        with self._lock:
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join(timeout=5)
            self._queues.clear()
            self._threads.clear()
        _runner.pool_shutdown()


def _drain(job, poll: float) -> None:
    """Wait until no thread is inside the cancelled ``job`` (each leaves after its chunk)."""
    while job.active > 0:
        job.event.wait(poll)
