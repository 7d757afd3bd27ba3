"""The front end: ``parallel_map`` and ``explain``."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from coremap import _containers, _fastpath, _insights, _multi
from coremap._errors import CoremapWarning
from coremap._execute import execute
from coremap._insights import Insights
from coremap._plan import Plan, fast_key, make_plan, plan_call
from coremap._typing import Backend, KernelFunc, Schedule

if TYPE_CHECKING:
    from numpy._typing import _UFunc_Nin1_Nout1, _UFunc_Nin2_Nout1
    from typing_extensions import Unpack

    from coremap._typing import MapOptions

__all__ = ["parallel_map", "explain", "CoremapWarning"]


_OutT = TypeVar("_OutT", bound="np.ndarray[Any, Any]")
# inputs whose result is a plain ndarray; other array-likes (pandas, xarray, dask)
# come back as the same kind of object, typed Any
# ufuncs with one output give one array (NumPy's stubs type a ufunc by its arity;
# a ufunc with two outputs, like a function returning a tuple, gives a tuple)
_SingleOutputUfunc = Union["_UFunc_Nin1_Nout1[Any, Any, Any]", "_UFunc_Nin2_Nout1[Any, Any, Any]"]
_PlainInput = Union["NDArray[Any]", "list[Any]", float, "tuple[NDArray[Any] | float, ...]"]


@overload
def parallel_map(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    out: _OutT,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> _OutT: ...


@overload
def parallel_map(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    out: tuple[NDArray[Any], ...],
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> tuple[NDArray[Any], ...]: ...


@overload
def parallel_map(
    arrays: _PlainInput,
    func: _SingleOutputUfunc,
    *,
    out: None = None,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> NDArray[Any]: ...


@overload
def parallel_map(
    arrays: _PlainInput,
    func: Callable[..., tuple[Any, ...]],
    *,
    out: None = None,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> tuple[NDArray[Any], ...]: ...


@overload
def parallel_map(
    arrays: _PlainInput,
    func: KernelFunc,
    *,
    out: None = None,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> NDArray[Any]: ...


@overload
def parallel_map(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    out: None = None,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> Any: ...


def parallel_map(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    out: np.ndarray[Any, Any] | tuple[np.ndarray[Any, Any], ...] | None = None,
    dtype: DTypeLike | None = None,
    vectorized: bool = False,
    backend: Backend | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    schedule: Schedule = "guided",
    progress: bool = False,
    timeout: float | None = None,
    retries: int = 0,
) -> Any:
    """Apply ``func`` to every element of ``arrays`` on every core.

    Parameters
    ----------
    arrays : array_like or tuple of array_like and scalars
        One input, or a tuple of inputs broadcast together as a ufunc would
        (Python scalars allowed). Numeric dtypes of any shape and layout.
    func : callable
        A scalar function ``f(a, b, ...) -> number`` (compiled with Numba for
        the call's dtypes, cached), a NumPy ufunc, a built-in kernel from
        :mod:`coremap.kernels`, or with ``vectorized=True`` a function of 1-D
        chunks returning chunks of the same length.
    out : ndarray, optional
        Written in place and returned. Its shape must be the broadcast shape;
        results are cast to its dtype with the ``"same_kind"`` rule.
    dtype : dtype, optional
        Dtype of the result (``"same_kind"`` cast from what ``func`` returns).
    vectorized : bool
        ``func`` takes and returns whole chunks (1-D arrays; scalars as given).
    backend : {"auto", "threads", "processes", "serial"} or cluster client, optional
        Where to run. ``"auto"`` (the default, or ``COREMAP_BACKEND``) runs
        compiled kernels, ufuncs and vectorized functions on the thread pool
        (small inputs never leave the calling thread), and functions Numba cannot
        compile on worker processes over shared memory. An ipyparallel
        ``Client``/``View`` or a ``dask.distributed.Client`` runs the chunks on
        that cluster. :func:`explain` says what it chose and why.
    workers : int, optional
        Number of workers (default: the usable cores, or ``COREMAP_WORKERS``).
    chunk_size : int, optional
        ``"guided"``: the smallest chunk; ``"dynamic"`` and ``"static"``: the
        chunk length.
    schedule : {"guided", "dynamic", "static"}
        ``"guided"`` hands out big chunks first and small ones at the end, so
        uneven work balances; ``"dynamic"`` fixed-size chunks on demand;
        ``"static"`` one block per worker.
    progress : bool
        Show a tqdm progress bar.
    timeout : float, optional
        Seconds the call may take, then ``TimeoutError``. On ``"processes"`` the
        workers still computing are killed (and replaced); on ``"threads"`` nothing
        of the call writes into the output after it raises (a compiled kernel stops
        within milliseconds and is waited for; a Python or vectorized function
        writes into a private buffer, copied into ``out`` only on success).
    retries : int
        On a cluster backend, re-run a failed chunk up to this many times (on
        another engine where the cluster allows).

    Returns
    -------
    ndarray
        The results, in the broadcast shape (``out`` if given). Given a pandas
        Series/DataFrame, an xarray DataArray, a masked array or a dask array,
        the same kind of object (see the README's section on them).

    Raises
    ------
    TypeError, ValueError
        Invalid arguments, raised before any work starts.
    Exception
        The first exception raised by ``func``, with its own type; the other
        chunks are cancelled. On Python >= 3.11 a note names the element.
    KeyboardInterrupt
        Ctrl-C stops the call after the chunks in progress.

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> x = np.linspace(0.0, 1.0, 5)
    >>> cm.parallel_map(x, lambda v: 2.0 * v + 1.0)
    array([1. , 1.5, 2. , 2.5, 3. ])
    >>> cm.parallel_map((x, 2.0), np.power)
    array([0.    , 0.0625, 0.25  , 0.5625, 1.    ])
    """
    options_key = fast_key(out=out, dtype=dtype, vectorized=vectorized, backend=backend,
                           workers=workers, chunk_size=chunk_size, schedule=schedule,
                           progress=progress, timeout=timeout, retries=retries)
    entry, items, key = _fastpath.lookup(arrays, func, options_key)
    if entry is not None and (result := _fastpath.run(entry, func, items, out)) is not None:
        return result  # the fast path (_fastpath.py)
    options = dict(dtype=dtype, vectorized=vectorized, backend=backend, workers=workers,
                   chunk_size=chunk_size, schedule=schedule, timeout=timeout, retries=retries)
    return _full_path(arrays, func, out, progress, options, key, items)


def _full_path(arrays, func, out, progress, options, key, items):
    """``parallel_map`` past the fast path: containers, several outputs, then plan and run."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    container = _containers.find(arrays if isinstance(arrays, tuple) else (arrays,))
    if container is not None:  # pandas, xarray, masked or dask in: the same kind out
        return _map_container(container, arrays, func, out, progress, options)
    if _multi.wants_several(func, out, options["dtype"]):  # tuple out=/dtype=, nout > 1
        return _multi.parallel_map_several(arrays, func, out=out, progress=progress, **options)
    try:
        call = plan_call(arrays, func, out=out, **options)
    except TypeError:
        if not _multi.returns_tuple(arrays, func, options["vectorized"]):
            raise
        return _multi.parallel_map_several(arrays, func, out=out, progress=progress, **options)
    if call.warning:
        warnings.warn(call.warning, CoremapWarning, stacklevel=3)
    result = execute(call, progress=progress)
    if key is not None:
        _fastpath.remember(key, call, items)
    return result


def _map_container(kind, arrays, func, out, progress, options):
    """``parallel_map`` on the plain data of containers, rebuilt as ``kind`` (_containers.py)."""
    _containers.check_out(kind, out)
    items = arrays if isinstance(arrays, tuple) else (arrays,)
    return _containers.map_containers(
        kind, items,
        lambda plain: parallel_map(plain, func, progress=progress, **options),
        lambda plain: make_plan(plain, func, **options).out_dtype,
    )


@overload
def explain(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    run: Literal[False] = False,
    **kwargs: Unpack[MapOptions],
) -> Plan: ...


@overload
def explain(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    run: Literal[True],
    **kwargs: Unpack[MapOptions],
) -> Insights: ...


@overload
def explain(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    run: bool,
    **kwargs: Unpack[MapOptions],
) -> Plan | Insights: ...


def explain(
    arrays: ArrayLike | tuple[ArrayLike, ...],
    func: KernelFunc,
    *,
    run: bool = False,
    **kwargs: Unpack[MapOptions],
) -> Plan | Insights:
    """Return the plan ``parallel_map(arrays, func, **kwargs)`` would run, without running it.

    The plan prints as a short report: engine, kernel kind, chunking, workers,
    and the reasons for each choice. It validates the call like
    ``parallel_map`` (and compiles a scalar function, which is then cached).

    With ``run=True`` the call runs too, and an :class:`~coremap.Insights`
    comes back: the plan and what happened (wall, planning, Numba compile and
    run time, elements per second, each worker's chunks, elements and busy
    time, the imbalance between workers, and for processes the bytes moved);
    it prints the same way, its fields are plain data, and ``.result`` holds
    what ``parallel_map`` returned (a dask result is computed, in this thread).

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> print(cm.explain(np.ones(10), np.sqrt))  # doctest: +ELLIPSIS
    coremap plan for sqrt
      engine   : ...
    ...
    """
    if run:
        return _explain_run(arrays, func, kwargs)
    options: dict[str, Any] = dict(kwargs)
    options.pop("progress", None)  # a display option, no part of the plan
    items = arrays if isinstance(arrays, tuple) else (arrays,)
    container = _containers.find(items)
    if container is None:
        return make_plan(arrays, func, **options)
    _containers.check_out(container, options.get("out"))
    plan = make_plan(_containers.stand_ins(items), func, **options)
    reasons = type(plan.reasons)([*plan.reasons, _containers.describe(container)])
    return dataclasses.replace(plan, reasons=reasons)


def _explain_run(arrays, func, kwargs) -> Insights:
    """``explain(..., run=True)``: the call, run under a recorder (``_insights.py``)."""
    progress = kwargs.pop("progress", False)
    if _containers.find(arrays if isinstance(arrays, tuple) else (arrays,)) is None:
        def run_call(call):
            if call.warning:
                warnings.warn(call.warning, CoremapWarning, stacklevel=4)
            return execute(call, progress=progress)

        return _insights.run(lambda: plan_call(arrays, func, **kwargs), run_call)

    def run_container(plan):
        result = parallel_map(arrays, func, progress=progress, **kwargs)
        if _containers.kind_of(result) == "dask":
            result = result.compute(scheduler="synchronous")
        return result

    return _insights.run(lambda: explain(arrays, func, **kwargs), run_container)
