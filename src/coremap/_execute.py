"""Run a plan: allocate the output, build the iteration space, hand chunks to an engine.

    Plan ──> inputs made native (copies only where needed) ──> output allocated
         ──> Space (R x C strided iteration, see _layout.py)
         ──> Job (atomic chunk counter) + task (native kernel or Python chunk function)
         ──> engine.run(job, task) ──> first error re-raised, or the output

Errors: a native kernel reports a failed chunk; the elements of that chunk are
re-run one by one through the jitted function to raise the real exception,
with the element's index. A Python chunk function's exception is kept with its
chunk. Either way the other chunks are cancelled and the first error is raised
with its own type.
"""
from __future__ import annotations

import sys
import threading
from time import perf_counter_ns

import numpy as np

from coremap import _layout
from coremap._kernels import _runner
from coremap._kernels._numba import kernel_scope
from coremap.engines import get_engine

# Elements run once to learn the result dtype of a function whose dtype can
# only be learnt by running it (vectorized and plain Python functions).
PROBE = 256

# Chunk timing (see _kernels/_runner.pyx). A chunk aims at TARGET_CHUNK_NS, so
# Ctrl-C and cancels act within about that long; helpers are woken once the
# estimated remaining work exceeds ESCALATE_NS, the crossover below which one
# thread is faster. Both chosen by benchmarks/crossover.py.
TARGET_CHUNK_NS = 20_000_000
ESCALATE_NS = 100_000
FIRST_CHUNK = 1_024


def new_job(plan):
    """The runner's job for a plan: timed chunks except for the static schedule."""
    timed = plan.schedule != "static"
    return _runner.Job(
        plan.size, plan.workers, plan.schedule, plan.chunk, plan.max_chunk,
        target_ns=TARGET_CHUNK_NS if timed else 0,
        first_chunk=min(plan.chunk, FIRST_CHUNK) if timed else 0,
        escalate_ns=ESCALATE_NS,
    )


def native_task():
    """The task that runs a native kernel: claim chunks in Cython, no GIL."""
    main = threading.current_thread() is threading.main_thread()

    def task(job, caller):
        with kernel_scope():  # only the main thread can take Ctrl-C between chunks
            job.run_native(check_signals=caller and main)

    return task


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(text)


def _index(plan, i: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, plan.shape, order=plan.order)) if plan.shape else ()


class _Errors:
    """The first exception of a call, with the chunk it came from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: tuple[BaseException, int, int] | None = None

    def record(self, exc: BaseException, lo: int, hi: int) -> None:
        with self._lock:
            if self.first is None:
                self.first = (exc, lo, hi)


def _prepare_views(plan, out: np.ndarray):
    """Iteration views of the inputs and ``out``, and the collapsed space."""
    inputs = []
    for inp in plan.inputs:
        arr = inp.array if inp.is_scalar else _layout.native(inp.array)
        if plan.kind == "builtin":
            arr = arr.astype(plan.out_dtype, copy=False)
        inputs.append(arr)
    if plan.kind == "builtin":
        inputs += [np.asarray(plan.func.a, plan.out_dtype), np.asarray(plan.func.b, plan.out_dtype)]
    views = [_layout.iteration_view(a, plan.shape, plan.order) for a in inputs]
    out_view = _layout.iteration_view(out, plan.shape, plan.order)
    # An input that overlaps out, other than as the very same elements, is read
    # from a copy: NumPy's answer for overlapping ufunc operands.
    for k, (a, v) in enumerate(zip(inputs, views)):
        if a.size > 1 and np.may_share_memory(a, out) and not _layout.same_elements(v, out_view):
            views[k] = _layout.iteration_view(a.copy(), plan.shape, plan.order)
    all_views = [*views, out_view]
    space = _layout.build_space(all_views)
    if space is None:  # needs a third dimension: copy the strided inputs
        for k in _layout.bad_operands(all_views):
            all_views[k] = np.ascontiguousarray(all_views[k])
        space = _layout.build_space(all_views)
    return space  # None if out itself is the obstacle


def _output(plan) -> tuple[np.ndarray, np.ndarray]:
    """``(target, out)``: where kernels write, and what the call returns."""
    out = plan.out
    if out is None:
        target = np.empty(plan.shape, plan.out_dtype, order=plan.order)
        return target, target
    if _layout.needs_native_copy(out):
        return np.empty(plan.shape, out.dtype.newbyteorder("="), order=plan.order), out
    return out, out


def _native_kernel(plan, space) -> int:
    if plan.kind == "builtin":
        from coremap._kernels import _builtin

        return _builtin.affine_address(plan.out_dtype.char)
    from coremap._kernels import _numba

    scalars = [i.is_scalar for i in plan.inputs]
    return _numba.kernel_address(
        plan.func, plan.in_dtypes, space.views[-1].dtype, space.classes(scalars)
    )


def _raise_native_failure(plan, space, lo: int, hi: int):
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
    _note(exc, f"raised by {plan.func_name} at element index {_index(plan, i)}")
    raise exc


def _chunk_function(plan, space, errors: _Errors):
    """The Python-level chunk function for ufunc, vectorized and python kinds."""
    nin = len(plan.inputs)
    grids = [None if inp.is_scalar else space.grid(k) for k, inp in enumerate(plan.inputs)]
    out_grid = space.grid(nin)
    func = plan.func
    scalars = [inp.value for inp in plan.inputs]

    if plan.kind == "ufunc":

        def run(lo, hi):
            for r0, r1, c0, c1 in space.segments(lo, hi):
                args = [s if g is None else g[r0:r1, c0:c1] for g, s in zip(grids, scalars)]
                func(*args, out=out_grid[r0:r1, c0:c1], casting="same_kind")

        return run

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

        def run(lo, hi):
            for r0, r1, c0, c1 in space.segments(lo, hi):
                args = [s if g is None else g[r0:r1, c0:c1].reshape(-1) for g, s in zip(grids, scalars)]
                store(func(*args), r0, r1, c0, c1, lo)

        return run

    def run(lo, hi):  # plain Python scalar function, element by element
        for r0, r1, c0, c1 in space.segments(lo, hi):
            count = (r1 - r0) * (c1 - c0)
            cols = [
                [s] * count if g is None else g[r0:r1, c0:c1].reshape(-1).tolist()
                for g, s in zip(grids, scalars)
            ]
            res = []
            for j, args in enumerate(zip(*cols)):
                try:
                    res.append(func(*args))
                except Exception as exc:
                    _note(exc, f"raised by {plan.func_name} at element index "
                               f"{_index(plan, lo + j)}")
                    raise
            store(res, r0, r1, c0, c1, lo)
            lo += count

    return run


def _probe_dtype(plan) -> np.dtype:
    """Run the function on the first few elements to learn its result dtype."""
    k = min(plan.size, PROBE)
    args = []
    for inp in plan.inputs:
        if inp.is_scalar:
            args.append(inp.value)
        else:
            flat = np.broadcast_to(inp.array, plan.shape).reshape(-1, order=plan.order)
            args.append(flat[:k])
    if plan.kind == "vectorized":
        res = np.asarray(plan.func(*args))
    elif k == 0:
        return np.dtype(np.float64)  # nothing to call the function on
    else:
        cols = [[a] * k if inp.is_scalar else a.tolist() for inp, a in zip(plan.inputs, args)]
        res = np.asarray([plan.func(*row) for row in zip(*cols)])
    if res.dtype.kind not in "biufc":
        raise TypeError(
            f"{plan.func_name} returned {res.dtype} values; parallel_map needs numbers"
        )
    return res.dtype


def execute(plan, progress: bool = False) -> np.ndarray:
    """Run ``plan`` (from ``make_plan``) and return the output array."""
    if plan.out_dtype is None:
        # vectorized and python kinds: the result dtype is what the function returns.
        # The probe runs the function once on a few elements before any allocation.
        plan.out_dtype = _probe_dtype(plan)
    target, out = _output(plan)
    if plan.size == 0:
        return out
    space = _prepare_views(plan, target)
    if space is None:  # an out= whose layout has no 2-D form: compute into a temporary
        target = np.empty(plan.shape, out.dtype.newbyteorder("="), order=plan.order)
        space = _prepare_views(plan, target)
    native = plan.kind in ("builtin", "numba")
    errors = _Errors()
    job = new_job(plan)
    if native:
        address = _native_kernel(plan, space)
        job.set_kernel(address, space.base_ptrs, space.meta(), space.views)
        task = native_task()
    else:
        chunk = _chunk_function(plan, space, errors)

        def task(job, caller):
            if not job.enter():
                return
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
            finally:
                job.leave()

    bar = None
    on_progress = None
    if progress:
        from tqdm.auto import tqdm

        class _Bar(tqdm):
            monitor_interval = 0  # the engine updates the bar itself: no monitor thread

        bar = _Bar(total=plan.size, unit="el", unit_scale=True, file=sys.stderr,
                   desc=plan.func_name)

        def on_progress(done):
            bar.update(done - bar.n)

    engine = get_engine(plan.engine)
    try:
        engine.run(job, task, plan.workers, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()

    if errors.first is not None:
        exc, lo, hi = errors.first
        if plan.kind != "python":
            _note(exc, f"raised by {plan.func_name} on the chunk of elements "
                       f"{_index(plan, lo)} to {_index(plan, hi - 1)}")
        raise exc
    failed = job.failed_chunk
    if failed is not None:
        if native:
            _raise_native_failure(plan, space, *failed)
        raise RuntimeError("a chunk failed without an error being recorded (internal error)")
    if job.done != plan.size:
        raise RuntimeError(f"only {job.done} of {plan.size} elements were computed (internal error)")
    if target is not out:
        np.copyto(out, target, casting="same_kind")
    return out
