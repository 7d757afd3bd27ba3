"""The thread engine: a persistent pool of worker threads.

    parallel_map ──> ThreadEngine.run(job, task, workers=k)
                        │ task(job, caller=True)        the caller starts alone
                        │   └─ job.on_escalate() ──> put (task, job) on k-1 worker queues
                        │ wait: job.finished or Ctrl-C
    worker i: loop { (task, job) = queue.get(); task(job, caller=False) }

Workers are created on first use and live for the process (daemon threads, so
they never block interpreter exit). The caller starts on the job alone and
times its chunks; helpers are posted only once the job estimates that the work
left is worth it (``Job.escalate_ns``). So a small call wakes no thread at all,
and a big one has its helpers within one small first chunk. Nobody waits for a
helper to wake: chunks are claimed from the job's atomic counter, and a helper
that arrives late finds no work and goes back to its queue.

Threads only help when the task releases the GIL: compiled kernels run in
Cython without it, and NumPy releases it inside ufunc loops.
"""
from __future__ import annotations

import queue
import threading
import time

_engine = None
_engine_lock = threading.Lock()


def thread_engine() -> ThreadEngine:
    """The process-wide thread engine, created on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = ThreadEngine()
    return _engine


def _ignore(done: int) -> None:
    pass


def _worker_loop(q: queue.SimpleQueue) -> None:
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


class ThreadEngine:
    """A pool of threads that run chunk tasks; see the module docstring."""

    name = "threads"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []

    @property
    def size(self) -> int:
        return len(self._threads)

    def _ensure(self, n: int) -> list[queue.SimpleQueue]:
        with self._lock:
            while len(self._threads) < n:
                q: queue.SimpleQueue = queue.SimpleQueue()
                t = threading.Thread(
                    target=_worker_loop,
                    args=(q,),
                    name=f"coremap-thread-{len(self._threads)}",
                    daemon=True,
                )
                t.start()
                self._queues.append(q)
                self._threads.append(t)
            return self._queues[:n]

    def run(self, job, task, workers: int, on_progress=None, poll: float = 0.1,
            timeout: float | None = None) -> None:
        """Run ``task`` on ``workers`` threads (the caller is one of them).

        With ``on_progress``, the caller does not compute: it reports
        ``job.done`` every ``poll`` seconds until the job is finished. With
        ``timeout``, the caller does not compute either, and raises
        ``TimeoutError`` at the deadline after cancelling the job (threads cannot
        be killed: a chunk in flight finishes in the background).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is not None and on_progress is None:
            on_progress = _ignore
        job.event = threading.Event()

        def post(count):
            for q in self._ensure(count):
                q.put((task, job))

        if on_progress is not None:
            post(workers)
        elif workers > 1 and job.target_ns > 0:
            job.arm_escalation(lambda: post(workers - 1))
        elif workers > 1:  # untimed (static schedule): every worker from the start
            post(workers - 1)
        try:
            if on_progress is None:
                task(job, True)
            while not job.finished:
                wait = poll if deadline is None else min(poll, deadline - time.monotonic())
                job.event.wait(max(wait, 0.0))
                if on_progress is not None:
                    on_progress(job.done)
                if deadline is not None and time.monotonic() >= deadline and not job.finished:
                    raise TimeoutError(
                        f"the call did not finish within {timeout} s "
                        f"({job.done:,} of {job.n:,} elements done)"
                    )
        except BaseException:
            # Ctrl-C or an error in the caller's own chunk: stop the others.
            # Workers finish at most the chunk they hold; the job keeps every
            # buffer alive until then, so nothing is freed under them.
            job.cancel()
            raise
        if on_progress is not None:
            on_progress(job.done)

    def shutdown(self) -> None:
        """Stop the worker threads (they are re-created on the next call)."""
        with self._lock:
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join(timeout=5)
            self._queues.clear()
            self._threads.clear()
