"""Run insights: what happened when a call ran (``explain(..., run=True)``).

    explain(x, f, run=True)
      ├─ a Recorder is installed for the calling thread; Numba's compile events
      │  (``numba.core.event``, "numba:compile") are recorded while the call runs
      ├─ parallel_map(x, f, **options), unchanged, except for one hook:
      │    engine.execute(): task = hooks.observe(task, job, kernel), i.e. observed
      │       every thread that runs the task (the caller, each helper that joins)
      │       records its chunks, elements and busy time
      │    process engine: bytes put into shared memory, copied back, and sent as
      │       messages (from the engine's ``segment_array`` and ``last_bytes_sent``)
      └─ Insights: the plan plus wall, planning, compile and run time, elements/s,
         per-worker figures and imbalance; printed like the plan, and plain data

The hook, for engine authors
----------------------------
``observed(task, job, kernel)`` is handed to every engine by ``_execute.execute``
(``Hooks.observe``) and called by the in-process ones (``InProcessEngine``:
serial, threads, a registered engine). It returns ``task`` itself unless a recorder is
active in the calling thread, so normal calls pay one thread-local lookup. When
recording, a *native* task (``kernel=(address, ptrs, meta)``) is run as a
Python claim loop around ``_runner.run_inline``: the same kernel, job and
schedule, chunks claimed with ``job.claim()``/``job.complete()``, the kernel
still without the GIL; each chunk then costs about a microsecond more, and the
loop can count chunks per worker, which the Cython runner does not. An engine
that counts for itself can instead give its figures to ``report_worker``.
The process engine's workers report nothing per worker yet: for processes the
insights give the totals and the bytes moved, and say so.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coremap._kernels import _runner

if TYPE_CHECKING:
    from coremap._plan import Plan

_local = threading.local()
# Recorders active in any thread. While one is, the fast path (which has no hook)
# is skipped in every thread: one module-global test per cached call, where the
# thread-local lookup would cost W5 another ~50 ns.
recording = 0
_recording_lock = threading.Lock()


@dataclass(frozen=True)
class WorkerStats:
    """What one worker did in a recorded run."""

    name: str  # thread name (the caller's is the calling thread's)
    chunks: int
    elements: int
    busy_s: float  # time spent computing chunks (claiming included)


class Recorder:
    """Figures gathered while one ``explain(..., run=True)`` call runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.workers: dict[str, list] = {}  # name -> [chunks, elements, busy_ns]
        self.calls = 0  # executions recorded (a container call may make several)
        self.bytes_shared = 0
        self.bytes_messages = 0
        self.processes = False

    def add(self, name: str, chunks: int, elements: int, busy_ns: int) -> None:
        with self._lock:
            row = self.workers.setdefault(name, [0, 0, 0])
            row[0] += chunks
            row[1] += elements
            row[2] += busy_ns


def active() -> Recorder | None:
    """The recorder of the calling thread, or None (normal calls)."""
    return getattr(_local, "recorder", None)


def report_worker(name: str, chunks: int, elements: int, busy_ns: int) -> None:
    """For engines that count for themselves: add one worker's figures to the run."""
    rec = active()
    if rec is not None:
        rec.add(name, chunks, elements, busy_ns)


# task(job, caller): how the thread and serial engines run a task
Task = Callable[[Any, Any], object]


def observed(task: Task, job: object,
             kernel: tuple[int, object, object] | None = None) -> Task:
    """``task``, or a counting equivalent while a recorder is active (see the docstring)."""
    rec = active()
    if rec is None:
        return task
    rec.calls += 1
    if kernel is None:
        return _counting(task, rec)
    return _native_counting(job, kernel, rec)


def _counting(task, rec):
    """A Python-chunk task: count its chunks by watching ``job.done`` around each claim."""

    def counted(job, caller):
        name = threading.current_thread().name
        counter = _ChunkCounter(job)
        t0 = time.perf_counter_ns()
        try:
            task(counter, caller)
        finally:
            rec.add(name, counter.chunks, counter.elements, time.perf_counter_ns() - t0)

    return counted


class _ChunkCounter:
    """A job seen through the methods ``python_task`` calls, counting completed chunks."""

    def __init__(self, job) -> None:
        self._job = job
        self.chunks = 0
        self.elements = 0

    def complete(self, lo, hi, ns=0):
        self.chunks += 1
        self.elements += hi - lo
        self._job.complete(lo, hi, ns)

    def __getattr__(self, name):  # enter, leave, claim, fail, ...: the job's own
        return getattr(self._job, name)


def _native_counting(job, kernel, rec):
    address, ptrs, meta = kernel

    def counted(job, caller):
        name = threading.current_thread().name
        chunks = elements = 0
        t0 = time.perf_counter_ns()
        if not job.enter():
            return
        try:
            while not job.cancelled and (claim := job.claim()) is not None:
                lo, hi = claim
                c0 = time.perf_counter_ns()
                if not _runner.run_inline(address, ptrs, meta, lo, hi):
                    job.fail(lo, hi)  # re-run element-wise by the engine's error path
                    break
                job.complete(lo, hi, time.perf_counter_ns() - c0)
                chunks += 1
                elements += hi - lo
        finally:
            job.leave()
            rec.add(name, chunks, elements, time.perf_counter_ns() - t0)

    return counted


# -- a recorded run ----------------------------------------------------------------------

@dataclass(frozen=True)
class Insights:
    """What one call did: its plan, and the figures of the run. ``print`` it.

    Attributes
    ----------
    plan : Plan
        The plan, as ``explain`` without ``run`` returns it.
    result : object
        What ``parallel_map`` returned.
    wall_s : float
        The whole call, planning included.
    plan_s : float
        Validation and planning (a first call's Numba compile of the function).
    compile_s : float
        Time Numba spent compiling during the call (part of ``wall_s``).
    run_s : float
        Execution: ``wall_s - plan_s``.
    elements_per_s : float
        Elements of the call per second of ``run_s``.
    workers : tuple of WorkerStats
        One row per worker that took part (threads and serial engines).
    imbalance : float or None
        Largest busy time over the mean busy time of those workers, minus 1
        (0: perfectly even).
    bytes_shared, bytes_copied_back, bytes_messages : int or None
        Process engine: bytes put into shared memory (inputs copied in and the
        output), copied from shared memory into the result, and pickled into
        messages to the workers. None on other engines.
    """

    plan: Plan
    result: object
    wall_s: float
    plan_s: float
    compile_s: float
    run_s: float
    elements: int
    workers: tuple[WorkerStats, ...] = field(default_factory=tuple)
    bytes_shared: int | None = None
    bytes_copied_back: int | None = None
    bytes_messages: int | None = None
    calls: int = 1

    @property
    def elements_per_s(self) -> float:
        return self.elements / self.run_s if self.run_s > 0 else float("inf")

    @property
    def imbalance(self) -> float | None:
        busy = [w.busy_s for w in self.workers if w.chunks]
        if len(busy) < 2 or sum(busy) == 0:
            return None
        return max(busy) / (sum(busy) / len(busy)) - 1.0

    def __str__(self) -> str:
        lines = [str(self.plan), "what happened"]
        lines.append(
            f"  wall     : {_ms(self.wall_s)} (planning {_ms(self.plan_s)}, "
            f"running {_ms(self.run_s)}); Numba compiled for {_ms(self.compile_s)} of it")
        lines.append(f"  speed    : {self.elements:,} elements, "
                     f"{self.elements_per_s:.3g} elements/s")
        if self.workers:
            busy = [w for w in self.workers if w.chunks]
            imb = self.imbalance
            lines.append(
                f"  workers  : {len(busy)} of {self.plan.workers} computed chunks"
                + (f", imbalance {imb:.0%} (max busy / mean busy - 1)" if imb is not None
                   else ""))
            width = max(len(w.name) for w in self.workers)
            lines += [f"    - {w.name:<{width}} : {w.chunks:,} chunks, {w.elements:,} "
                      f"elements, busy {_ms(w.busy_s)}" for w in self.workers]
        elif self.bytes_shared is not None:
            lines.append("  workers  : per-worker figures are not reported by the process "
                         "engine yet")
        if self.bytes_shared is not None:
            lines.append(f"  moved    : {_bytes(self.bytes_shared)} into shared memory, "
                         f"{_bytes(self.bytes_copied_back)} copied back, "
                         f"{_bytes(self.bytes_messages)} of messages")
        if self.calls > 1:
            lines.append(f"  calls    : {self.calls} executions (a container input)")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle) -> None:  # IPython
        p.text(str(self))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value: float = n
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{value} B"
        value /= 1000
    return f"{value} B"  # pragma: no cover


def _compile_seconds(buffer) -> float:
    """Total time covered by Numba's compile events (nested compiles counted once)."""
    depth = 0
    start = 0.0
    total = 0.0
    for ts, ev in sorted(buffer, key=lambda pair: pair[0]):
        if ev.is_start:
            if depth == 0:
                start = ts
            depth += 1
        elif ev.is_end and depth > 0:
            depth -= 1
            if depth == 0:
                total += ts - start
    return total


def run(plan_call: Callable[[], Any], run_call: Callable[[Any], object]) -> Insights:
    """Plan with ``plan_call()``, run with ``run_call(plan)`` under a recorder; the insights.

    While it runs, ``recording`` is non-zero, so every call takes the full path
    (the fast path has no hook).
    """
    global recording
    from numba.core import event

    rec = Recorder()
    previous = active()
    _local.recorder = rec
    undo = None
    with _recording_lock:
        recording += 1
    try:
        with event.install_recorder("numba:compile") as numba_events:
            t0 = time.perf_counter()
            plan = plan_call()
            t1 = time.perf_counter()
            if plan.engine == "processes":
                undo = _watch_processes(rec)
            result = run_call(plan)
            t2 = time.perf_counter()
    finally:
        _local.recorder = previous
        with _recording_lock:
            recording -= 1
        if undo is not None:
            undo()
    workers = tuple(WorkerStats(name, c, e, ns / 1e9) for name, (c, e, ns) in
                    rec.workers.items())
    copied_back = None
    if undo is not None:
        # a SharedArray out= (it has a segment) is written in place: nothing copied
        # back. Asked by attribute, so this layer does not import the front end.
        out = getattr(plan, "out", None)
        in_place = getattr(out, "_segment", None) is not None
        copied_back = 0 if in_place else _nbytes(result)
    return Insights(
        plan=getattr(plan, "plan", plan),  # a _plan.Call carries the frozen plan
        result=result, wall_s=t2 - t0, plan_s=t1 - t0,
        compile_s=_compile_seconds(numba_events.buffer), run_s=t2 - t1,
        elements=_size(result, plan), workers=workers,
        bytes_shared=rec.bytes_shared if undo is not None else None,
        bytes_copied_back=copied_back,
        bytes_messages=rec.bytes_messages if undo is not None else None,
        calls=max(rec.calls, 1),
    )


def _size(result, plan) -> int:
    size = getattr(result, "size", None)
    return int(size) if isinstance(size, int) else plan.size


def _nbytes(result) -> int:
    import numpy as np

    return int(np.asarray(result).nbytes) if not isinstance(result, tuple) else sum(
        int(np.asarray(r).nbytes) for r in result)


def _watch_processes(rec):
    """Count the bytes the process engine puts into shared memory during the run."""
    from coremap.engines._processes import process_engine

    engine = process_engine()
    original = engine.segment_array
    rec.bytes_messages = 0

    def counting(shape, dtype, order="C"):
        arr, seg = original(shape, dtype, order=order)
        rec.bytes_shared += arr.nbytes
        return arr, seg

    engine.segment_array = counting  # an instance attribute: shadows the method
    sent = [0]
    run = engine.run

    def counting_run(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        finally:
            sent[0] += getattr(engine, "last_bytes_sent", 0)

    engine.run = counting_run

    def undo():
        del engine.segment_array, engine.run
        rec.bytes_messages = sent[0]

    return undo
