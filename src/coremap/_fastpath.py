"""The fast path: a repeated call with C-contiguous inputs skips the planner.

``make_plan`` and ``execute`` cost tens of microseconds of Python, which is
more than the whole of a small call (W5 in docs/benchmarks.rst: 10^3 elements, budget
6x NumPy's time). Most calls repeat one *signature*: the same function, input
dtypes and shapes, and defaults. The first call of a signature goes through the
planner; if its layout is the simple one (every array C-contiguous with the
full shape, scalars broadcast), the decisions are cached, and later calls only
build a key, allocate the output and run the kernel::

    parallel_map ── lookup(key) ── hit ──> run(entry)
                        │                    ├─ short (learnt): run_inline, no job
                        miss                 └─ else: entry.prepared.run(arrays + out)
                        v                         (_runner.Prepared: the job, the caller's
                    full path ──> remember        share and the pool's helpers, in C)

The job of a cached call is prepared once (``_runner.Prepared``), so no Python
builds a Job or goes through an engine on a repeated call: after a call has
streamed through megabytes those Python steps miss the caches: W1 into ``out=``
at 10^6 elements took 172 and 148 us through them and 152 and 130 us without
(the two paths alternated in one process, 2-core VM; prange: 127 and 115 us).

Options are part of the key (``_plan.fast_key``): a call with ``workers=``,
``backend=``, ``schedule=``, ``chunk_size=`` or ``dtype=`` off their defaults is
planned (and checked) once per distinct value, then cached like any other. An
``out=`` array is checked on every call: C-contiguous, aligned, writeable, of
the call's shape and cached dtype, and sharing no memory with an input unless
it is that very input (``out=x``). Anything else unusual (progress, timeout,
views, lists, a kernel error) takes the full path, which also produces the
error messages.

A compiled function that reads globals is checked on every call, here too:
``entry.watch.current()`` is False once a global number it read changed or a
name it read was rebound, and the call then takes the full path, which
compiles it again (``_kernels/_rebuild.py``). Functions that read no globals
(W1, W5) pay one ``is None`` test.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from coremap import _config, _insights
from coremap._kernels import _runner
from coremap._plan import PLAIN_KEY
from coremap.engines._base import ESCALATE_NS, POLL_S, TARGET_CHUNK_NS, new_job
from coremap.kernels import BuiltinKernel

if TYPE_CHECKING:
    from coremap._kernels._rebuild import Watch
    from coremap._plan import Call

_SCALARS = (float, int, complex, bool)
_CACHE_MAX = 256
# A call is run inline only below the pool's escalation threshold, and never
# above this: after idle spells the pool's wake-up estimate (which sets the
# threshold) can reach tens of microseconds on a VM, and a call of up to
# ESCALATE_NS would then run alone until a job measured the pool again.
_INLINE_MAX_NS = ESCALATE_NS // 4
_POLL_NS = int(POLL_S * 1e9)
_cache: dict[Hashable, _Entry] = {}


class _Entry:
    """A cached signature's decisions (see the module docstring)."""

    __slots__ = ("kind", "engine", "workers", "helpers", "prepared",
                 "dtype", "scalar_dtypes", "converts", "size", "shape",
                 "ns_per_element", "watch")
    kind: str
    engine: str
    workers: int
    helpers: int  # native pool workers posted besides the caller (0 on "serial")
    prepared: _runner.Prepared | None  # the job's settings and kernel (None: a ufunc)
    dtype: np.dtype | None
    scalar_dtypes: list[np.dtype | None]  # per item: None for an array
    converts: bool  # an item is a scalar, made an array of its dtype on each call
    size: int
    shape: tuple[int, ...]
    ns_per_element: float | None  # learnt on the first fast call
    watch: Watch | None


def _key(func: object, items: tuple,
         options_key: Hashable) -> tuple[tuple | None, tuple[int, ...] | None]:
    parts: list[object] = []
    shape = None
    for item in items:
        t = type(item)
        if t is np.ndarray:
            if shape is None:
                shape = item.shape
            elif item.shape != shape:
                return None, None
            parts.append((item.dtype, item.strides))
        elif t in _SCALARS:
            parts.append(t)
        else:
            return None, None
    if shape is None:
        return None, None
    if isinstance(func, BuiltinKernel):  # a new affine(a, b) per call must not miss
        # the cache: a built-in kernel is keyed by its class and its parameters' types
        slots: tuple[str, ...] = type(func).__slots__
        func = (type(func), *[type(getattr(func, name)) for name in slots])
    return (func, shape, *parts, _config.defaults_key(), options_key), shape


def lookup(
    arrays: object, func: object, options_key: Hashable | None
) -> tuple[_Entry | None, tuple, Hashable | None]:
    """The cached entry for this call (or None), the call's items, and its key.

    ``options_key`` is ``_plan.fast_key``'s; None (an option the fast path does not
    carry) gives ``(None, (), None)``.
    """
    if options_key is None or _insights.recording:  # explain(run=True) hooks the full path
        return None, (), None
    items = arrays if type(arrays) is tuple else (arrays,)
    try:
        key, _ = _key(func, items, options_key)
        entry = _cache.get(key) if key is not None else None
    except TypeError:  # an unhashable function
        return None, (), None
    return entry, items, key


def remember(key: Any, plan: Call, items: Sequence[object]) -> None:
    """Cache ``plan`` under ``key`` if its layout is the simple one."""
    if key is None or plan.kind not in ("numba", "builtin", "ufunc") or plan.size == 0:
        return
    if plan.engine not in ("threads", "serial"):
        return
    if plan.kind == "ufunc" and key[-1] is not PLAIN_KEY:
        return  # a ufunc runs as func(*items) here: no out=, dtype= or engine choice
    for item in items:
        if type(item) is np.ndarray and not (
            item.flags.c_contiguous and item.dtype.isnative and item.shape == plan.shape
        ):
            return
    e = _Entry()
    e.kind = plan.kind
    e.engine = plan.engine
    e.workers = plan.workers
    e.dtype = plan.out_dtype
    e.ns_per_element = None  # learnt on the first fast call
    e.size = plan.size
    e.shape = plan.shape
    e.scalar_dtypes = [None if type(i) is np.ndarray else inp.dtype
                       for i, inp in zip(items, plan.inputs)]
    address = 0
    e.watch = None
    if plan.kind == "numba":
        from coremap._kernels import _numba

        if plan.out_dtype is None:  # (never: compiling the function told its dtype)
            return
        e.watch = _numba.watch_of(plan.func, len(plan.in_dtypes))
        classes = "".join("c" if d is None else "s" for d in e.scalar_dtypes) + "c"
        address = _numba.kernel_address(plan.func, plan.in_dtypes, plan.out_dtype, classes)
    scalars = [d is not None for d in e.scalar_dtypes]
    if isinstance(plan.func, BuiltinKernel):
        if plan.in_dtypes[0] != plan.out_dtype:
            return  # the input is cast first: the full path does that
        address = plan.func.address(plan.out_dtype)
        e.scalar_dtypes = [None] * len(items)  # its parameters come from func.operands
        scalars = [False] * len(items) + [True] * len(plan.func.operands(plan.out_dtype))
    meta = [plan.size]
    for scalar in (*scalars, False):  # the output last
        meta += [0, 0, 0 if scalar else 1]
    e.converts = any(d is not None for d in e.scalar_dtypes)
    e.helpers = plan.workers - 1 if plan.engine == "threads" else 0
    e.prepared = None
    if plan.kind != "ufunc":
        if plan.out_dtype is None:
            return  # (never: a native kernel's dtype is known before it is compiled)
        e.prepared = _runner.Prepared(new_job(plan), address, meta, len(scalars) + 1,
                                      plan.out_dtype, plan.shape)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = e


def run(entry: _Entry, func: Any, items: tuple, out: object = None) -> Any:
    """Run a cached call; ``None`` if it must be redone on the full path."""
    if entry.kind == "ufunc":
        if entry.engine == "serial":
            return func(*items)
        return None
    if entry.watch is not None and not entry.watch.current():
        return None  # a global it read has changed: the full path compiles it again
    if entry.converts:
        arrays = tuple(item if d is None else np.asarray(item, d)
                       for item, d in zip(items, entry.scalar_dtypes))
    else:
        arrays = items
    if entry.kind == "builtin":
        arrays += func.operands(entry.dtype)
    if out is None:
        out = np.empty(entry.shape, entry.dtype)
    # entry.prepared checks out= (shape, dtype, layout, overlap) and the alignment;
    # None: refused, with nothing run (the full path handles or reports it)
    prepared = entry.prepared
    assert prepared is not None  # a native kind
    per = entry.ns_per_element
    estimate = TARGET_CHUNK_NS if per is None else entry.size * per
    if estimate < min(_INLINE_MAX_NS, _runner.escalate_threshold_ns()) or (
            entry.workers == 1 and estimate < TARGET_CHUNK_NS):
        # One kernel call, no job: when a job would not post its helpers for so
        # little work (_runner.pyx; W1 at 10^5 elements, 24 us on one thread, ran
        # inline under a fixed 25 us bound in 20 us, and as a job with the pool's
        # helper awake in 13-16 us against prange's 12-15 us, 2-core VM), or on one
        # worker, which has nobody to wake, when the call is shorter than a timed
        # chunk and so handles Ctrl-C in time when it returns (a job's timed
        # pieces cost such a call 8-12 us; W2 at 10^4 elements ran at 0.91x a
        # plain Numba loop through them). Timed, so the estimate follows the data.
        t0 = perf_counter_ns()
        ok = prepared.run_inline(arrays, out)
        if ok is None:
            return None
        entry.ns_per_element = (perf_counter_ns() - t0) / entry.size
        return out if ok else None
    # The engine's run, in one compiled call: on "threads" the caller computes and
    # posts entry.helpers native pool workers; on "serial", none. A call known to
    # be short gives each thread a home block (_runner.Job._home_blocks). Signals
    # are checked between pieces in any thread: Python handles them only in the
    # main one (PyErr_CheckSignals returns at once elsewhere).
    job = prepared.run(arrays, out, True, entry.helpers, _POLL_NS, estimate < TARGET_CHUNK_NS)
    if job is None or job.done != entry.size:
        return None  # a failure: the full path runs the call again and reports it
    entry.ns_per_element = job.ns_per_element
    return out
