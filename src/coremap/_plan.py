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
   timed chunks show more than ``ESCALATE_NS`` of work left (``engines/_base.py``),
   so small inputs never leave the calling thread: the crossover is measured
   per call, in time, rather than guessed as an element count;
3. a scalar function Numba cannot compile (or whose kernel the semantic guard,
   ``_kernels/_guard.py``, finds giving another answer than Python) -> the process
   engine, with one warning naming Numba's error or the element that differs;
   below ``PROCESS_MIN_SIZE`` elements it runs serially, since a process round
   trip costs more than such a call.
Inside a process-engine worker every call runs serially (no nested pools).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from coremap import _config
from coremap._functions import func_name as _func_name
from coremap._layout import Input, memory_order, normalize_inputs
from coremap.kernels import BuiltinKernel

# Chunking. Guided chunks shrink from remaining/(2*workers) to MIN_CHUNK, and
# never exceed MAX_CHUNK elements (nor, once timed, TARGET_CHUNK_NS of work:
# see engines/_base.py). Measured with coremap bench on W1 into out= at 10^7: chunks
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

# Kinds whose kernel is native code the runner calls without the GIL.
NATIVE_KINDS = frozenset({"builtin", "numba"})

KINDS = {
    "builtin": "built-in Cython kernel (no GIL, no compile)",
    "numba": "scalar function compiled by Numba into a GIL-free chunk kernel",
    "ufunc": "NumPy ufunc on each chunk (NumPy releases the GIL in its loops)",
    "vectorized": "chunk function (vectorized=True) on each chunk",
    "python": "scalar Python function called per element (holds the GIL)",
}


# The keyword options of ``parallel_map`` and their defaults: the one table that
# the fast path's key is derived from (``fast_key``), so a new keyword cannot
# silently skip the planner's checks (tests/test_house.py compares this table
# with parallel_map's signature).
OPTION_DEFAULTS: dict[str, object] = {
    "out": None,
    "dtype": None,
    "vectorized": False,
    "backend": None,
    "workers": None,
    "chunk_size": None,
    "schedule": "guided",
    "progress": False,
    "timeout": None,
    "retries": 0,
}
# Options a cached call may carry: a value off its default is part of the fast
# path's key, so the first call with it goes through the planner (which checks
# it) and the calls that repeat it skip the planner. ``out`` is checked on every
# call by the fast path itself. Every other option must be at its default.
# (Planning costs ~95 us: a 10^4-element W2 call with workers=1 took 0.58x the
# time of one Numba thread through the planner, 2-core AMD EPYC.)
KEYED_OPTIONS = ("dtype", "backend", "workers", "chunk_size", "schedule")
PLAIN_KEY = ("plain",)
PLAIN_OUT_KEY = ("plain", "out")


def _compile_fast_key() -> Callable[..., tuple | None]:
    # Generated from the table, as dataclasses and namedtuple generate their methods:
    # a call that must pass every option by name (a missing or unknown one is a
    # TypeError on the first call), compared by identity, in ~0.2 us. A generic loop
    # over locals() measured 0.8-1.2 us, a fifth of a cached call's time (W5).
    # Identity is conservative: an equal but distinct default takes the full path,
    # and a keyed value is keyed with its type (workers=2 and workers=2.0 differ).
    names = list(OPTION_DEFAULTS)
    namespace: dict = {f"_d{k}": v for k, v in enumerate(OPTION_DEFAULTS.values())}
    namespace.update(_plain=PLAIN_KEY, _plain_out=PLAIN_OUT_KEY)
    ident = {n: f"{n} is _d{k}" for k, n in enumerate(names)}
    fixed = [n for n in names if n not in KEYED_OPTIONS and n != "out"]
    keyed = ", ".join(f"type({n}), {n}" for n in KEYED_OPTIONS)
    source = (
        f"def fast_key(*, {', '.join(names)}):\n"
        f"    if not ({' and '.join(ident[n] for n in fixed)}):\n"
        f"        return None\n"
        f"    if {' and '.join(ident[n] for n in KEYED_OPTIONS)}:\n"
        f"        return _plain if out is None else _plain_out\n"
        f"    return (out is None, {keyed})\n"
    )
    exec(source, namespace)
    function = namespace["fast_key"]
    function.__doc__ = ("The options' part of the fast path's key, or None when an option "
                        "that the fast path does not carry is off its default.")
    function.__module__ = __name__
    return function


fast_key = _compile_fast_key()


@dataclass(frozen=True, repr=False)
class Plan:
    """How one ``parallel_map`` call runs, and why: what :func:`coremap.explain` returns.

    ``print`` it, or read the fields. A plan is a frozen description; running a
    call never changes it.

    Attributes
    ----------
    engine : str
        ``"serial"``, ``"threads"``, ``"processes"`` or a cluster engine's name.
    kind : str
        The kernel kind (see ``KINDS``).
    func_name : str
        The function's qualified name.
    shape : tuple of int
        The broadcast shape.
    size : int
        The number of elements.
    in_dtypes : tuple of numpy.dtype
        The inputs' dtypes as kernels see them.
    out_dtype : numpy.dtype or None
        The result dtype; None when only the function's first results tell it.
    order : {"C", "F"}
        The iteration order.
    workers : int
        Workers (or a cluster's engine slots).
    schedule : str
        ``"guided"``, ``"dynamic"`` or ``"static"``.
    chunk, max_chunk : int
        Chunk lengths in elements.
    reasons : tuple of str
        Why each choice was made.
    warning : str or None
        A warning ``parallel_map`` emits for this call.
    """

    engine: str
    kind: str
    func_name: str
    shape: tuple[int, ...]
    size: int
    in_dtypes: tuple[np.dtype, ...]
    out_dtype: np.dtype | None
    order: str
    workers: int
    schedule: str
    chunk: int
    max_chunk: int
    reasons: tuple[str, ...] = ()
    warning: str | None = None

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


@dataclass(eq=False, slots=True)
class Call:
    """One call being run: its frozen :class:`Plan` plus what execution needs.

    The plan's fields are copied here (engines and kernels read them on every
    call, so no indirection), with ``out_dtype`` the one that may still be
    learnt while running (from the function's first results). Engines receive
    a ``Call``; users only ever see the ``Plan``. Build one with :meth:`of`.
    """

    plan: Plan
    engine: str
    kind: str
    func_name: str
    shape: tuple[int, ...]
    size: int
    in_dtypes: tuple[np.dtype, ...]
    out_dtype: np.dtype | None
    order: str
    workers: int
    schedule: str
    chunk: int
    max_chunk: int
    warning: str | None
    func: object
    inputs: list[Input]
    out: np.ndarray | None
    timeout: float | None
    retries: int
    adapter: object  # a cluster engine's adapter, or None

    @classmethod
    def of(cls, plan: Plan, func, inputs, out, timeout, retries, adapter) -> Call:
        """The call that runs ``plan``."""
        p = plan  # positional: this runs on every call that is planned
        return cls(p, p.engine, p.kind, p.func_name, p.shape, p.size, p.in_dtypes,
                   p.out_dtype, p.order, p.workers, p.schedule, p.chunk, p.max_chunk,
                   p.warning, func, inputs, out, timeout, retries, adapter)


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
    if isinstance(func, BuiltinKernel):
        dt = func.result_dtype(tuple(i.dtype for i in inputs))
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


@dataclass(frozen=True)
class _Options:
    """The call's options, checked and resolved (defaults filled in)."""

    backend: object  # a name from _config.BACKENDS, or a cluster client
    workers: int
    chunk_size: int | None
    schedule: str
    timeout: float | None
    requested: np.dtype | None  # the result dtype asked for (dtype= or out.dtype)
    retries: int
    vectorized: bool


def _check_options(func, *, dtype, vectorized, backend, workers, chunk_size, schedule,
                   timeout, retries) -> _Options:
    """Check every option (not the inputs); raise before any work on a bad one."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__} {func!r}")
    if not isinstance(vectorized, bool):
        raise TypeError(f"vectorized must be True or False, got {vectorized!r}")
    if schedule not in _config.SCHEDULES:
        raise ValueError(
            f"schedule must be one of {', '.join(map(repr, _config.SCHEDULES))}, got {schedule!r}"
        )
    backend = _config.default_backend() if backend is None else _config.check_backend(backend)
    workers = _config.default_workers() if workers is None else _config.check_workers(workers)
    if chunk_size is not None:
        chunk_size = _config.check_positive_int(chunk_size, "chunk_size",
                                                maximum=_config.MAX_ELEMENTS)
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
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if retries and isinstance(backend, str):
        raise ValueError("retries= re-runs chunks on a cluster backend (ipyparallel, dask); "
                         f"backend={backend!r} stops at the first error instead")
    return _Options(backend, workers, chunk_size, schedule, timeout, requested, retries,
                    vectorized)


def _check_arity(func, nin: int, vectorized: bool) -> None:
    """A Python function that cannot take ``nin`` arguments: TypeError now, not in a worker."""
    if isinstance(func, (np.ufunc, BuiltinKernel)) or hasattr(func, "nin"):
        return  # ufuncs (NumPy's and Numba's) and built-ins: checked with their kind
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins and extension callables: no signature
        return
    try:
        signature.bind(*range(nin))
    except TypeError as exc:
        what = "chunk" if vectorized else "scalar"
        raise TypeError(
            f"{_func_name(func)} cannot be called with {nin} {what} argument"
            f"{'s' if nin != 1 else ''} (one per input): {exc}"
        ) from None


def _choose_kernel(func, inputs, opts: _Options, out):
    """``(kind, out_dtype, why, numba_error)``: the kernel kind and the result dtype."""
    kind, result, why_kind, numba_error = _resolve_kind(func, inputs, opts.vectorized)
    requested = opts.requested
    if (result is not None and requested is not None
            and not np.can_cast(result, requested, "same_kind")):
        who = "out" if out is not None else "dtype"
        raise TypeError(
            f"cannot store the {result} results of {_func_name(func)} into {who} of dtype "
            f"{requested} (casting rule 'same_kind')"
        )
    out_dtype = requested if requested is not None else result
    if isinstance(why_kind, str):
        why_kind = [why_kind]  # a compiled function gives its reason, then notes
    return kind, out_dtype, why_kind, numba_error


def _choose_engine(kind, opts: _Options, adapter, size, func_name, numba_error):
    """``(engine, workers, reasons, warning)`` for a call of ``kind`` on ``size`` elements."""
    backend, workers = opts.backend, opts.workers
    reasons: list[str] = []
    warning = None
    if adapter is not None:
        engine = adapter.name
        workers = adapter.engines()
        reasons.append(f"a {adapter.name} client was given: {workers} engine slots, "
                       "chunks balanced by its scheduler, each run with the serial engine")
    elif _config.in_worker() and backend in ("auto", "processes", "threads"):
        # nested inside a worker: bounded, never a pool of pools
        engine = "serial"
        reasons.append("called inside a worker process: runs serially (no nested pools)")
    elif backend == "auto":
        engine, why, warning = _auto_engine(kind, workers, size, func_name, numba_error)
        reasons += why
    else:
        engine = backend
        reasons.append(f"backend={backend!r} was asked for")
        if engine == "threads" and kind == "python":
            reasons.append("note: a function that holds the GIL does not speed up on threads")
        if engine == "processes" and kind == "python":
            reasons.append(f"{numba_error}: plain Python in each worker")
    if engine == "serial":
        workers = 1
        if opts.timeout is not None:
            raise ValueError(
                "timeout= needs an engine that can stop a stuck chunk: use "
                "backend='processes' or 'threads'"
            )
    return engine, workers, reasons, warning


def _auto_engine(kind, workers, size, func_name, numba_error):
    """``backend="auto"``: ``(engine, reasons, warning)`` (see the module docstring)."""
    if kind == "python":
        engine = "processes" if workers > 1 and size >= PROCESS_MIN_SIZE else "serial"
        why = ("a function that holds the GIL gains nothing from threads: worker processes "
               "over shared memory" if engine == "processes" else
               f"{size} elements of a GIL-holding function: too few for worker processes")
        warning = (
            f"{numba_error}. It runs as plain Python in worker processes; pass "
            "backend='processes' to silence this warning."
        )
        return engine, [why], warning
    if workers == 1:
        return "serial", ["workers=1"], None
    return "threads", [
        "the kernel runs without the GIL" if kind in NATIVE_KINDS
        else "NumPy releases the GIL inside its loops",
        "the calling thread starts alone; the other workers join once the timed "
        "chunks show that the remaining work outweighs waking them",
    ], None


def _chunking(kind, schedule, chunk_size, size, workers) -> tuple[int, int]:
    """``(chunk, max_chunk)`` for the schedule (see the constants above)."""
    if kind in NATIVE_KINDS:
        min_chunk, max_chunk = MIN_CHUNK_NATIVE, MAX_CHUNK_NATIVE
    else:
        min_chunk, max_chunk = MIN_CHUNK_NUMPY, MAX_CHUNK_NUMPY
    if schedule == "guided":
        chunk = chunk_size or min_chunk
        return chunk, max(max_chunk, chunk)
    if schedule == "dynamic":
        chunk = chunk_size or max(min_chunk, -(-size // (workers * DYNAMIC_CHUNKS_PER_WORKER)))
        return chunk, chunk
    chunk = chunk_size or max(1, -(-size // workers))  # static: one block per worker
    return chunk, chunk


def plan_call(arrays, func, **options) -> Call:
    """Validate a call and decide how it runs: the :class:`Call` that ``execute`` runs.

    Raises before any work on bad input (nothing allocated, no worker started).
    ``options`` are ``parallel_map``'s keywords except ``progress``.
    """
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
    out = options.pop("out", None)
    options.pop("progress", None)
    opts = _check_options(func, **{**_PLANNER_DEFAULTS, **options})
    inputs, shape = normalize_inputs(arrays)
    size = math.prod(shape)
    if size > _config.MAX_ELEMENTS:
        raise ValueError(
            f"the inputs broadcast to shape {shape}, whose {size:,} elements overflow a "
            f"64-bit index (at most {_config.MAX_ELEMENTS:,})")
    requested = opts.requested
    if out is not None:
        out = _check_out(out, shape)
        if requested is not None and requested != out.dtype:
            raise TypeError(f"dtype={requested} disagrees with out.dtype={out.dtype}")
        opts = dataclasses.replace(opts, requested=out.dtype)
    adapter = None
    if not isinstance(opts.backend, str):
        from coremap import engines  # a cluster adapter is imported only for its client

        adapter = engines.adapter_for(opts.backend)
    _check_arity(func, len(inputs), opts.vectorized)

    kind, out_dtype, why_kind, numba_error = _choose_kernel(func, inputs, opts, out)
    name = _func_name(func)
    engine, workers, reasons, warning = _choose_engine(kind, opts, adapter, size, name,
                                                       numba_error)
    chunk, max_chunk = _chunking(kind, opts.schedule, opts.chunk_size, size, workers)
    plan = Plan(
        engine=engine, kind=kind, func_name=name, shape=shape, size=size,
        in_dtypes=tuple(i.dtype for i in inputs), out_dtype=out_dtype,
        order=memory_order(inputs, shape, out), workers=workers, schedule=opts.schedule,
        chunk=chunk, max_chunk=max_chunk,
        reasons=(f"{name}: {why_kind[0]}", *why_kind[1:], *reasons),
        warning=warning,
    )
    return Call.of(plan, func, inputs, out, opts.timeout, opts.retries, adapter)


_PLANNER_DEFAULTS = {k: v for k, v in OPTION_DEFAULTS.items() if k not in ("out", "progress")}


def make_plan(arrays, func, **options) -> Plan:
    """The frozen :class:`Plan` of a call (what ``explain`` returns); see ``plan_call``."""
    return plan_call(arrays, func, **options).plan
