"""The planner: validate a call, pick its kernel and engine, say why.

``make_plan`` does every check before any work starts (nothing is allocated,
no thread is started, no chunk runs): inputs, ``out``, ``dtype``, options. It
resolves the kernel kind and the result dtype (compiling with Numba if needed,
cached), then chooses the engine. ``explain`` shows the plan; ``parallel_map``
executes it (``_execute.py``).

How ``backend="auto"`` chooses:
1. one worker -> serial;
2. a compiled kernel (built-in or Numba), a ufunc, a vectorized function -> threads.
   The calling thread starts alone and wakes the other workers only once its
   timed chunks show more than ``ESCALATE_NS`` of work left (``_execute.py``),
   so small inputs never leave the calling thread: the crossover is measured
   per call, in time, rather than guessed as an element count;
3. a scalar function Numba cannot compile -> the process engine, with one warning
   naming Numba's error; below ``PROCESS_MIN_SIZE`` elements it runs serially,
   since a process round trip costs more than such a call.
Inside a process-engine worker every call runs serially (no nested pools).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from coremap import _config
from coremap._layout import Input, memory_order, normalize_inputs
from coremap.kernels import Affine

# Chunking. Guided chunks shrink from remaining/(2*workers) to MIN_CHUNK, and
# never exceed MAX_CHUNK elements (nor, once timed, TARGET_CHUNK_NS of work:
# see _execute.py). Measured with coremap bench on W1 into out= at 10^7: chunks
# of 2^16 and 2^18 elements ran alike (5.1 and 5.4 ms), and W3 sorted balances
# on the small guided tail; the ufunc/vectorized values pay a Python call per chunk.
MIN_CHUNK_NATIVE = 1_024
MAX_CHUNK_NATIVE = 1 << 16
MIN_CHUNK_NUMPY = 8_192
MAX_CHUNK_NUMPY = 1 << 18
DYNAMIC_CHUNKS_PER_WORKER = 16

# Below this many elements, auto runs a plain Python function serially rather
# than on worker processes: a warm process round trip on 10^3 elements measured
# 1.1 ms, about what 1,000 elements of a ~1 us function cost in the caller.
PROCESS_MIN_SIZE = 1_000

KINDS = {
    "builtin": "built-in Cython kernel (no GIL, no compile)",
    "numba": "scalar function compiled by Numba into a GIL-free chunk kernel",
    "ufunc": "NumPy ufunc on each chunk (NumPy releases the GIL in its loops)",
    "vectorized": "chunk function (vectorized=True) on each chunk",
    "python": "scalar Python function called per element (holds the GIL)",
}


@dataclass(repr=False)
class Plan:
    """How one ``parallel_map`` call runs, and why. ``print`` it, or look at the fields."""

    engine: str
    kind: str
    func_name: str
    shape: tuple[int, ...]
    size: int
    in_dtypes: tuple[np.dtype, ...]
    out_dtype: np.dtype | None  # None: known after the first chunk runs
    order: str
    workers: int
    schedule: str
    chunk: int
    max_chunk: int
    reasons: list[str] = field(default_factory=list)
    warning: str | None = None
    # what execution needs (not part of the printed plan)
    func: object = None
    inputs: list[Input] = field(default_factory=list)
    out: np.ndarray | None = None
    timeout: float | None = None
    retries: int = 0
    adapter: object = None  # a cluster engine's adapter
    auto: bool = False  # chosen by backend="auto" (may still fall back to serial)

    def __str__(self) -> str:
        dtypes = ", ".join(str(d) for d in self.in_dtypes)
        out = str(self.out_dtype) if self.out_dtype is not None else "from the first chunk"
        lines = [
            f"coremap plan for {self.func_name}",
            f"  engine   : {self.engine} ({self.workers} worker{'s' if self.workers != 1 else ''})",
            f"  kernel   : {self.kind}: {KINDS[self.kind]}",
            f"  elements : {self.size:,} in shape {self.shape}, {self.order} order",
            f"  dtypes   : ({dtypes}) -> {out}",
            f"  chunks   : {self.schedule}, "
            f"{self.chunk:,} to {self.max_chunk:,} elements"
            if self.schedule == "guided"
            else f"  chunks   : {self.schedule}, {self.chunk:,} elements",
            "  why      :",
        ]
        lines += [f"    - {r}" for r in self.reasons]
        if self.warning:
            lines.append(f"  warning  : {self.warning}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle) -> None:  # IPython
        p.text(str(self))


def _func_name(func: object) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


def _check_out(out: object, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (or no out)")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, but the inputs broadcast to {shape}")
    if out.dtype.kind not in "biufc":
        raise TypeError(f"out has dtype {out.dtype}; expected a numeric dtype")
    return out


def _ufunc_result_dtype(ufunc: np.ufunc, inputs: list[Input]) -> np.dtype:
    # NumPy's own promotion, NEP 50 included: empty arrays and the scalars as given.
    probes = [i.value if i.is_scalar else np.empty(0, i.dtype) for i in inputs]
    try:
        res = ufunc(*probes)
    except TypeError as exc:
        dtypes = ", ".join(str(i.dtype) for i in inputs)
        raise TypeError(
            f"{ufunc.__name__} does not support inputs of dtype ({dtypes}): {exc}") from None
    return np.asarray(res).dtype


def _ufunc_kind(func, inputs):
    """A NumPy ufunc, or a ``@numba.vectorize``/``@guvectorize`` one, run on chunks."""
    name = getattr(func, "__name__", repr(func))
    if func.nin != len(inputs):
        raise TypeError(f"{name} takes {func.nin} inputs, got {len(inputs)}")
    if func.nout != 1:
        raise TypeError(f"{name} has {func.nout} outputs; parallel_map supports one")
    core = getattr(getattr(func, "gufunc_builder", None), "signature", None)
    if core is not None and core.replace("()", "").strip(",->") != "":
        raise TypeError(f"{name} is a generalized ufunc with core dimensions {core!r}; "
                        "parallel_map applies element-wise functions (signature '(),()->()')")
    what = "a NumPy ufunc" if isinstance(func, np.ufunc) else "a @numba.vectorize ufunc"
    return "ufunc", _ufunc_result_dtype(func, inputs), what, None


def _resolve_kind(func, inputs, vectorized):
    """Kernel kind, result dtype (or None), reasons and (for "python") why not compiled."""
    if vectorized:
        return "vectorized", None, "vectorized=True: the function gets whole chunks", None
    if isinstance(func, np.ufunc):
        return _ufunc_kind(func, inputs)
    if isinstance(func, Affine):
        if len(inputs) != 1:
            raise TypeError(f"affine takes one input, got {len(inputs)}")
        dt = np.result_type(inputs[0].dtype, func.a, func.b)
        return "builtin", dt, "a built-in kernel, compiled at install", None
    from coremap._kernels import _numba

    if _numba.is_numba_ufunc(func):
        return _ufunc_kind(func, inputs)
    why_not = _numba.not_compilable_reason(func)
    if why_not is not None:
        return "python", None, "not a function Numba compiles", why_not
    in_dtypes = tuple(i.dtype for i in inputs)
    try:
        _, dt = _numba.resolve(func, in_dtypes)
    except _numba.NotCompilable as exc:
        return "python", None, "Numba cannot compile it in nopython mode", str(exc)
    shape = np.broadcast_shapes(*(i.array.shape for i in inputs))
    mismatch = _numba.guard(func, in_dtypes, dt, inputs, shape)
    if mismatch is not None:
        return "python", None, "the compiled kernel disagrees with Python", mismatch
    why = ["Numba compiled it in nopython mode for these dtypes",
           *_numba.notes(func, in_dtypes)]
    return "numba", dt, why, None


def make_plan(
    arrays,
    func,
    *,
    out=None,
    dtype=None,
    vectorized=False,
    backend=None,
    workers=None,
    chunk_size=None,
    schedule="guided",
    timeout=None,
    retries=0,
) -> Plan:
    """Validate a call and decide how it runs. Raises before any work on bad input."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__} {func!r}")
    if not isinstance(vectorized, bool):
        raise TypeError(f"vectorized must be True or False, got {vectorized!r}")
    if schedule not in _config.SCHEDULES:
        raise ValueError(
            f"schedule must be one of {', '.join(map(repr, _config.SCHEDULES))}, got {schedule!r}"
        )
    backend = _config.default_backend() if backend is None else _config.check_backend(backend)
    if workers is None:
        workers = _config.default_workers()
    workers = _config.check_positive_int(workers, "workers")
    if chunk_size is not None:
        chunk_size = _config.check_positive_int(chunk_size, "chunk_size")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    requested = None
    if dtype is not None:
        requested = np.dtype(dtype)
        if requested.kind not in "biufc":
            raise TypeError(f"dtype must be numeric, got {requested}")

    inputs, shape = normalize_inputs(arrays)
    if out is not None:
        out = _check_out(out, shape)
        if requested is not None and requested != out.dtype:
            raise TypeError(f"dtype={requested} disagrees with out.dtype={out.dtype}")
        requested = out.dtype
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    adapter = None
    if not isinstance(backend, str):
        from coremap.engines import _cluster  # loaded only for a cluster client

        adapter = _cluster.adapter_for(backend)
    elif retries:
        raise ValueError("retries= re-runs chunks on a cluster backend (ipyparallel, dask); "
                         f"backend={backend!r} stops at the first error instead")
    if _config.in_worker() and backend in ("processes", "threads"):
        backend = "serial"  # nested inside a worker: bounded, never a pool of pools

    kind, result, why_kind, numba_error = _resolve_kind(func, inputs, vectorized)
    if (result is not None and requested is not None
            and not np.can_cast(result, requested, "same_kind")):
        who = "out" if out is not None else "dtype"
        raise TypeError(
            f"cannot store the {result} results of {_func_name(func)} into {who} of dtype "
            f"{requested} (casting rule 'same_kind')"
        )
    out_dtype = requested if requested is not None else result
    size = math.prod(shape)
    if isinstance(why_kind, list):  # a compiled function: the first reason, then notes
        reasons = [f"{_func_name(func)}: {why_kind[0]}", *why_kind[1:]]
    else:
        reasons = [f"{_func_name(func)}: {why_kind}"]
    warning = None

    native = kind in ("builtin", "numba")
    if adapter is not None:
        engine = adapter.name
        workers = adapter.engines()
        reasons.append(f"a {adapter.name} client was given: {workers} engine slots, "
                       "chunks balanced by its scheduler, each run with the serial engine")
    elif backend == "auto":
        if kind == "python":
            engine = "processes" if workers > 1 and size >= PROCESS_MIN_SIZE else "serial"
            reasons.append(
                "a function that holds the GIL gains nothing from threads: worker processes "
                "over shared memory" if engine == "processes" else
                f"{size} elements of a GIL-holding function: too few for worker processes"
            )
            warning = (
                f"{numba_error}. It runs as plain Python in worker processes; pass "
                "backend='processes' to silence this warning."
            )
        elif workers == 1:
            engine = "serial"
            reasons.append("workers=1")
        else:
            engine = "threads"
            reasons.append(
                "the kernel runs without the GIL"
                if native
                else "NumPy releases the GIL inside its loops"
            )
            reasons.append(
                "the calling thread starts alone; the other workers join once the timed "
                "chunks show that the remaining work outweighs waking them"
            )
    else:
        engine = backend
        reasons.append(f"backend={backend!r} was asked for")
        if engine == "threads" and kind == "python":
            reasons.append("note: a function that holds the GIL does not speed up on threads")
        if engine == "processes" and kind == "python":
            reasons.append(f"{numba_error}: plain Python in each worker")
    if engine == "serial":
        workers = 1
        if timeout is not None:
            raise ValueError(
                "timeout= needs an engine that can stop a stuck chunk: use "
                "backend='processes' (or 'threads', which stops waiting)"
            )

    if native:
        min_chunk, max_chunk = MIN_CHUNK_NATIVE, MAX_CHUNK_NATIVE
    else:
        min_chunk, max_chunk = MIN_CHUNK_NUMPY, MAX_CHUNK_NUMPY
    if schedule == "guided":
        chunk = chunk_size or min_chunk
        max_chunk = max(max_chunk, chunk)
    elif schedule == "dynamic":
        chunk = chunk_size or max(min_chunk, -(-size // (workers * DYNAMIC_CHUNKS_PER_WORKER)))
        max_chunk = chunk
    else:  # static: one block per worker
        chunk = chunk_size or max(1, -(-size // workers))
        max_chunk = chunk

    return Plan(
        engine=engine,
        kind=kind,
        func_name=_func_name(func),
        shape=shape,
        size=size,
        in_dtypes=tuple(i.dtype for i in inputs),
        out_dtype=out_dtype,
        order=memory_order(inputs, shape, out),
        workers=workers,
        schedule=schedule,
        chunk=chunk,
        max_chunk=max_chunk,
        reasons=reasons,
        warning=warning,
        func=func,
        inputs=inputs,
        out=out,
        timeout=timeout,
        retries=retries,
        adapter=adapter,
        auto=backend == "auto",
    )
