"""The one engine interface, and what every in-process engine shares.

Every engine, built-in or registered, is given the same prepared call and
returns the same way::

    _execute.execute(call, progress)
      │ picks the engine (the registry, or the call's cluster adapter), the progress bar
      └─ engine.execute(call, hooks) ──> the output array (or the call's first error)

        InProcessEngine.execute            serial, threads, a registered engine
          ├─ probe_call (a Python function's result dtype, its results kept)
          ├─ prepare_operands (_layout): target, Space, out
          ├─ new_job: the runner's Job (atomic chunk counter, chunk timing)
          ├─ task: native_task (a compiled kernel) or call_task (Python chunks),
          │        wrapped by hooks.observe (run insights)
          ├─ self.run(job, task, workers, on_progress, timeout)   <- what a subclass writes
          └─ raise_errors, or Operands.result(): out
        ProcessEngine.execute (_processes.py): operands staged into shared memory,
          one CallSpec per worker
        cluster adapters (_cluster.py): chunks through the cluster's scheduler, each
          running ``hooks.run_chunk`` there

``call`` is a ``_plan.Call`` (the frozen ``Plan``'s fields plus the function,
inputs, ``out``, ``timeout`` and ``retries``), read by attribute: the engines
layer never imports the planner. ``hooks`` carries the planner's callbacks the
same way (see ``Hooks``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from coremap import _layout
from coremap._kernels import _runner
from coremap._tasks import (
    Errors,
    Task,
    call_task,
    native_kernel,
    native_task,
    probe_call,
    raise_errors,
)
from coremap.engines._messages import JobParams

# ``call`` below is a ``_plan.Call``, read by attribute (this layer never imports the
# planner, so it is typed ``Any``); a task is ``task(job, caller)`` (_tasks.py).

# Chunk timing (see _kernels/_runner.pyx). A chunk aims at TARGET_CHUNK_NS, so
# Ctrl-C and cancels act within about that long (a responsiveness choice, well
# under the 1 s budget; chunk overhead is ~1 us, so it costs nothing measurable).
# Helpers are woken once the estimated remaining work exceeds ESCALATE_NS: about
# twice what waking a thread costs (35-60 us, docs/benchmarks.rst), so a call that
# would be over before a helper arrives stays in the caller (W5 at 10^3 elements:
# 2.1-4.9x NumPy's time, no thread woken; tests/test_engine.py checks the latter).
TARGET_CHUNK_NS = 20_000_000
ESCALATE_NS = 100_000
# How often (s) a caller computing a job looks at Ctrl-C, progress and the deadline
# between its pieces: a responsiveness choice, well under the 1 s budget.
POLL_S = 0.1
FIRST_CHUNK = 1_024
# A guided chunk is worth at least this much work once timed (see _runner.pyx):
# the most a worker can be left waiting at the end of a call. A Python chunk
# costs a few microseconds to hand out, a native one ~0.2 us, so native chunks
# shrink further: W1 into out= at 10^6 elements on 2 workers took 133 us with a
# 50 us floor and 128 us with 10 us (loops of calls, 2-core AMD EPYC VM).
FLOOR_CHUNK_NS = 50_000
FLOOR_NATIVE_NS = 10_000
# A plain Python function may take milliseconds per element: start smaller.
FIRST_CHUNK_PYTHON = 64

# Kinds whose kernel is native code the runner calls without the GIL.
NATIVE_KINDS = ("builtin", "numba")


def first_chunk(call: Any) -> int:
    """The first timed chunk's length."""
    return min(call.chunk, FIRST_CHUNK_PYTHON if call.kind == "python" else FIRST_CHUNK)


def job_params(call: Any) -> JobParams:
    """The settings of a call's job: timed chunks except for the static schedule.

    ``call`` needs ``size``, ``workers``, ``schedule``, ``chunk``, ``max_chunk`` and
    ``kind``. The one place these are decided, for this process and for workers.
    """
    timed = call.schedule != "static"
    return JobParams(call.size, call.workers, call.schedule, call.chunk, call.max_chunk,
                     TARGET_CHUNK_NS if timed else 0, first_chunk(call) if timed else 0,
                     _floor_ns(call) if timed else 0)


def new_job(call: Any) -> _runner.Job:
    """The runner's job for a call (``job_params``), run in this process."""
    return job_params(call).job(escalate_ns=ESCALATE_NS)


def _floor_ns(call: Any) -> int:
    return FLOOR_NATIVE_NS if call.kind in NATIVE_KINDS else FLOOR_CHUNK_NS


def _unobserved(task: Task, job: _runner.Job, kernel: object = None) -> Task:
    return task


class Hooks(NamedTuple):
    """What the planner hands every engine besides the call (an engine uses what it needs).

    Attributes
    ----------
    on_progress : callable or None
        ``on_progress(done)``: elements finished so far (the progress bar).
    observe : callable
        ``observe(task, job, kernel=None)``: the task to run, or a counting
        equivalent while run insights are recorded (``_insights.observed``).
    run_chunk : callable or None
        What a cluster engine runs on each chunk:
        ``run_chunk(func_bytes, key, kind, args, out_dtype)``.
    """

    on_progress: Callable[[int], None] | None = None
    observe: Callable[..., Any] = _unobserved
    run_chunk: Callable[..., Any] | None = None


NO_HOOKS = Hooks()


def no_elements(call: Any) -> np.ndarray:
    """The result of a call with no elements (its dtype probed here if needed)."""
    if call.out_dtype is None:
        probe_call(call)
    return _layout.allocate_output(call)[1]


class Engine:
    """The interface: ``execute(call, hooks) -> out``. Subclass ``InProcessEngine``
    for an engine that runs the call's chunks in this process."""

    name = "engine"

    def execute(self, call: Any, hooks: Hooks = NO_HOOKS) -> np.ndarray:
        """Run ``call`` and return its output array (or raise its first error)."""
        raise NotImplementedError


class InProcessEngine(Engine):
    """An engine whose workers share this process's memory: it only writes ``run``.

    ``execute`` prepares the operands, the job and the task; ``run(job, task,
    workers, on_progress, timeout)`` runs ``task(job, caller)`` until the job is
    finished: in the calling thread (``caller=True``) and, if it likes, on other
    threads (``caller=False``). The job's atomic counter hands out the chunks, so
    scheduling, timing, cancelling and error reports are the same on every engine.
    ``run`` sets ``job.event`` (a ``threading.Event`` the last thread to leave sets)
    and may set ``job.monitor`` (called by Python tasks in the caller between chunks).
    """

    # True when a Python chunk still running past ``timeout`` cannot be stopped and
    # may write after ``run`` has raised (helper threads): such calls then compute
    # into a private buffer, copied into ``out=`` only on success.
    python_chunks_outlive_timeout = False

    def run(self, job: _runner.Job, task: Task, workers: int,
            on_progress: Callable[[int], None] | None = None, *,
            timeout: float | None = None) -> None:
        """Run ``task`` until ``job`` is finished (see the class docstring); with
        ``timeout``, raise ``TimeoutError`` once the job is cancelled after it."""
        raise NotImplementedError

    def execute(self, call: Any, hooks: Hooks = NO_HOOKS) -> np.ndarray:
        """Run ``call`` here: operands, job and task prepared, then ``self.run``."""
        if not call.size:
            return no_elements(call)
        probed = probe_call(call) if call.out_dtype is None else None
        native = call.kind in NATIVE_KINDS
        private = (call.timeout is not None and not native
                   and self.python_chunks_outlive_timeout)
        ops = _layout.prepare_operands(call, private=private)
        space = ops.space
        errors = Errors()
        job = new_job(call)
        if native:
            address, meta = native_kernel(call, space), space.meta()
            job.set_kernel(address, space.base_ptrs, meta, space.views)
            task = hooks.observe(native_task(), job, (address, space.base_ptrs, meta))
        else:
            task = hooks.observe(call_task(call, space, errors, probed), job)
        self.run(job, task, call.workers, on_progress=hooks.on_progress,
                 timeout=call.timeout)
        raise_errors(call, errors, job, space, native)
        return ops.result()
