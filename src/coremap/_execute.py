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

import dataclasses
import sys
import time
import weakref
from time import perf_counter_ns

import numpy as np

from coremap import _layout, _shm
from coremap._errors import note_raised_by
from coremap._functions import FunctionCache
from coremap._insights import observed
from coremap._kernels import _runner
from coremap._tasks import (
    Errors,
    chunk_function,
    index,
    native_kernel,
    native_task,
    probe,
    python_task,
    raise_native_failure,
)
from coremap.engines import get_engine

# Elements run once to learn the result dtype of a function whose dtype can
# only be learnt by running it (vectorized and plain Python functions).
PROBE = 256

# Chunk timing (see _kernels/_runner.pyx). A chunk aims at TARGET_CHUNK_NS, so
# Ctrl-C and cancels act within about that long (a responsiveness choice, well
# under the 1 s budget; chunk overhead is ~1 us, so it costs nothing measurable).
# Helpers are woken once the estimated remaining work exceeds ESCALATE_NS: about
# twice what waking a thread costs (35-60 us, docs/benchmarks.rst), so a call that
# would be over before a helper arrives stays in the caller (W5 at 10^3 elements:
# 2.1-4.9x NumPy's time, no thread woken; tests/test_engine.py checks the latter).
TARGET_CHUNK_NS = 20_000_000
ESCALATE_NS = 100_000
FIRST_CHUNK = 1_024
# A guided chunk is worth at least this much work once timed (see _runner.pyx).
FLOOR_CHUNK_NS = 50_000
# A plain Python function may take milliseconds per element: start smaller.
FIRST_CHUNK_PYTHON = 64


def _first_chunk(plan) -> int:
    return min(plan.chunk, FIRST_CHUNK_PYTHON if plan.kind == "python" else FIRST_CHUNK)



def new_job(plan):
    """The runner's job for a plan: timed chunks except for the static schedule."""
    timed = plan.schedule != "static"
    return _runner.Job(
        plan.size, plan.workers, plan.schedule, plan.chunk, plan.max_chunk,
        target_ns=TARGET_CHUNK_NS if timed else 0,
        first_chunk=_first_chunk(plan) if timed else 0,
        escalate_ns=ESCALATE_NS, floor_ns=FLOOR_CHUNK_NS if timed else 0,
    )


def _prepare_views(plan, out: np.ndarray):
    """Iteration views of the inputs and ``out``, and the collapsed space."""
    inputs = []
    for inp in plan.inputs:
        arr = inp.array if inp.is_scalar else _layout.native(inp.array)
        if plan.kind == "builtin":
            arr = arr.astype(plan.out_dtype, copy=False)
        inputs.append(arr)
    if plan.kind == "builtin":  # its parameters, as stride-0 operands after the inputs
        inputs += plan.func.operands(plan.out_dtype)
    views = [_layout.iteration_view(a, plan.shape, plan.order) for a in inputs]
    out_view = _layout.iteration_view(out, plan.shape, plan.order)
    # An input that overlaps out, other than as the very same elements, is read
    # from a copy: NumPy's answer for overlapping ufunc operands.
    for k, (a, v) in enumerate(zip(inputs, views)):
        if a.size > 1 and np.may_share_memory(a, out) and not _layout.same_elements(v, out_view):
            views[k] = _layout.iteration_view(a.copy(), plan.shape, plan.order)
    space, _ = _layout.space_copying([*views, out_view])
    return space  # None if out itself is the obstacle


_output = _layout.allocate_output  # the name the process engine's path uses


def _probe_args(plan) -> list:
    """The first ``PROBE`` elements of each input in iteration order (scalars as given)."""
    k = min(plan.size, PROBE)
    idx = np.unravel_index(np.arange(k), plan.shape, order=plan.order) if plan.shape else ()
    return [inp.value if inp.is_scalar else np.broadcast_to(inp.array, plan.shape)[idx]
            for inp in plan.inputs]


def execute(plan, progress: bool = False) -> np.ndarray:
    """Run a call (a ``_plan.Call``, from ``plan_call``) and return the output array."""
    if plan.adapter is not None and plan.size:
        from coremap.engines import _cluster

        return _cluster.execute(plan, plan.adapter, plan.retries, run_cluster_chunk)
    if plan.engine == "processes" and plan.size:
        return _execute_processes(plan, progress)
    probed = _probe(plan) if plan.out_dtype is None else None
    target, out = _layout.allocate_output(plan)
    if plan.size == 0:
        return out
    space = _prepare_views(plan, target)
    if space is None:  # an out= whose layout has no 2-D form: compute into a temporary
        target = np.empty(plan.shape, out.dtype.newbyteorder("="), order=plan.order)
        space = _prepare_views(plan, target)
    native = plan.kind in ("builtin", "numba")
    if (plan.timeout is not None and not native and plan.engine == "threads"
            and target is plan.out):
        # A Python chunk stuck past the deadline cannot be stopped: it writes into
        # a private buffer, copied into out only on success (engines/_threads.py).
        target = np.empty(plan.shape, out.dtype.newbyteorder("="), order=plan.order)
        space = _prepare_views(plan, target)
    errors = Errors()
    job = new_job(plan)
    if native:
        address, meta = native_kernel(plan, space), space.meta()
        job.set_kernel(address, space.base_ptrs, meta, space.views)
        task = observed(native_task(), job, (address, space.base_ptrs, meta))
    else:
        task = observed(_python_task(plan, space, errors, probed), job)

    on_progress, bar = _progress_bar(plan, progress)
    engine = get_engine(plan.engine)
    try:
        engine.run(job, task, plan.workers, on_progress=on_progress, timeout=plan.timeout)
    finally:
        if bar is not None:
            bar.close()
    _raise_errors(plan, errors, job, space, native)
    if target is not out:
        np.copyto(out, target, casting="same_kind")
    return out


def _probe(plan):
    """Run the function on the first elements to learn the result dtype (vectorized and
    python kinds), before any allocation: ``(results, ns)`` to keep, or None."""
    t0 = perf_counter_ns()
    values = probe(plan.func, plan.kind, plan.func_name, [i.is_scalar for i in plan.inputs],
                   _probe_args(plan))
    ns = perf_counter_ns() - t0
    plan.out_dtype = values.dtype
    k = min(plan.size, PROBE)
    if k == 0 or values.shape != (k,):
        return None  # (a vectorized function of the wrong length fails in its chunk)
    return values, ns


def _python_task(plan, space, errors, probed):
    """The task for a Python chunk function; with ``probed``, the probe's results are
    kept for the first elements, so each element runs exactly once."""
    chunk = chunk_function(plan, space, errors)
    if probed is None:
        return python_task(chunk, errors)
    values, ns = probed
    k = len(values)
    out_grid = space.grid(len(plan.inputs))

    def reuse(lo, hi):
        if lo < k:
            _store_kept(space, out_grid, values, lo, min(hi, k))
            lo = min(hi, k)
        if lo < hi:
            chunk(lo, hi)

    task = python_task(reuse, errors)
    if plan.schedule == "static":
        return task  # untimed: whoever claims the first block copies the kept results

    def probed_first(job, caller):
        # Timed schedules: the caller claims the chunks the probe computed and completes
        # them with the probe's own time, so the chunk sizes learnt next are right.
        if caller and job.enter():
            try:
                _complete_probed(job, reuse, k, ns, errors)
            finally:
                job.leave()
        task(job, caller)

    return probed_first


def _complete_probed(job, reuse, k: int, ns: int, errors) -> None:
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


# On a cluster engine: the functions its chunks run, unpickled once per digest.
_CLUSTER_FUNCS = FunctionCache()


def run_cluster_chunk(func_bytes: bytes, key: str, kind: str, args: list, out_dtype):
    """Runs on a cluster engine: one chunk through the serial engine."""
    from coremap._plan import plan_call

    func = _CLUSTER_FUNCS.load(func_bytes, key)
    arrays = tuple(args) if len(args) > 1 else args[0]
    return execute(plan_call(arrays, func, vectorized=kind == "vectorized", dtype=out_dtype,
                             backend="serial"))


def _progress_bar(plan, progress: bool):
    """``(on_progress, bar)``: a tqdm bar fed with ``job.done``, or ``(None, None)``."""
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

    return on_progress, bar


def _raise_errors(plan, errors, job, space, native) -> None:
    if errors.first is not None:
        exc, lo, hi = errors.first
        if plan.kind != "python":
            note_raised_by(exc, plan.func_name, "on the chunk of elements "
                           f"{index(plan, lo)} to {index(plan, hi - 1)}")
        raise exc
    failed = job.failed_chunk
    if failed is not None:
        if native:
            raise_native_failure(plan, space, *failed)
        raise RuntimeError("a chunk failed without an error being recorded (internal error)")
    if job.done != plan.size:
        raise RuntimeError(
            f"only {job.done} of {plan.size} elements were computed (internal error)")


# -- the process engine ---------------------------------------------------------------

def _describe(view: np.ndarray, seg):
    from coremap.engines._messages import ViewDesc

    offset = view.__array_interface__["data"][0] - seg.address
    return ViewDesc(seg.name, offset, view.shape, view.strides, view.dtype)


# (function, input dtypes) -> result dtype probed in a worker. A process round
# trip costs about as much as a small call, so the probe runs once per signature;
# later results are cast to it with the "same_kind" rule (or fail loudly).
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probed_dtype(plan):
    try:
        return _probed.get(plan.func, {}).get((plan.kind, plan.in_dtypes))
    except TypeError:
        return None


def _execute_processes(plan, progress: bool) -> np.ndarray:
    """Run ``plan`` on the process engine: operands in shared memory, nothing pickled
    but names, offsets, shapes and strides (and the function, once per worker)."""
    import cloudpickle

    from coremap.engines._messages import CallSpec, JobParams, ProbeSpec
    from coremap.engines._processes import process_engine

    if plan.kind == "builtin":  # workers compile the same map with Numba
        plan = dataclasses.replace(plan, kind="numba",
                                   func=_affine_scalar(plan.func, plan.out_dtype))
    kind, func = plan.kind, plan.func
    try:
        func_bytes = cloudpickle.dumps(func)
    except Exception as exc:
        raise TypeError(
            f"cannot send {plan.func_name} to worker processes: {type(exc).__name__}: {exc}"
        ) from exc
    engine = process_engine()
    with engine._lock:
        probed = None  # the probe's results, kept so those elements run only once
        if plan.out_dtype is None:
            plan.out_dtype = _probed_dtype(plan)
        if plan.out_dtype is None:  # probed in a worker: the parent never runs user code
            t0 = time.monotonic()
            probed = engine.probe(ProbeSpec(
                task_id=-1, func=func_bytes, kind=kind, func_name=plan.func_name,
                scalars=[i.is_scalar for i in plan.inputs], args=_probe_args(plan),
            ), plan.shape, plan.order, plan.timeout)
            plan.out_dtype = probed.dtype
            if probed.shape != (min(plan.size, PROBE),):
                probed = None  # (a vectorized function of the wrong length fails in its chunk)
            if plan.timeout is not None:
                plan = dataclasses.replace(
                    plan, timeout=max(1e-3, plan.timeout - (time.monotonic() - t0)))
            try:
                _probed.setdefault(plan.func, {})[(kind, plan.in_dtypes)] = plan.out_dtype
            except TypeError:  # not weak-referenceable or unhashable: probe every call
                pass
        procs = engine.prepare(plan.workers)
        _, out = _output(plan)
        direct = plan.out is not None and _shm.segment_of(plan.out) is not None \
            and not _layout.needs_native_copy(plan.out)
        if direct:
            target = plan.out
        else:
            target, _ = engine.segment_array(plan.shape, plan.out_dtype, order=plan.order)
        space = _prepare_views(plan, target)
        if space is None:
            target, _ = engine.segment_array(plan.shape, plan.out_dtype, order=plan.order)
            space = _prepare_views(plan, target)
        if probed is not None:
            _store_kept(space, space.grid(len(plan.inputs)), probed, 0, len(probed))
        views = list(space.views)
        segs = []
        for k, v in enumerate(views):
            origin = plan.inputs[k].value if k < len(plan.inputs) else None
            seg = _shm.segment_of(v, origin)
            if seg is None and k < len(plan.inputs) and plan.inputs[k].is_scalar:
                segs.append(None)
                continue
            if seg is None:  # copied once into a pooled segment, in iteration order
                arr, seg = engine.segment_array(v.shape, v.dtype)
                np.copyto(arr, v)
                views[k] = arr
            segs.append(seg)
        if _layout.build_space(views) is None:
            for k in _layout.bad_operands(views):
                if segs[k] is not None:
                    arr, segs[k] = engine.segment_array(views[k].shape, views[k].dtype)
                    np.copyto(arr, views[k])
                    views[k] = arr
        light = [inp if inp.is_scalar else _layout.Input(None, np.empty((), inp.dtype), False)
                 for inp in plan.inputs]
        timed = plan.schedule != "static"
        job = JobParams(plan.size, plan.workers, plan.schedule, plan.chunk, plan.max_chunk,
                        TARGET_CHUNK_NS if timed else 0,
                        _first_chunk(plan) if timed else 0, FLOOR_CHUNK_NS if timed else 0)
        # task_id, func_key, ctrl and keep are the engine's to fill in
        spec = CallSpec(
            task_id=-1, kind=kind, func=func_bytes, func_key="", func_name=plan.func_name,
            shape=plan.shape, order=plan.order, inputs=light, in_dtypes=plan.in_dtypes,
            out_dtype=plan.out_dtype,
            views=[None if s is None else _describe(v, s) for v, s in zip(views, segs)],
            job=job, ctrl=None, keep=frozenset(), skip=0 if probed is None else len(probed),
        )
        on_progress, bar = _progress_bar(plan, progress)
        try:
            engine.run(spec, procs, timeout=plan.timeout, on_progress=on_progress)
        finally:
            if bar is not None:
                bar.close()
        if target is not out:
            np.copyto(out, target, casting="same_kind")
        return out


def _store_kept(space, out_grid, values: np.ndarray, lo: int, hi: int) -> None:
    """Write the kept probe results ``values[lo:hi]`` into elements ``[lo, hi)`` of the
    output (``out_grid``, the output's grid in ``space``), in iteration order."""
    pos = lo
    for r0, r1, c0, c1 in space.segments(lo, hi):
        block = out_grid[r0:r1, c0:c1]
        np.copyto(block, values[pos:pos + block.size].reshape(block.shape), casting="same_kind")
        pos += block.size


def _affine_scalar(aff, dtype):
    return aff.scalar(dtype)  # a built-in kernel's scalar form, compiled by the workers
