"""``parallel_reduce``: a map fused into a reduction, bit-identical on any number of workers.

    inputs ──> broadcast, reduced axes moved last ──> M rows x N columns (views)
          ──> fixed blocks of at most BLOCK columns (M * nb blocks, by index only)
          ──> per-block partials P[M, nb]:
                compiled path: one Numba block kernel maps and folds each block
                    (_kernels/_reducers.py), run by the chunk runner on the serial
                    or thread engine; no array of f(x) exists
                slab path: f mapped by parallel_map on SLAB_BLOCKS blocks at a time
                    (processes, clusters, ufuncs, vectorized and Python functions),
                    then each block folded by the same identity kernel (or NumPy)
          ──> partials combined per row in a fixed pairwise tree (_combine)
          ──> initial, mean's division, keepdims, out=

Determinism: the blocks depend only on the shape of the reduction (``BLOCK``
columns, never the number of workers), a block's partial only on its elements,
and the tree only on the number of blocks. So ``workers``, ``chunk_size``,
``schedule`` and the engine change who computes a partial and when, never its
bits. (The slab path folds each block with the compiled path's own kernel, so a
function that Numba compiles gives the same bits on processes as on threads.)

Which path: a scalar function Numba compiles (or ``func=None``, or a built-in
kernel), an op with a block kernel (sum, prod, min, max, any, all, mean, argmin,
argmax and their ufuncs) and dtypes Numba handles run on the compiled path when
the engine is ``serial`` or ``threads``. Everything else takes the slab path:
peak extra memory is one slab (``SLAB_BLOCKS * BLOCK`` values), not ``f(x)``.
Other binary ufuncs (``np.bitwise_or``, ``np.fmax``, ...), float16, and complex
min/max fold their blocks with ``ufunc.reduce`` in the calling thread.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from coremap import _config, _containers, _layout
from coremap._errors import note_raised_by
from coremap._functions import func_name as _name
from coremap._kernels import _runner
from coremap._plan import DYNAMIC_CHUNKS_PER_WORKER, PROCESS_MIN_SIZE
from coremap.engines._base import ESCALATE_NS, FLOOR_CHUNK_NS, TARGET_CHUNK_NS

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike

    from coremap._typing import Backend, KernelFunc, ReduceOp, Schedule

_OutT = TypeVar("_OutT", bound="np.ndarray[Any, Any]")

__all__ = ["parallel_reduce"]

# Columns per block. Fixed, so the result never depends on the worker count. A
# multiple of the 128-element pairwise runs; 4,096 float64 partials of 10^7
# elements take 20 KB. (W8's sum at 10^7 ran alike with 2,048 to 16,384.)
BLOCK = 4_096
# Blocks mapped per parallel_map call on the slab path: 256 Ki elements (2 MiB of
# float64), enough to amortise a process round trip (~1 ms, _plan.PROCESS_MIN_SIZE).
SLAB_BLOCKS = 64

# Chunk timing of the compiled path: TARGET_CHUNK_NS, ESCALATE_NS and FLOOR_CHUNK_NS
# come from engines/_base.py, which names the measurements. The block kernels keep
# the 50 us tail floor (FLOOR_CHUNK_NS): the 10 us native floor of parallel_map was
# measured on maps, not on reductions. Chunking constants and PROCESS_MIN_SIZE are
# parallel_map's (_plan.py).

# op name -> (ufunc, block-kernel op)
_NAMED: dict[str, tuple[np.ufunc, str]] = {
    "sum": (np.add, "sum"), "prod": (np.multiply, "prod"),
    "min": (np.minimum, "min"), "max": (np.maximum, "max"),
    "any": (np.logical_or, "any"), "all": (np.logical_and, "all"),
    "mean": (np.add, "sum"), "argmin": (np.minimum, "argmin"),
    "argmax": (np.maximum, "argmax"),
}
_KERNEL_OF_UFUNC: dict[np.ufunc, str] = {np.add: "sum", np.multiply: "prod", np.minimum: "min",
                    np.maximum: "max", np.logical_or: "any", np.logical_and: "all"}
_ARG = ("argmin", "argmax")


class _Op:
    """A resolved ``op``: its name, ufunc, block-kernel op (or None) and NumPy's rules."""

    kop: str | None  # the block kernel's op; None: folded by the ufunc in NumPy

    def __init__(self, op: object) -> None:
        if isinstance(op, str):
            if op not in _NAMED:
                raise ValueError(f"op must be one of {', '.join(map(repr, _NAMED))} or a "
                                 f"binary NumPy ufunc such as np.add, got {op!r}")
            self.name = op
            self.ufunc, self.kop = _NAMED[op]
        elif isinstance(op, np.ufunc):
            if op.nin != 2 or op.nout != 1:
                raise TypeError(f"op={op.__name__} is not a binary ufunc (nin={op.nin}, "
                                f"nout={op.nout}); reductions need one such as np.add")
            self.name = op.__name__
            self.ufunc, self.kop = op, _KERNEL_OF_UFUNC.get(op)
        else:
            raise TypeError(f"op must be a name such as 'sum' or a binary NumPy ufunc, "
                            f"got {type(op).__name__}")
        self.is_arg = self.name in _ARG
        self.takes_dtype = self.name in ("sum", "prod", "mean") or isinstance(op, np.ufunc)
        self.takes_initial = self.name in ("sum", "prod", "min", "max") or isinstance(
            op, np.ufunc)

    def numpy(self, a: np.ndarray, axis: int | tuple[int, ...] | None,
              dtype: DTypeLike | None = None, keepdims: bool = False,
              initial: object = None) -> Any:
        """NumPy's own answer for this op (the reference, and the empty-input rules)."""
        if self.is_arg or self.name in ("any", "all"):
            return getattr(np, self.name)(a, axis=axis, keepdims=keepdims)
        if self.name == "mean":
            return np.mean(a, axis=axis, dtype=dtype, keepdims=keepdims)
        kw: dict[str, Any] = {} if initial is None else {"initial": initial}
        return self.ufunc.reduce(a, axis=axis, dtype=dtype, keepdims=keepdims, **kw)

    def result_dtype(self, map_dtype: np.dtype, dtype: DTypeLike | None) -> np.dtype:
        """The result dtype NumPy gives (``np.sum``'s promotion: int8 sums in int64, ...)."""
        probe = np.zeros(1, map_dtype)
        with np.errstate(all="ignore"):
            return np.asarray(self.numpy(probe, 0, dtype)).dtype

    def acc_dtype(self, map_dtype: np.dtype, dtype: DTypeLike | None) -> np.dtype:
        """The dtype partials are accumulated in."""
        if self.is_arg:
            return np.dtype(map_dtype)
        if self.name == "mean":
            if dtype is not None:
                return np.dtype(dtype)
            if map_dtype.kind in "biu":
                return np.dtype(np.float64)
            return np.dtype(np.float32) if map_dtype == np.float16 else np.dtype(map_dtype)
        return self.result_dtype(map_dtype, dtype)


def _kernel_dtype(dt: np.dtype, complex_ok: bool = True) -> bool:
    """Whether the block kernels handle ``dt`` (Numba has no float16 arithmetic)."""
    dt = np.dtype(dt)
    if dt.kind in "biu":
        return True
    if dt.kind == "f":
        return dt.itemsize in (4, 8)
    return complex_ok and dt.kind == "c" and dt.itemsize in (8, 16)


def _kernel_op(op: _Op, dtypes) -> str | None:
    """The block kernel for ``op`` over these dtypes, or None (NumPy folds the blocks)."""
    if op.kop is None:
        return None
    complex_ok = op.kop in ("sum", "prod", "any", "all")
    return op.kop if all(_kernel_dtype(d, complex_ok) for d in dtypes) else None


def _normalize_axis(axis, ndim: int, op: _Op) -> tuple[int, ...]:
    """Reduced axes, sorted and non-negative, with NumPy's errors."""
    if axis is None:
        return tuple(range(ndim))
    if op.is_arg and not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op.name} takes an int axis or None, got {axis!r}")
    axes = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(int(a), ndim)
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis!r}")
    return tuple(sorted(out))


class _Call:
    """One validated ``parallel_reduce`` call: the reduction's geometry and rules."""

    def __init__(self, arrays, func, op, axis, dtype, out, keepdims, initial, vectorized):
        from coremap._layout import normalize_inputs

        self.op = _Op(op)
        if func is not None and not callable(func):
            raise TypeError(f"func must be callable or None, got {type(func).__name__}")
        if not isinstance(keepdims, bool):
            raise TypeError(f"keepdims must be True or False, got {keepdims!r}")
        if not isinstance(vectorized, bool):
            raise TypeError(f"vectorized must be True or False, got {vectorized!r}")
        if vectorized and func is None:
            raise ValueError("vectorized=True needs a func")
        if dtype is not None and not self.op.takes_dtype:
            raise TypeError(f"op={self.op.name!r} does not take dtype= (NumPy's "
                            f"np.{self.op.name} has none)")
        if initial is not None and not self.op.takes_initial:
            raise TypeError(f"op={self.op.name!r} does not take initial=")
        self.dtype = None if dtype is None else np.dtype(dtype)
        if self.dtype is not None and self.dtype.kind not in "biufc":
            raise TypeError(f"dtype must be numeric, got {self.dtype}")
        self.inputs, self.shape = normalize_inputs(arrays)
        if func is None and len(self.inputs) != 1:
            raise TypeError(f"func=None reduces one array; got {len(self.inputs)} inputs "
                            "(pass a func to combine them)")
        if func is None and self.inputs[0].is_scalar:
            self.inputs[0].is_scalar = False  # a scalar reduces like a 0-d array
        self.func, self.vectorized = func, vectorized
        self.keepdims, self.initial = keepdims, initial
        ndim = len(self.shape)
        self.red = _normalize_axis(axis, ndim, self.op)
        self.kept = tuple(d for d in range(ndim) if d not in self.red)
        self.M = math.prod(self.shape[d] for d in self.kept)
        self.N = math.prod(self.shape[d] for d in self.red)
        self.out_shape = tuple(1 if d in self.red else self.shape[d] for d in range(ndim)) \
            if keepdims else tuple(self.shape[d] for d in self.kept)
        self.out = out
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
            if not out.flags.writeable:
                raise ValueError("out is read-only; pass a writeable array (or no out)")
            if out.shape != self.out_shape:
                raise ValueError(f"out has shape {out.shape}; the reduction gives "
                                 f"{self.out_shape}")
        self.axis = axis if axis is None else (self.red[0] if self.op.is_arg else self.red)

    def order_reduced(self) -> tuple[int, ...]:
        """Reduced axes in iteration order: C order, or memory order for a layout that
        would otherwise make every block strided (argmin/argmax keep C order: the
        index they return is a C-order one)."""
        ref = next((i.array for i in self.inputs if not i.is_scalar
                    and i.array.shape == self.shape), None)
        if ref is None or self.op.is_arg:
            return self.red
        return tuple(sorted(self.red, key=lambda d: -abs(ref.strides[d])))

    def rows(self, arr: np.ndarray, red: tuple[int, ...]) -> np.ndarray:
        """``arr`` broadcast to the shape as an ``(M, N)`` view (a copy if no view exists)."""
        v = arr if arr.shape == self.shape else np.broadcast_to(arr, self.shape)
        v = v.transpose(self.kept + red).reshape(self.M, self.N)
        return _layout.native(v)

    def element_index(self, m: int, n: int, red: tuple[int, ...]) -> tuple[int, ...]:
        """The index in the broadcast shape of row ``m``, column ``n``."""
        idx = [0] * len(self.shape)
        for axes, flat in ((self.kept, m), (red, n)):
            if axes:
                for d, i in zip(axes, np.unravel_index(flat, [self.shape[a] for a in axes])):
                    idx[d] = int(i)
        return tuple(idx)


def _operand(view: np.ndarray, scalar: bool) -> tuple[int, int, int, int]:
    """``(base pointer, offset, row stride, column stride)`` of a 2-D view, in elements."""
    if scalar:
        return view.__array_interface__["data"][0], 0, 0, 0
    item = view.dtype.itemsize
    M, N = view.shape
    rs, cs = (s // item for s in view.strides)
    low = min(0, (M - 1) * rs) + min(0, (N - 1) * cs)
    return view.__array_interface__["data"][0] + low * item, -low, rs, cs


def _combine(op: _Op, kop, P: np.ndarray, PI: np.ndarray | None) -> tuple:
    """Per-row result from the ``(M, nb)`` partials, in a fixed pairwise tree."""
    if op.is_arg:
        pick = np.argmin(P, axis=1) if op.name == "argmin" else np.argmax(P, axis=1)
        assert PI is not None  # arg reductions always carry their index partials
        rows = np.arange(P.shape[0])
        return P[rows, pick], PI[rows, pick]
    if kop in ("min", "max", "any", "all") and P.shape[1] > 1:
        return op.ufunc.reduce(P, axis=1), None  # exact: the order cannot matter
    while P.shape[1] > 1:
        k = P.shape[1]
        h = k // 2
        q = op.ufunc(P[:, 0:2 * h:2], P[:, 1:2 * h:2])
        P = np.concatenate([q, P[:, k - 1:]], axis=1) if k % 2 else q
    return P[:, 0], None


def _finish(call: _Call, values: np.ndarray, index: np.ndarray | None, map_dtype):
    """The result from the per-row values: initial, mean, dtype, keepdims, out."""
    op = call.op
    res_dtype = op.result_dtype(map_dtype, call.dtype)
    if op.is_arg:
        assert index is not None  # _combine returns an index for arg reductions
        res = index.astype(np.intp)
    else:
        res = values
        if call.initial is not None:
            res = op.ufunc(np.asarray(call.initial, dtype=res.dtype), res, dtype=res.dtype)
        if op.name == "mean":
            with np.errstate(all="ignore"):
                res = np.true_divide(res, call.N)
        res = res.astype(res_dtype, copy=False)
    res = res.reshape(call.out_shape)
    if call.out is not None:
        np.copyto(call.out, res, casting="same_kind")
        return call.out
    return res[()] if res.ndim == 0 else res


def _empty_result(call: _Call, map_dtype):
    """An empty reduction: NumPy's answer (its identity, its error, its warning)."""
    res = call.op.numpy(np.zeros(call.shape, map_dtype), call.axis, call.dtype,
                        call.keepdims, call.initial)
    if call.out is not None:
        np.copyto(call.out, res, casting="same_kind")
        return call.out
    return res


def _resolve(call: _Call):
    """``(kind, map dtype or None, kernel func, numba error)`` for the call's func."""
    from coremap._plan import _resolve_kind
    from coremap.kernels import Affine

    if call.func is None:
        return "identity", call.inputs[0].dtype, None, None
    kind, dt, _, numba_error = _resolve_kind(call.func, call.inputs, call.vectorized)
    kfunc = call.func
    if kind == "builtin":  # a built-in kernel: the same map, compiled by Numba
        aff: Affine = call.func
        kfunc = _affine_scalar(aff.a, aff.b, dt.str)
        kind = "numba"
    return kind, dt, kfunc, numba_error


@functools.lru_cache(maxsize=64)  # one function per (a, b, dtype): compiled once
def _affine_scalar(a, b, dtype_str):
    a, b = np.dtype(dtype_str).type(a), np.dtype(dtype_str).type(b)

    def affine(v):
        return a * v + b

    return affine


def _new_job(nblocks: int, per_block: int, workers: int, schedule: str, chunk_size):
    """The runner's job over the blocks (its counters count blocks, not elements)."""
    chunk = 1 if chunk_size is None else max(1, -(-chunk_size // per_block))
    if schedule == "guided":
        max_chunk = 1 << 62  # the timing caps a claim at TARGET_CHUNK_NS
    elif schedule == "dynamic":
        if chunk_size is None:
            chunk = max(1, -(-nblocks // (workers * DYNAMIC_CHUNKS_PER_WORKER)))
        max_chunk = chunk
    else:
        if chunk_size is None:
            chunk = max(1, -(-nblocks // workers))
        max_chunk = chunk
    timed = schedule != "static"
    return _runner.Job(
        nblocks, workers, schedule, chunk, max_chunk,
        target_ns=TARGET_CHUNK_NS if timed else 0, first_chunk=1 if timed else 0,
        escalate_ns=ESCALATE_NS, floor_ns=FLOOR_CHUNK_NS if timed else 0,
    )


def _partials(M: int, nb: int, acc: np.dtype, is_arg: bool):
    P = np.empty((M, nb), acc)
    return P, (np.empty((M, nb), np.int64) if is_arg else None)


def _run_compiled(call, kfunc, kop, map_dtype, acc, engine_name, opts, bar):
    """The compiled path: one fused block kernel over every block, on an engine."""
    from coremap._kernels import _reducers
    from coremap._tasks import native_task
    from coremap.engines import get_engine

    red = call.order_reduced()
    views, ptrs, meta, classes = [], [], [call.N, 0, 0], ""
    for inp in call.inputs:
        v = np.asarray(inp.array, inp.dtype) if inp.is_scalar else call.rows(inp.array, red)
        base, off, rs, cs = _operand(v, inp.is_scalar)
        views.append(v)
        ptrs.append(base)
        meta += [off, rs, cs]
        classes += "s" if inp.is_scalar else ("c" if cs == 1 or call.N == 1 else "g")
    B = min(BLOCK, call.N)
    nb = -(-call.N // B)
    meta[1:3] = [nb, B]
    P, PI = _partials(call.M, nb, acc, call.op.is_arg)
    ptrs += [P.ctypes.data] + ([] if PI is None else [PI.ctypes.data])
    in_dtypes = tuple(inp.dtype for inp in call.inputs)
    address = _reducers.block_kernel(kfunc, kop, in_dtypes, acc, classes)
    workers = opts["workers"] if engine_name != "serial" else 1
    job = _new_job(call.M * nb, B, workers, opts["schedule"], opts["chunk_size"])
    job.set_kernel(address, ptrs, meta, (views, P, PI))
    on_progress = None if bar is None else (
        lambda done: bar.update(min(done * B, call.M * call.N) - bar.n))
    get_engine(engine_name).run(job, native_task(), workers, on_progress=on_progress,
                                timeout=opts["timeout"])
    failed = job.failed_chunk
    if failed is not None:
        _raise_element_failure(call, kfunc, views, red, failed, B, nb)
    if job.done != call.M * nb:
        raise RuntimeError(f"only {job.done} of {call.M * nb} blocks were reduced "
                           "(internal error)")
    return _combine(call.op, kop, P, PI)


def _raise_element_failure(call, kfunc, views, red, failed, B, nb):
    """Re-run the failed blocks element by element to raise the function's exception."""
    from coremap._kernels import _numba

    lo, hi = failed
    start = (lo // nb) * call.N + (lo % nb) * B
    last = hi - 1
    stop = (last // nb) * call.N + min(call.N, (last % nb + 1) * B)
    getters = [
        (lambda i, v=v: v[()]) if inp.is_scalar else (lambda i, v=v: v[divmod(i, call.N)])
        for inp, v in zip(call.inputs, views)
    ]
    in_dtypes = tuple(inp.dtype for inp in call.inputs)
    found = _numba.first_failure(kfunc, in_dtypes, getters, start, stop)
    if found is None:
        raise RuntimeError(f"{_name(call.func)} failed in a block but not when re-run "
                           "element by element (is it non-deterministic?)")
    i, exc = found
    note_raised_by(exc, _name(call.func),
                   f"at element index {call.element_index(*divmod(i, call.N), red)}")
    raise exc


def _slabs(M: int, N: int, B: int):
    """``(m0, m1, n0, n1)`` pieces of whole blocks, about SLAB_BLOCKS * B elements each."""
    nb = -(-N // B)
    if nb >= SLAB_BLOCKS or M == 1:
        span = SLAB_BLOCKS * B
        for m in range(M):
            for n0 in range(0, N, span):
                yield m, m + 1, n0, min(N, n0 + span)
    else:
        per = max(1, (SLAB_BLOCKS * B) // max(N, 1))
        for m0 in range(0, M, per):
            yield m0, min(M, m0 + per), 0, N


def _fold_numpy(op: _Op, vals: np.ndarray, B: int, acc, P, PI) -> None:
    """Fold each block of the ``(rows, cols)`` slab with NumPy into ``P``/``PI``."""
    for j, n0 in enumerate(range(0, vals.shape[1], B)):
        seg = vals[:, n0:n0 + B]
        if op.is_arg:
            pick = np.argmin(seg, axis=1) if op.name == "argmin" else np.argmax(seg, axis=1)
            P[:, j] = seg[np.arange(seg.shape[0]), pick]
            PI[:, j] = pick + n0
        elif op.name in ("any", "all"):
            P[:, j] = getattr(np, op.name)(seg, axis=1)
        else:
            P[:, j] = op.ufunc.reduce(seg, axis=1, dtype=acc)


def _fold_kernel(kop, vals: np.ndarray, B: int, acc, P, PI) -> None:
    """Fold each block of the slab with the compiled identity kernel, as the fused path."""
    from coremap._kernels import _reducers

    rows, cols = vals.shape
    nb = -(-cols // B)
    base, off, rs, cs = _operand(vals, False)
    ptrs = [base, P.ctypes.data] + ([] if PI is None else [PI.ctypes.data])
    meta = [cols, nb, B, off, rs, cs]
    classes = "c" if cs == 1 or cols == 1 else "g"
    address = _reducers.block_kernel(None, kop, (vals.dtype,), acc, classes)
    if not _runner.run_inline(address, ptrs, meta, 0, rows * nb):
        raise RuntimeError("the identity block kernel failed (internal error)")


def _run_slabs(call, kind, map_dtype, backend, opts, bar):
    """The slab path: map a slab with parallel_map, fold its blocks, move on."""
    from coremap._api import parallel_map

    red = call.order_reduced()
    views = [inp.value if inp.is_scalar else call.rows(inp.array, red)
             for inp in call.inputs]
    B = min(BLOCK, call.N)
    nb = -(-call.N // B)
    deadline = None if opts["timeout"] is None else time.monotonic() + opts["timeout"]
    P = PI = kop = acc = None
    for m0, m1, n0, n1 in _slabs(call.M, call.N, B):
        if call.func is None:
            vals = views[0][m0:m1, n0:n1]
        else:
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise TimeoutError(f"the call did not finish within {opts['timeout']} s")
            pieces = tuple(v if inp.is_scalar else v[m0:m1, n0:n1]
                           for inp, v in zip(call.inputs, views))
            vals = parallel_map(pieces, call.func, vectorized=call.vectorized,
                                backend=backend, workers=opts["workers"],
                                chunk_size=opts["chunk_size"], schedule=opts["schedule"],
                                timeout=timeout, retries=opts["retries"])
        if P is None:
            map_dtype = vals.dtype
            acc = call.op.acc_dtype(map_dtype, call.dtype)
            kop = _kernel_op(call.op, (map_dtype, acc))
            P, PI = _partials(call.M, nb, acc, call.op.is_arg)
        j0 = n0 // B
        j1 = -(-n1 // B)
        sub = (P[m0:m1, j0:j1], None if PI is None else PI[m0:m1, j0:j1])
        # whole rows, or blocks of one row: the partials of a slab are contiguous
        if kop is not None:
            _fold_kernel(kop, vals, B, acc, *sub)
        else:
            _fold_numpy(call.op, vals, B, acc, *sub)
        if PI is not None:
            sub[1][...] += n0
        if bar is not None:
            bar.update((m1 - m0) * (n1 - n0))
    values, index = _combine(call.op, kop, P, PI)
    return values, index, map_dtype


def _engines(kind: str, size: int, backend, workers: int):
    """``(engine of the compiled path or None, parallel_map backend of the slab path)``."""
    if _config.in_worker() and backend in ("processes", "threads"):
        backend = "serial"  # nested inside a worker: never a pool of pools
    threads = "serial" if workers == 1 else "threads"
    if kind == "identity":  # nothing to map: the inputs are folded here, on threads
        return (backend if backend in ("serial", "threads") else threads), None
    if not isinstance(backend, str):
        return None, backend  # a cluster client: slabs mapped through parallel_map
    if kind == "numba":
        if backend == "auto":
            return threads, None
        return (backend, None) if backend in ("serial", "threads") else (None, backend)
    if backend != "auto":
        return None, backend
    if kind == "python":
        return None, ("processes" if workers > 1 and size >= PROCESS_MIN_SIZE else "serial")
    return None, threads


@overload
def parallel_reduce(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc | None = None,
    op: ReduceOp = "sum",
    *,
    axis: int | tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None,
    out: None = None,
    keepdims: bool = False,
    initial: Any = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> Any: ...


@overload
def parallel_reduce(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc | None = None,
    op: ReduceOp = "sum",
    *,
    axis: int | tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None,
    out: _OutT,
    keepdims: bool = False,
    initial: Any = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> _OutT: ...


def parallel_reduce(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc | None = None,
    op: ReduceOp = "sum",
    *,
    axis: int | tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None,
    out: np.ndarray[Any, Any] | None = None,
    keepdims: bool = False,
    initial: Any = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> Any:
    """Reduce ``func(arrays)`` with ``op`` on every core, without storing ``func(arrays)``.

    Bit for bit the same for any ``workers``, ``chunk_size``, ``schedule`` and
    engine: fixed blocks of ``BLOCK`` (4,096) elements along the reduced axes give
    partials, combined in a fixed pairwise tree (``sum`` as accurate as NumPy's).

    Parameters
    ----------
    arrays : array_like or tuple of array_like and scalars
        One input, or a tuple of inputs broadcast together as a ufunc would.
    func : callable, optional
        What ``parallel_map`` accepts: a scalar function (compiled with Numba
        and fused into the reduction), a NumPy ufunc, a built-in kernel, a chunk
        function with ``vectorized=True``, or a plain Python function (run on
        worker processes). ``None`` reduces the single input itself.
    op : str or numpy.ufunc
        ``"sum"``, ``"prod"``, ``"min"``, ``"max"``, ``"any"``, ``"all"``,
        ``"mean"``, ``"argmin"``, ``"argmax"``, or a binary ufunc with a
        ``reduce`` (``np.add``, ``np.maximum``, ``np.logical_or``, ...). NumPy's
        semantics: min/max propagate NaN, argmin/argmax return the first
        extreme (or the first NaN), an empty reduction gives the identity or
        NumPy's error.
    axis : None, int or tuple of ints
        Axes to reduce (negative counts from the end); ``None``: all of them.
        argmin/argmax take an int or None, and return C-order indices.
    dtype : dtype, optional
        Accumulator and result dtype, for ``sum``, ``prod``, ``mean`` and ufunc ops.
        By default NumPy's: integers below the platform int sum in ``int64``.
    out : ndarray, optional
        Written in place (``"same_kind"`` cast) and returned.
    keepdims : bool
        Keep the reduced axes with length one.
    initial : scalar, optional
        The starting value (``sum``, ``prod``, ``min``, ``max``, ufunc ops).
    vectorized, backend, workers, chunk_size, schedule, progress, timeout, retries
        As in :func:`parallel_map` (``chunk_size`` rounded to whole blocks).

    Returns
    -------
    numpy scalar or ndarray
        The reduction, in NumPy's result dtype (``out`` if given).

    Raises
    ------
    TypeError, ValueError, numpy.exceptions.AxisError
        Invalid arguments, raised before any work starts.
    Exception
        The first exception raised by ``func``, with its own type.

    Notes
    -----
    Compiled functions, ``func=None`` and built-in kernels run fused on the serial
    or thread engine (one kernel maps and folds each block; no array of ``f(x)``).
    Other functions, processes and clusters map ``SLAB_BLOCKS`` blocks at a time
    with :func:`parallel_map`, folded here by the same kernel: the same bits.

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> x = np.arange(10.0)
    >>> float(cm.parallel_reduce(x, lambda v: v * v))
    285.0
    >>> cm.parallel_reduce(x.reshape(2, 5), op="max", axis=1)
    array([4., 9.])
    >>> int(cm.parallel_reduce(x, op="argmax"))
    9
    """
    backend, workers, chunk_size = _check_options(progress, schedule, backend, workers,
                                                  chunk_size, timeout, retries)
    items = arrays if isinstance(arrays, tuple) else (arrays,)
    container = _containers.find(items)
    if container is not None:  # pandas, xarray, masked or dask in (see _containers.py)
        return _reduce_container(container, items, func, op, axis, dtype, out, keepdims,
                                 initial, vectorized, backend, workers, chunk_size,
                                 schedule, progress, timeout, retries)
    call = _Call(arrays, func, op, axis, dtype, out, keepdims, initial, vectorized)
    opts = {"workers": workers, "chunk_size": chunk_size, "schedule": schedule,
            "timeout": timeout, "retries": retries}
    return _reduce(call, backend, opts, progress)


def _check_options(progress, schedule, backend, workers, chunk_size, timeout, retries):
    """The run options checked (before any work): ``(backend, workers, chunk_size)``."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if schedule not in _config.SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, _config.SCHEDULES))}, "
                         f"got {schedule!r}")
    backend = _config.default_backend() if backend is None else _config.check_backend(backend)
    workers = _config.check_positive_int(
        _config.default_workers() if workers is None else workers, "workers")
    if chunk_size is not None:
        chunk_size = _config.check_positive_int(chunk_size, "chunk_size")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return backend, workers, chunk_size


def _reduce(call: _Call, backend, opts: dict, progress: bool):
    """Pick the path (compiled, slabs or empty) for a validated call and run it."""
    func, workers, timeout = call.func, opts["workers"], opts["timeout"]
    kind, map_dtype, kfunc, numba_error = _resolve(call)
    compiled, map_backend = _engines(kind, call.M * call.N, backend, workers)
    if map_dtype is not None:
        acc = call.op.acc_dtype(map_dtype, call.dtype)
        _check_out_dtype(call, map_dtype)
    if call.M * call.N == 0:
        return _empty_result(call, map_dtype if map_dtype is not None else np.float64)
    if compiled == "serial" and timeout is not None:
        raise ValueError("timeout= needs an engine that can stop waiting: use "
                         "backend='threads' or 'processes'")
    kop = None if map_dtype is None else _kernel_op(
        call.op, tuple(i.dtype for i in call.inputs) + (map_dtype, acc))
    if compiled is not None and kop is None:
        map_backend = compiled  # no block kernel for these dtypes: NumPy folds the slabs
        compiled = None
    if kind == "python" and backend == "auto" and map_backend == "processes":
        from coremap._errors import CoremapWarning

        warnings.warn(f"Numba could not compile {_name(func)} ({numba_error}); it runs as "
                      "plain Python in worker processes. Pass backend='processes' to "
                      "silence this warning.", CoremapWarning, stacklevel=3)
    bar = _bar(call, func, progress)
    try:
        if compiled is not None:
            values, index = _run_compiled(call, kfunc, kop, map_dtype, acc, compiled, opts, bar)
        else:
            values, index, map_dtype = _run_slabs(call, kind, map_dtype, map_backend, opts, bar)
    finally:
        if bar is not None:
            bar.close()
    return _finish(call, values, index, map_dtype)


def _reduce_container(kind, items, func, op, axis, dtype, out, keepdims, initial,
                      vectorized, backend, workers, chunk_size, schedule, progress,
                      timeout, retries):
    """``parallel_reduce`` on the plain data of containers, rebuilt (``_containers.py``)."""
    from coremap._api import parallel_map

    _containers.check_out(kind, out)
    run = {"backend": backend, "workers": workers, "chunk_size": chunk_size,
           "schedule": schedule, "progress": progress, "timeout": timeout,
           "retries": retries}

    def reduce(plain, ax, keep):
        return parallel_reduce(plain, func, op, axis=ax, dtype=dtype, keepdims=keep,
                               initial=initial, vectorized=vectorized, **run)

    def map_(containers):
        if func is None:
            return containers[0]
        return parallel_map(containers, func, vectorized=vectorized, **run)

    return _containers.reduce_containers(kind, items, op, axis, keepdims,
                                         {"dtype": dtype, "initial": initial}, reduce, map_)


def _check_out_dtype(call: _Call, map_dtype) -> None:
    if call.out is None:
        return
    res = call.op.result_dtype(map_dtype, call.dtype)
    if not np.can_cast(res, call.out.dtype, "same_kind"):
        raise TypeError(f"cannot store the {res} result of op={call.op.name!r} into out of "
                        f"dtype {call.out.dtype} (casting rule 'same_kind')")


def _bar(call: _Call, func, progress: bool):
    if not progress:
        return None
    import sys

    from tqdm.auto import tqdm

    class _Bar(tqdm):
        monitor_interval = 0  # updated by the call itself: no monitor thread

    return _Bar(total=call.M * call.N, unit="el", unit_scale=True, file=sys.stderr,
                desc=f"reduce {_name(func) if func is not None else call.op.name}")
