"""What runs on a chunk: the tasks that engines execute, in threads or in worker processes.

A *task* is ``task(job, caller)``: it claims chunks from the job until none are
left. ``native_task`` runs a compiled kernel inside the Cython runner (no GIL);
``python_task`` runs a Python chunk function (ufunc, vectorized, plain Python)
and times each chunk, which sizes the next ones. Both are used by the thread
engine in this process and by the process engine's workers, so every engine
schedules, times and reports failures the same way.

A Python function whose result dtype only its results tell is *probed* first
(``probe_call``, or in a worker for the process engine) on the first ``PROBE``
elements; ``call_task`` keeps those results, so each element runs exactly once::

    probe_call(call) ──> (values, ns), call.out_dtype learnt
    call_task(call, space, errors, probed) ──> task: the kept values are copied
        (store_kept) into the first chunks, the rest computed by chunk_function
    raise_errors(call, errors, job, space, native): the first failure, or nothing
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import numpy as np

from coremap._errors import note_raised_by
from coremap._kernels._runner import Job
from coremap._layout import Space

# ``call`` and ``plan`` below are a ``_plan.Call`` (read by attribute: this layer never
# imports the planner). A task is ``task(job, caller)``; a chunk function ``chunk(lo, hi)``.
Task = Callable[..., None]
Chunk = Callable[[int, int], None]


class _NativeTask:
    """The task that runs a native kernel: claim chunks in Cython, no GIL.

    ``native`` tells the thread engine to give it native pool helpers rather
    than Python threads.
    """

    native = True
    __slots__ = ("main",)

    def __init__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()

    def __call__(self, job: Job, caller: bool, helpers: int = 0,
                 poll_ns: int = 100_000_000) -> None:
        # only the main thread can take Ctrl-C between pieces
        job.run_native(check_signals=caller and self.main, helpers=helpers, poll_ns=poll_ns)


def native_task() -> _NativeTask:
    """The task that runs a native kernel (see ``_NativeTask``)."""
    return _NativeTask()


def python_task(chunk: Chunk, errors: Errors) -> Task:
    """The task that runs a Python chunk function ``chunk(lo, hi)``, timing each chunk.

    In the caller, ``job.monitor`` (progress, deadline) runs after each chunk.
    """

    def task(job: Job, caller: bool) -> None:
        if not job.enter():
            return
        monitor = job.monitor if caller else None
        try:
            while (claim := job.claim()) is not None:
                lo, hi = claim
                t0 = perf_counter_ns()
                try:
                    chunk(lo, hi)
                except BaseException as exc:
                    errors.record(exc, lo, hi)
                    job.fail(lo, hi)
                    if caller and isinstance(exc, KeyboardInterrupt):
                        raise
                    return
                job.complete(lo, hi, perf_counter_ns() - t0)
                if monitor is not None:
                    monitor()
        finally:
            job.leave()

    return task


def index(plan: Any, i: int) -> tuple[int, ...]:
    if not plan.shape:
        return ()
    return tuple(int(v) for v in np.unravel_index(i, plan.shape, order=plan.order))


class Errors:
    """The first exception of a call, with the chunk it came from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: tuple[BaseException, int, int] | None = None

    def record(self, exc: BaseException, lo: int, hi: int) -> None:
        with self._lock:
            if self.first is None:
                self.first = (exc, lo, hi)


def native_kernel(plan: Any, space: Space) -> int:
    if plan.kind == "builtin":
        return plan.func.address(plan.out_dtype)
    from coremap._kernels import _numba

    scalars = [i.is_scalar for i in plan.inputs]
    return _numba.kernel_address(
        plan.func, plan.in_dtypes, space.views[-1].dtype, space.classes(scalars)
    )


def raise_native_failure(plan: Any, space: Space, lo: int, hi: int) -> None:
    from coremap._kernels import _numba

    grids = [space.grid(k) for k in range(len(plan.inputs))]
    getters = [
        (lambda i, g=g: g[divmod(i, space.cols)]) for g in grids
    ]
    found = _numba.first_failure(plan.func, plan.in_dtypes, getters, lo, hi)
    if found is None:
        raise RuntimeError(
            f"{plan.func_name} failed in elements {lo}..{hi - 1} but did not fail again when "
            "re-run one element at a time (is it non-deterministic?)"
        )
    i, exc = found
    note_raised_by(exc, plan.func_name, f"at element index {index(plan, i)}")
    raise exc


def chunk_function(plan: Any, space: Space, errors: Errors) -> Chunk:
    """The Python-level chunk function for ufunc, vectorized and python kinds."""
    nin = len(plan.inputs)
    grids = [None if inp.is_scalar else space.grid(k) for k, inp in enumerate(plan.inputs)]
    out_grid = space.grid(nin)
    func = plan.func
    scalars = [inp.value for inp in plan.inputs]

    if plan.kind == "ufunc":

        def run_ufunc(lo: int, hi: int) -> None:
            for r0, r1, c0, c1 in space.segments(lo, hi):
                args = [s if g is None else g[r0:r1, c0:c1] for g, s in zip(grids, scalars)]
                func(*args, out=out_grid[r0:r1, c0:c1], casting="same_kind")

        return run_ufunc

    def store(res, r0, r1, c0, c1, lo):
        target = out_grid[r0:r1, c0:c1]
        res = np.asarray(res)
        if res.shape != (target.size,):
            raise ValueError(
                f"{plan.func_name} returned shape {res.shape} for a chunk of "
                f"{target.size} elements (from flat index {lo}); a vectorized function must "
                "return one value per element"
            )
        np.copyto(target, res.reshape(target.shape), casting="same_kind")

    if plan.kind == "vectorized":

        def run_vectorized(lo: int, hi: int) -> None:
            for r0, r1, c0, c1 in space.segments(lo, hi):
                args = [s if g is None else g[r0:r1, c0:c1].reshape(-1)
                        for g, s in zip(grids, scalars)]
                store(func(*args), r0, r1, c0, c1, lo)

        return run_vectorized

    def run_python(lo: int, hi: int) -> None:  # plain Python scalar function, element by element
        for r0, r1, c0, c1 in space.segments(lo, hi):
            count = (r1 - r0) * (c1 - c0)
            cols = [
                itertools.repeat(s, count) if g is None else g[r0:r1, c0:c1].reshape(-1).tolist()
                for g, s in zip(grids, scalars)
            ]
            res: list[Any] = []
            append = res.append
            try:
                for value in map(func, *cols):  # map: the cheapest per-element call
                    append(value)
            except Exception as exc:
                # map stopped at the failing element: len(res) elements succeeded
                note_raised_by(exc, plan.func_name,
                               f"at element index {index(plan, lo + len(res))}")
                raise
            store(res, r0, r1, c0, c1, lo)
            lo += count

    return run_python


def probe(func: Callable[..., Any], kind: str, func_name: str, scalars: list[bool],
          args: list) -> np.ndarray:
    """Run ``func`` on the first few elements (``args``): their results, whose dtype is
    the call's result dtype. The caller keeps them, so no element runs twice."""
    k = max((len(a) for a, s in zip(args, scalars) if not s), default=1)
    if kind == "vectorized":
        res = np.asarray(func(*args))
    elif k == 0:
        return np.empty(0, np.float64)  # nothing to call the function on
    else:
        cols = [[a] * k if s else a.tolist() for s, a in zip(scalars, args)]
        res = np.asarray([func(*row) for row in zip(*cols)])
    if res.dtype.kind not in "biufc":
        raise TypeError(f"{func_name} returned {res.dtype} values; parallel_map needs numbers")
    return res


# -- a call's Python task, with the probe's results kept ------------------------------------

# Elements run once to learn the result dtype of a function whose dtype can
# only be learnt by running it (vectorized and plain Python functions).
PROBE = 256


def probe_args(call: Any) -> list:
    """The first ``PROBE`` elements of each input in iteration order (scalars as given)."""
    k = min(call.size, PROBE)
    idx = np.unravel_index(np.arange(k), call.shape, order=call.order) if call.shape else ()
    return [inp.value if inp.is_scalar else np.broadcast_to(inp.array, call.shape)[idx]
            for inp in call.inputs]


def probe_call(call: Any) -> tuple[np.ndarray, int] | None:
    """Run the function here on the first elements to learn the result dtype (vectorized
    and python kinds), before any allocation; sets ``call.out_dtype``. Returns
    ``(results, ns)`` to keep, or None."""
    t0 = perf_counter_ns()
    values = probe(call.func, call.kind, call.func_name, [i.is_scalar for i in call.inputs],
                   probe_args(call))
    ns = perf_counter_ns() - t0
    call.out_dtype = values.dtype
    k = min(call.size, PROBE)
    if k == 0 or values.shape != (k,):
        return None  # (a vectorized function of the wrong length fails in its chunk)
    return values, ns


def call_task(call: Any, space: Space, errors: Errors,
              probed: tuple[np.ndarray, int] | None) -> Task:
    """The task for a Python chunk function; with ``probed``, the probe's results are
    kept for the first elements, so each element runs exactly once."""
    chunk = chunk_function(call, space, errors)
    if probed is None:
        return python_task(chunk, errors)
    values, ns = probed
    k = len(values)
    out_grid = space.grid(len(call.inputs))

    def reuse(lo: int, hi: int) -> None:
        if lo < k:
            store_kept(space, out_grid, values, lo, min(hi, k))
            lo = min(hi, k)
        if lo < hi:
            chunk(lo, hi)

    task = python_task(reuse, errors)
    if call.schedule == "static":
        return task  # untimed: whoever claims the first block copies the kept results

    def probed_first(job: Job, caller: bool) -> None:
        # Timed schedules: the caller claims the chunks the probe computed and completes
        # them with the probe's own time, so the chunk sizes learnt next are right.
        if caller and job.enter():
            try:
                _complete_probed(job, reuse, k, ns, errors)
            finally:
                job.leave()
        task(job, caller)

    return probed_first


def _complete_probed(job: Job, reuse: Chunk, k: int, ns: int, errors: Errors) -> None:
    while (claim := job.claim()) is not None:
        lo, hi = claim
        t0 = perf_counter_ns()
        try:
            reuse(lo, hi)  # copies [lo, k); computes any part beyond k
        except BaseException as exc:
            errors.record(exc, lo, hi)
            job.fail(lo, hi)
            if isinstance(exc, KeyboardInterrupt):
                raise
            return
        job.complete(lo, hi, perf_counter_ns() - t0 + ns * (min(hi, k) - lo) // k)
        if hi >= k:
            return


def store_kept(space: Space, out_grid: np.ndarray, values: np.ndarray, lo: int, hi: int) -> None:
    """Write the kept probe results ``values[lo:hi]`` into elements ``[lo, hi)`` of the
    output (``out_grid``, the output's grid in ``space``), in iteration order."""
    pos = lo
    for r0, r1, c0, c1 in space.segments(lo, hi):
        block = out_grid[r0:r1, c0:c1]
        np.copyto(block, values[pos:pos + block.size].reshape(block.shape), casting="same_kind")
        pos += block.size


def raise_errors(call: Any, errors: Errors, job: Job, space: Space, native: bool) -> None:
    """Raise the call's first failure (with the chunk or element it came from), if any."""
    if errors.first is not None:
        exc, lo, hi = errors.first
        if call.kind != "python":
            note_raised_by(exc, call.func_name, "on the chunk of elements "
                           f"{index(call, lo)} to {index(call, hi - 1)}")
        raise exc
    failed = job.failed_chunk
    if failed is not None:
        if native:
            raise_native_failure(call, space, *failed)
        raise RuntimeError("a chunk failed without an error being recorded (internal error)")
    if job.done != call.size:
        raise RuntimeError(
            f"only {job.done} of {call.size} elements were computed (internal error)")
