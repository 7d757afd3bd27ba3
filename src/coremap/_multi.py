"""Several outputs: a function returning a tuple gives a tuple of arrays (ufunc ``nout > 1``).

    parallel_map(args, f) ──> f returns a tuple (Numba's return type, a ufunc's nout,
                              or out=/dtype= given as tuples)
        threads / serial: ONE pass, every output written by the same chunk
            Numba: a generated cfunc ``t = f(...); o0[i] = t[0]; o1[i] = t[1]``
                   run by the chunk runner without the GIL
            ufunc / vectorized / Python: a chunk function storing each part
        processes / cluster clients: one planned call per output through a
            generated projection ``f(...)[k]`` (compiled by Numba where ``f`` is),
            so every engine gives the same arrays; ``f`` runs once per output there

A plain Python function (one Numba cannot compile) is only known to return a
tuple once it runs: pass ``dtype=`` (or ``out=``) as a tuple for it.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from coremap import _config, _layout
from coremap._errors import note_raised_by
from coremap._functions import func_name as _name
from coremap._plan import PROCESS_MIN_SIZE, _check_options, _chunking
from coremap._tasks import Errors, native_task, python_task
from coremap.engines._base import new_job

_BIG = 1 << 62


def numba_outputs(func: object, in_dtypes: tuple[np.dtype, ...]) -> tuple[np.dtype, ...] | None:
    """The output dtypes of a scalar function Numba compiles to return a tuple, else None."""
    from coremap._kernels import _numba

    if isinstance(func, np.ufunc) or _numba.not_compilable_reason(func) is not None:
        return None
    import numba
    from numba.np import numpy_support

    st = _numba.compiled(func, len(in_dtypes))
    types_ = tuple(numpy_support.from_dtype(_numba.compute_dtype(d)) for d in in_dtypes)
    if types_ not in st.dispatcher.overloads:
        return None  # never compiled: not a tuple-returning function we saw fail
    rtype = st.dispatcher.overloads[types_].signature.return_type
    if not isinstance(rtype, numba.types.BaseTuple):
        return None
    # Every concrete tuple type (UniTuple, Tuple, the named ones) iterates over its
    # element types; Numba's annotations leave __iter__ off their common base class.
    parts = list(rtype)  # type: ignore[call-overload]
    if not all(isinstance(t, (numba.types.Number, numba.types.Boolean)) for t in parts):
        return None
    return tuple(numpy_support.as_dtype(t) for t in parts)


def returns_tuple(arrays: object, func: object, vectorized: bool) -> bool:
    """After planning refused the call: does Numba compile ``func`` to return a tuple?"""
    if vectorized or isinstance(func, np.ufunc):
        return False
    from coremap._layout import normalize_inputs

    try:
        inputs, _ = normalize_inputs(arrays)
        return numba_outputs(func, tuple(i.dtype for i in inputs)) is not None
    except Exception:  # the planner's own error is the one to raise
        return False


def wants_several(func: object, out: object, dtype: object) -> bool:
    """Cheap checks, before planning: tuple ``out``/``dtype`` or a ufunc with nout > 1."""
    return (isinstance(out, tuple) or isinstance(dtype, (tuple, list))
            or (isinstance(func, np.ufunc) and func.nout > 1))


def _result_dtypes(func, inputs, vectorized, out, dtype):
    """``(kind, natural dtypes or None, requested dtypes or None)``; raises on bad input."""
    requested = None
    if out is not None:
        if not isinstance(out, tuple) or not out:
            raise TypeError("out must be a tuple of arrays for a function with several outputs")
        requested = tuple(o.dtype if isinstance(o, np.ndarray) else None for o in out)
    if dtype is not None:
        dts = tuple(np.dtype(d) for d in dtype) if isinstance(dtype, (tuple, list)) else None
        if dts is None:
            raise TypeError("dtype must be a tuple of dtypes for a function with several "
                            "outputs")
        if requested is not None and dts != requested:
            raise TypeError(f"dtype={dts} disagrees with the dtypes of out {requested}")
        requested = dts
    if vectorized:
        return "vectorized", None, requested
    if isinstance(func, np.ufunc):
        probes = [i.value if i.is_scalar else np.empty(0, i.dtype) for i in inputs]
        res = func(*probes)
        res = res if isinstance(res, tuple) else (res,)
        return "ufunc", tuple(np.asarray(r).dtype for r in res), requested
    from coremap._kernels import _numba

    in_dtypes = tuple(i.dtype for i in inputs)
    try:
        _, dt = _numba.resolve(func, in_dtypes)
        natural = (dt,)
    except _numba.NotCompilable:
        return "python", None, requested
    except TypeError:
        natural = numba_outputs(func, in_dtypes)
        if natural is None:
            raise
    return "numba", natural, requested


def _outputs(shape, dtypes, out):
    """``(targets, results)``: what kernels write (native, C order) and what is returned."""
    targets, results = [], []
    for k, dt in enumerate(dtypes):
        given = None if out is None else out[k]
        if given is None:
            a = np.empty(shape, dt)
            targets.append(a)
            results.append(a)
            continue
        if not isinstance(given, np.ndarray):
            raise TypeError(f"out[{k}] must be a numpy.ndarray, got {type(given).__name__}")
        if not given.flags.writeable:
            raise ValueError(f"out[{k}] is read-only")
        if given.shape != shape:
            raise ValueError(f"out[{k}] has shape {given.shape}, but the inputs broadcast to "
                             f"{shape}")
        direct = given.flags.c_contiguous and not _layout.needs_native_copy(given)
        targets.append(given if direct else np.empty(shape, given.dtype.newbyteorder("=")))
        results.append(given)
    return targets, results


def _space(inputs, shape, targets):
    views = [i.array if i.is_scalar else _layout.iteration_view(_layout.native(i.array),
                                                                  shape, "C")
             for i in inputs]
    views = [np.broadcast_to(v, shape) if i.is_scalar else v for i, v in zip(inputs, views)]
    views += [t.reshape(shape) for t in targets]
    space = _layout.build_space(views)
    if space is None:
        views = [np.ascontiguousarray(v) if k < len(inputs) and not inputs[k].is_scalar
                 else v for k, v in enumerate(views)]
        space = _layout.build_space(views)
    return space


def _source(nin: int, nout: int, classes: str) -> str:
    """Python source of the chunk kernel writing ``nout`` outputs from one call of ``fn``."""
    lines = ["def kernel(ptrs, meta, lo, hi):", "    C = meta[0]"]
    for k in range(nin + nout):
        lines.append(f"    a{k} = carray(ptrs[{k}], (BIG,), dt{k})")
        lines.append(f"    off{k} = meta[{1 + 3 * k}]; rs{k} = meta[{2 + 3 * k}]; "
                     f"cs{k} = meta[{3 + 3 * k}]")
        if k < nin and classes[k] == "s":
            lines.append(f"    v{k} = a{k}[off{k}]")
    lines += ["    r = lo // C", "    c0 = lo - r * C", "    i = lo", "    while i < hi:",
              "        cend = min(C, c0 + (hi - i))"]
    refs = []
    for k in range(nin + nout):
        if classes[k] == "s":
            refs.append(f"v{k}")
            continue
        lines.append(f"        b{k} = off{k} + r * rs{k}")
        refs.append(f"a{k}[b{k} + c]" if classes[k] == "c" else f"a{k}[b{k} + c * cs{k}]")
    lines += ["        for c in range(c0, cend):", f"            t = fn({', '.join(refs[:nin])})"]
    lines += [f"            {refs[nin + j]} = t[{j}]" for j in range(nout)]
    lines += ["        i += cend - c0", "        r += 1", "        c0 = 0", "    return 1"]
    return "\n".join(lines) + "\n"


_kernel_lock = threading.Lock()


def _kernel_address(func, in_dtypes, out_dtypes, classes) -> int:
    import numba
    from numba import types as nt

    from coremap._kernels import _numba

    st = _numba.compiled(func, len(in_dtypes))
    key = ("several", tuple(in_dtypes), tuple(out_dtypes), classes)
    with _kernel_lock:
        cf = st.kernels.get(key)
        if cf is None:
            _numba._install_hook()
            ns = {"carray": numba.carray, "BIG": _BIG, "fn": st.dispatcher}
            for k, dt in enumerate((*in_dtypes, *out_dtypes)):
                ns[f"dt{k}"] = np.dtype(dt)
            text = _source(len(in_dtypes), len(out_dtypes), classes)
            exec(text, ns)  # generated source
            sig = nt.int64(nt.CPointer(nt.voidptr), nt.CPointer(nt.int64), nt.int64,
                           nt.int64)
            from coremap._kernels import _diskcache  # loaded from disk when it can be keyed

            cf = _diskcache.cfunc(sig, ns["kernel"], st.dispatcher,
                                  (text, tuple(in_dtypes), tuple(out_dtypes)),
                                  nopython=True, nogil=True, error_model="numpy")
            st.kernels[key] = cf
        return cf.address


def _chunk_function(kind, func, inputs, space, nout):
    """A Python chunk function ``run(lo, hi)`` storing every output of ``func``."""
    nin = len(inputs)
    grids = [None if inp.is_scalar else space.grid(k) for k, inp in enumerate(inputs)]
    outs = [space.grid(nin + j) for j in range(nout)]
    scalars = [inp.value for inp in inputs]

    def run(lo, hi):
        for r0, r1, c0, c1 in space.segments(lo, hi):
            args = [s if g is None else g[r0:r1, c0:c1] for g, s in zip(grids, scalars)]
            targets = [o[r0:r1, c0:c1] for o in outs]
            if kind == "ufunc":
                func(*args, out=tuple(targets), casting="same_kind")
                continue
            count = (r1 - r0) * (c1 - c0)
            if kind == "vectorized":
                res = func(*[a if g is None else a.reshape(-1) for a, g in zip(args, grids)])
            else:
                cols = [[a] * count if g is None else a.reshape(-1).tolist()
                        for a, g in zip(args, grids)]
                res = list(zip(*map(func, *cols)))
            if not isinstance(res, (tuple, list)) or len(res) != nout:
                raise ValueError(f"{_name(func)} returned {type(res).__name__}; expected "
                                 f"{nout} outputs per element")
            for t, part in zip(targets, res):
                np.copyto(t, np.asarray(part).reshape(t.shape), casting="same_kind")

    return run


def _job(size, kind, workers, schedule, chunk_size):
    """The runner's job, chunked and timed as parallel_map's (``_plan._chunking``,
    ``engines/_base.job_params``)."""
    chunk, cap = _chunking(kind, schedule, chunk_size, size, workers)
    return new_job(SimpleNamespace(size=size, workers=workers, schedule=schedule,
                                   chunk=chunk, max_chunk=cap, kind=kind))


def _run_here(kind, func, inputs, shape, targets, engine_name, opts):
    """One pass on the serial or thread engine, every output written by the same chunk."""
    from coremap._execute import _progress_bar
    from coremap.engines import get_engine

    size = math.prod(shape)
    if size == 0:
        return
    space = _space(inputs, shape, targets)
    workers = 1 if engine_name == "serial" else opts["workers"]
    job = _job(size, kind, workers, opts["schedule"], opts["chunk_size"])
    errors = Errors()
    if kind == "numba":
        classes = space.classes([i.is_scalar for i in inputs])
        address = _kernel_address(func, tuple(i.dtype for i in inputs),
                                  tuple(t.dtype for t in targets), classes)
        job.set_kernel(address, space.base_ptrs, space.meta(), space.views)
        task = native_task()
    else:
        task = python_task(_chunk_function(kind, func, inputs, space, len(targets)), errors)
    on_progress, bar = _progress_bar(SimpleNamespace(size=size, func_name=_name(func)),
                                     opts["progress"])
    try:
        get_engine(engine_name).run(job, task, workers, on_progress=on_progress,
                                    timeout=opts["timeout"])
    finally:
        if bar is not None:
            bar.close()
    if errors.first is not None:
        raise errors.first[0]
    failed = job.failed_chunk
    if failed is not None:
        _raise_element(func, inputs, space, *failed)
    if job.done != size:
        raise RuntimeError(f"only {job.done} of {size} elements were computed (internal error)")


def _raise_element(func, inputs, space, lo, hi):
    """Re-run a failed chunk element by element (the compiled function) to raise."""
    from coremap._kernels import _numba

    disp = _numba.compiled(func, len(inputs)).dispatcher
    grids = [space.grid(k) for k in range(len(inputs))]
    for i in range(lo, hi):
        args = [g[divmod(i, space.cols)] for g in grids]
        try:
            disp(*args)
        except Exception as exc:
            note_raised_by(exc, _name(func), f"at element {i} (flat, C order)")
            raise
    raise RuntimeError(f"{_name(func)} failed in elements {lo}..{hi - 1} but not when re-run")


def _projection(func, k: int, nin: int, vectorized: bool):
    """``f(...)[k]`` as a plain function reading ``f`` as a global, so Numba compiles it
    where it compiles ``f`` (a closure or a callable object would run as Python)."""
    args = ", ".join(f"a{i}" for i in range(nin))
    ns = {"f": func}
    exec(f"def part{k}({args}):\n    return f({args})[{k}]\n", ns)  # generated source
    fn = ns[f"part{k}"]
    fn.__qualname__ = fn.__name__ = f"{_name(func)}[{k}]"
    # f's module: a cluster adapter then sends f by value where f's module is not
    # importable on the engines (a script, a test module), as it does for f itself
    fn.__module__ = getattr(func, "__module__", None)
    return fn


def _engine(kind, backend, workers, size):
    """``(engine for one pass here, or None; parallel_map backend for projections)``."""
    if _config.in_worker() and backend in ("processes", "threads"):
        backend = "serial"
    if not isinstance(backend, str):
        return None, backend
    if backend in ("serial", "threads"):
        return backend, None
    if backend == "processes":
        return None, backend
    if kind == "python":
        if workers > 1 and size >= PROCESS_MIN_SIZE:
            return None, "processes"
        return "serial", None
    return ("serial" if workers == 1 else "threads"), None


def parallel_map_several(arrays: Any, func: Callable[..., Any], *, out: object = None,
                         dtype: object = None, vectorized: bool = False,
                         backend: object = None, workers: int | None = None,
                         chunk_size: int | None = None, schedule: str = "guided",
                         progress: bool = False, timeout: float | None = None,
                         retries: int = 0) -> tuple[np.ndarray, ...]:
    """``parallel_map`` for a function with several outputs: a tuple of arrays."""
    from coremap._execute import execute
    from coremap._layout import normalize_inputs
    from coremap._plan import plan_call

    checked = _check_options(func, dtype=None, vectorized=vectorized, backend=backend,
                             workers=workers, chunk_size=chunk_size, schedule=schedule,
                             timeout=timeout, retries=retries)  # parallel_map's own checks
    backend, workers, chunk_size = checked.backend, checked.workers, checked.chunk_size
    inputs, shape = normalize_inputs(arrays)
    kind, natural, requested = _result_dtypes(func, inputs, vectorized, out, dtype)
    if natural is None and requested is None:
        raise TypeError(f"{_name(func)} is run as Python: pass dtype= as a tuple of the "
                        "output dtypes (or out= as a tuple of arrays) for several outputs")
    nout = len(requested if requested is not None else natural)
    if natural is not None and len(natural) != nout:
        raise ValueError(f"{_name(func)} returns {len(natural)} outputs, but {nout} "
                         "out arrays or dtypes were given")
    dtypes = list(requested if requested is not None else natural)
    for k in range(nout):
        if dtypes[k] is None:
            dtypes[k] = natural[k] if natural is not None else np.dtype(np.float64)
        if natural is not None and not np.can_cast(natural[k], dtypes[k], "same_kind"):
            raise TypeError(f"cannot store output {k} ({natural[k]}) of {_name(func)} into "
                            f"dtype {dtypes[k]} (casting rule 'same_kind')")
    targets, results = _outputs(shape, dtypes, out)
    here, remote = _engine(kind, backend, workers, math.prod(shape))
    opts = {"workers": workers, "chunk_size": chunk_size, "schedule": schedule,
            "timeout": timeout, "progress": progress}
    if here is not None:
        _run_here(kind, func, inputs, shape, targets, here, opts)
    else:
        for k in range(nout):
            part = _projection(func, k, len(inputs), vectorized)
            call = plan_call(arrays, part, out=targets[k], vectorized=vectorized,
                             backend=remote, workers=workers, chunk_size=chunk_size,
                             schedule=schedule, timeout=timeout, retries=retries)
            execute(call, progress=progress)
    for t, r in zip(targets, results):
        if t is not r:
            np.copyto(r, t, casting="same_kind")
    return tuple(results)
