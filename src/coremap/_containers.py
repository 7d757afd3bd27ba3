"""Containers in, containers out: pandas, xarray, masked and dask inputs.

    parallel_map(items, func)  ──> find(items): the outermost container kind, or None
        xarray DataArray/Dataset ──> xarray.apply_ufunc(compute, *items)  (dims, coords,
                                     attrs and alignment as xarray's ufunc protocol does)
        dask Array              ──> dask.array.map_blocks(compute, *items)  (lazy; every
                                     block computed by coremap when dask computes it)
        pandas Series/DataFrame ──> aligned as pandas' ufunc protocol aligns them, computed
                                     on the values, rebuilt with index, columns and name
        numpy masked array      ──> only the unmasked elements are computed; the result is
                                     masked where any input is masked
    compute(plain items) is ``parallel_map`` itself on NumPy arrays (or on blocks,
    which may be containers again: a DataArray over dask arrays becomes a dask
    array of coremap blocks).

None of these libraries is imported by ``import coremap``; a kind is recognised
by the module and class name of an object's type (so an object of a library
that is not imported cannot be one of its kind), and the library is imported
only when such an object is passed.

The handlers take a ``compute`` callable rather than a function to map, so the
same dispatch serves other front ends: a front end passes ``compute(plain
items) -> ndarray (or tuple of ndarrays)`` with the broadcast shape. A
reduction (``parallel_reduce``) whose result does not have the broadcast shape
can reuse ``find`` and the masked and pandas alignment steps (``align_pandas``,
``union_mask``) and add its own rebuild step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# (root module, class name) of the container types, matched along the MRO so
# subclasses count too; ordered outermost first: an xarray object may hold dask
# arrays, a dask array may hold masked blocks.
_KINDS = (
    ("xarray", ("xarray", "DataArray")),
    ("xarray", ("xarray", "Dataset")),
    ("dask", ("dask", "Array")),
    ("pandas", ("pandas", "Series")),
    ("pandas", ("pandas", "DataFrame")),
)
_ORDER = ("xarray", "dask", "pandas", "masked")
_PLAIN = (float, int, complex, bool, np.ndarray)


def kind_of(obj: object) -> str | None:
    """``"xarray"``, ``"dask"``, ``"pandas"``, ``"masked"`` or None for ``obj``."""
    t = type(obj)
    if t in _PLAIN:
        return None
    if isinstance(obj, np.ma.MaskedArray):
        return "masked"
    for klass in t.__mro__:
        root = klass.__module__.partition(".")[0]
        for kind, (mod, name) in _KINDS:
            if root == mod and klass.__name__ == name:
                return kind
    return None


def find(items: tuple[object, ...]) -> str | None:
    """The outermost container kind among ``items`` (see the module docstring), or None."""
    kinds = {kind_of(x) for x in items}
    kinds.discard(None)
    if not kinds:
        return None
    return min(kinds, key=_ORDER.index)


def check_out(kind: str, out: object) -> None:
    """``out=`` names an ndarray to write into; a container result is a new object."""
    if out is not None:
        raise TypeError(
            f"out= is not supported with {kind} inputs: the result is a new {kind} object "
            "(assign it instead, e.g. y[...] = parallel_map(x, f))"
        )


def map_containers(kind: str, items: tuple[Any, ...],
                   compute: Callable[[tuple[Any, ...]], Any],
                   probe: Callable[[tuple[Any, ...]], np.dtype | None]) -> Any:
    """Run ``compute`` on the plain data of ``items`` and rebuild a ``kind`` container.

    ``compute(plain_items)`` returns the result (an array of the broadcast shape,
    or a tuple of them); ``probe(plain_items)`` returns the result dtype of the
    call on those items without running it, or None (used by dask only).
    """
    if kind == "xarray":
        return _map_xarray(items, compute)
    if kind == "dask":
        return _map_dask(items, compute, probe)
    if kind == "pandas":
        return _map_pandas(items, compute)
    return _map_masked(items, compute)


def _each(result, rebuild):
    return tuple(rebuild(r) for r in result) if isinstance(result, tuple) else rebuild(result)


# -- xarray ----------------------------------------------------------------------------

def _map_xarray(items, compute):
    import xarray as xr

    # The options xarray's own __array_ufunc__ passes to apply_ufunc: join from
    # arithmetic_join, attrs kept unless keep_attrs says otherwise.
    options = xr.get_options()
    keep = options["keep_attrs"]
    keep_attrs = True if keep == "default" else keep
    join = options["arithmetic_join"]

    def func(*plain):
        return compute(plain)

    # apply_ufunc must be told how many outputs come back: a function returning
    # a tuple is recognised on the first element (computed once, eagerly).
    data = [x.data if kind_of(x) == "xarray" else x for x in items]
    nout = 1
    if all(getattr(d, "size", 1) != 0 for d in data):  # an empty input tells nothing
        sample = compute(tuple(_first_element(d) for d in data))
        nout = len(sample) if isinstance(sample, tuple) else 1
    # dask="allowed": dask-backed data reaches ``compute`` as dask arrays, which
    # the dask handler turns into a lazy map over blocks.
    return xr.apply_ufunc(
        func, *items, join=join, dataset_join=join, dataset_fill_value=np.nan,
        keep_attrs=keep_attrs, dask="allowed",
        output_core_dims=[()] * nout if nout > 1 else ((),),
    )


def _first_element(x):
    """The first element of an array operand as a 1-element array (scalars as given)."""
    if np.ndim(x) == 0:
        return x
    first = x[(slice(0, 1),) * np.ndim(x)]
    if kind_of(first) == "dask":
        first = first.compute(scheduler="synchronous")
    return np.asarray(first).reshape(1)


# -- dask ------------------------------------------------------------------------------

def _map_dask(items, compute, probe):
    import dask.array as da

    ndim = max(np.ndim(x) for x in items)
    arrays = []  # the array operands as dask arrays, broadcast to one shape
    where = []
    for k, x in enumerate(items):
        if isinstance(x, (int, float, complex, bool, np.generic)):
            continue
        arrays.append(x if kind_of(x) == "dask" else da.asarray(x))
        where.append(k)
    arrays = list(da.broadcast_arrays(*arrays))

    def block(*blocks):
        plain = list(items)
        for k, b in zip(where, blocks):
            plain[k] = b
        return compute(tuple(plain))

    # map_blocks (apply_gufunc for several outputs) unifies the chunks of the
    # operands (the first operand's chunks win where they differ) and keeps them:
    # one coremap call per block.
    dtypes = _dask_dtypes(items, arrays, where, compute, probe)
    if len(dtypes) > 1:
        sig = ",".join(["()"] * len(arrays)) + "->" + ",".join(["()"] * len(dtypes))
        return da.apply_gufunc(block, sig, *arrays, output_dtypes=list(dtypes))
    return da.map_blocks(block, *arrays, dtype=dtypes[0],
                         meta=np.empty((0,) * ndim, dtypes[0]), token="coremap")


def _dask_dtypes(items, arrays, where, compute, probe) -> tuple:
    """The result dtypes: from the planner, else by running the first element (eager)."""
    stand_ins = list(items)
    for k, a in zip(where, arrays):
        stand_ins[k] = np.empty((1,) * a.ndim, a.dtype)
    try:
        dtype = probe(tuple(stand_ins))
    except TypeError:  # e.g. a function returning a tuple: known by running it
        dtype = None
    if dtype is not None:
        return (dtype,)
    # A plain Python, vectorized or tuple-returning function: its dtypes are what it
    # returns. Run it on the first element only (pass dtype= to avoid even that).
    for k, a in zip(where, arrays):
        stand_ins[k] = _first_element(a)
    sample = compute(tuple(stand_ins))
    if isinstance(sample, tuple):
        return tuple(np.asarray(r).dtype for r in sample)
    return (np.asarray(sample).dtype,)


# -- pandas ----------------------------------------------------------------------------

def align_pandas(items: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[Any], Any, list[int]]:
    """``(aligned items, axes, name, framed)`` as pandas' ufunc protocol aligns them.

    Mirrors ``array_ufunc`` in pandas/core/arraylike.py with public methods: two
    pandas objects are aligned with ``align(join="outer")`` (duplicate labels
    allowed), more with the union of their axes; Series and DataFrame do not
    mix; the result's name is the inputs' common name. ``framed`` holds the
    positions of the pandas objects among ``items``.
    """
    import pandas as pd

    framed = [k for k, x in enumerate(items) if isinstance(x, (pd.Series, pd.DataFrame))]
    types = {type(items[k]) for k in framed}
    if any(issubclass(t, pd.Series) for t in types) and any(
            issubclass(t, pd.DataFrame) for t in types):
        raise TypeError("cannot map over mixed DataFrame and Series inputs (pandas ufuncs "
                        "refuse them too): pass df.to_numpy() or align them first")
    work = list(items)
    first = work[framed[0]]
    if len(framed) == 2:
        left, right = work[framed[0]].align(work[framed[1]], join="outer")
        work[framed[0]], work[framed[1]] = left, right
        axes = left.axes
    elif len(framed) > 2:
        axes = list(first.axes)
        for k in framed[1:]:
            axes = [a.union(b) for a, b in zip(axes, work[k].axes)]
        for k in framed:
            work[k] = work[k].reindex(**dict(zip(first._AXIS_ORDERS, axes)))
    else:
        axes = first.axes
    name = None
    if first.ndim == 1:
        names = {work[k].name for k in framed}
        name = names.pop() if len(names) == 1 else None
    return tuple(work), list(axes), name, framed


def _map_pandas(items, compute):
    import pandas as pd

    aligned, axes, name, framed = align_pandas(items)
    first = aligned[framed[0]]
    if isinstance(first, pd.DataFrame) and len(framed) == 1 and first.dtypes.nunique() > 1:
        return _map_frame_by_dtype(aligned, framed[0], compute)
    plain = tuple(x.to_numpy() if k in framed else x for k, x in enumerate(aligned))
    result = compute(plain)

    def rebuild(r):
        if first.ndim == 1:
            out = pd.Series(r, index=axes[0], name=name, copy=False)
        else:
            out = pd.DataFrame(r, index=axes[0], columns=axes[1], copy=False)
        # attrs travel from a lone pandas input, as in pandas' own ufuncs
        return out.__finalize__(first) if len(framed) == 1 else out

    return _each(result, rebuild)


def _map_frame_by_dtype(aligned: tuple[Any, ...], k: int,
                        compute: Callable[[tuple[Any, ...]], Any]) -> Any:
    """A lone DataFrame of several dtypes: one call per dtype, as pandas runs ufuncs
    block by block (an int column stays int where the function allows)."""
    frame = aligned[k]
    parts: dict[tuple[Any, ...], Any] = {}
    for dtype in frame.dtypes.unique():
        cols = [c for c, d in zip(frame.columns, frame.dtypes) if d == dtype]
        sub = frame.loc[:, cols]
        plain = tuple(sub.to_numpy() if j == k else x for j, x in enumerate(aligned))
        result = compute(plain)
        parts[tuple(cols)] = result

    def rebuild(pick):
        import pandas as pd

        columns = {}
        for cols, res in parts.items():
            r = pick(res)
            for j, c in enumerate(cols):
                columns[c] = r[:, j]
        out = pd.DataFrame({c: columns[c] for c in frame.columns}, index=frame.index)
        out.columns = frame.columns
        return out.__finalize__(frame)

    sample = next(iter(parts.values()))
    if isinstance(sample, tuple):
        return tuple(rebuild(lambda res, i=i: res[i]) for i in range(len(sample)))
    return rebuild(lambda res: res)


# -- masked arrays ---------------------------------------------------------------------

def union_mask(items: tuple[object, ...], shape: tuple[int, ...]) -> np.ndarray | None:
    """The union of the inputs' masks, broadcast to ``shape``; None if nothing is masked."""
    mask = None
    for x in items:
        if isinstance(x, np.ma.MaskedArray) and x.mask is not np.ma.nomask:
            m = np.broadcast_to(np.ma.getmaskarray(x), shape)
            mask = m.copy() if mask is None else (mask | m)
    if mask is not None and not mask.any():
        return None
    return mask


def _map_masked(items, compute):
    shape = np.broadcast_shapes(*(np.shape(x) for x in items))
    mask = union_mask(items, shape)
    if mask is None:  # nothing masked: every element is computed, the mask stays empty
        plain = tuple(x.data if isinstance(x, np.ma.MaskedArray) else x for x in items)
        return _each(compute(plain), lambda r: np.ma.MaskedArray(r, mask=np.ma.nomask))
    keep = ~mask
    # Masked elements are never passed to func: compute on the unmasked ones only
    # (a 1-D gather), then scatter into a result masked where any input was.
    plain = tuple(
        x if np.ndim(x) == 0 else np.broadcast_to(np.ma.getdata(x), shape)[keep]
        for x in items
    )
    result = compute(plain)

    def rebuild(r):
        data = np.zeros(shape, r.dtype)
        data[keep] = r
        return np.ma.MaskedArray(data, mask=mask)

    return _each(result, rebuild)


# -- planning (explain) ----------------------------------------------------------------

_WHAT = {
    "xarray": "xarray input: computed through xarray.apply_ufunc; dims, coords and attrs "
              "kept as xarray's own ufuncs keep them",
    "dask": "dask input: a lazy dask array comes back; each block runs this plan (shown "
            "for the first block) when dask computes it",
    "pandas": "pandas input: aligned as pandas ufuncs align; index, columns and name kept",
    "masked": "masked input: only unmasked elements are computed; the result is masked "
              "where any input is",
}


def describe(kind: str) -> str:
    """One line for ``explain``: what happens to a ``kind`` container."""
    return _WHAT[kind]


def stand_ins(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """Plain stand-ins of ``items`` for planning, without computing anything lazy.

    pandas and xarray objects give their values (xarray's broadcast by dimension
    name first), masked arrays their data, dask arrays a zero array of their first
    block's shape (a broadcast view: nothing allocated).
    """
    kinds = [kind_of(x) for x in items]
    if "xarray" in kinds:
        import xarray as xr

        broadcast = iter(xr.broadcast(*[x for x, k in zip(items, kinds) if k == "xarray"]))
        items = tuple(next(broadcast).data if k == "xarray" else x
                      for x, k in zip(items, kinds))
        kinds = [kind_of(x) for x in items]
    plain = []
    for x, k in zip(items, kinds):
        if k == "dask":
            block = tuple(c[0] if c else 0 for c in x.chunks)
            x = np.broadcast_to(np.zeros((), x.dtype), block)
        elif k == "pandas":
            x = x.to_numpy()
        elif k == "masked":
            x = np.ma.getdata(x)
        plain.append(x)
    return tuple(plain)


# -- parallel_reduce ---------------------------------------------------------------------

# ufunc ops under the names np.ma and dask.array give their reductions
_UFUNC_NAMES: dict[object, str] = {
    np.add: "sum", np.multiply: "prod", np.minimum: "min", np.maximum: "max",
    np.logical_or: "any", np.logical_and: "all"}
_TAKES_DTYPE = ("sum", "prod", "mean")


def reduce_containers(kind: str, items: tuple[Any, ...], op: object,
                      axis: int | tuple[int, ...] | None, keepdims: bool,
                      options: dict[str, Any],
                      reduce: Callable[[tuple[Any, ...], Any, bool], Any],
                      map_: Callable[[tuple[Any, ...]], Any]) -> Any:
    """``parallel_reduce`` over containers (see the module docstring).

    ``reduce(plain, axis, keepdims)`` is ``parallel_reduce`` on plain data;
    ``map_(items)`` is ``parallel_map`` of the function on the containers (the
    first item itself when there is no function); ``options`` holds the
    call's ``dtype`` and ``initial``.

    pandas and xarray inputs are reduced by coremap's own deterministic
    reduction and rebuilt (a DataFrame reduced along one axis gives a Series
    labelled by the other; xarray drops the reduced dimensions). Masked and dask
    inputs are mapped by coremap and folded by ``numpy.ma`` and ``dask.array``'s
    own reductions, which know masks and chunks (so their bits are those
    libraries', not coremap's fixed tree).
    """
    if kind == "pandas":
        return _reduce_pandas(items, axis, keepdims, reduce)
    if kind == "xarray":
        return _reduce_xarray(items, op, axis, keepdims, reduce)
    name = op if isinstance(op, str) else _UFUNC_NAMES.get(op)
    if name is None:
        raise TypeError(f"op={getattr(op, '__name__', op)!r} is not supported with {kind} "
                        f"inputs; use one of 'sum', 'prod', 'min', 'max', 'any', 'all', "
                        "'mean', 'argmin', 'argmax'")
    if options.get("initial") is not None:
        raise TypeError(f"initial= is not supported with {kind} inputs")
    kwargs = {"axis": axis}
    if keepdims:
        kwargs["keepdims"] = True
    if options.get("dtype") is not None and name in _TAKES_DTYPE:
        kwargs["dtype"] = options["dtype"]
    mapped = map_(items)
    if kind == "masked":
        return getattr(np.ma, name)(np.ma.asarray(mapped), **kwargs)
    import dask.array as da

    return getattr(da, name)(mapped, **kwargs)


def _one_axis(axis, ndim: int) -> int | None:
    """The single reduced axis of a 2-D reduction, or None when all axes are."""
    if axis is None:
        return None
    axes = tuple(sorted({a % ndim for a in (axis if isinstance(axis, tuple) else (axis,))}))
    return None if len(axes) == ndim else axes[0]


def _reduce_pandas(items, axis, keepdims, reduce):
    import pandas as pd

    if keepdims:
        raise TypeError("keepdims=True is not supported with pandas inputs (pandas "
                        "reductions have none); pass x.to_numpy()")
    aligned, axes, _, framed = align_pandas(items)
    plain = tuple(x.to_numpy() if k in framed else x for k, x in enumerate(aligned))
    result = reduce(plain, axis, False)
    first = aligned[framed[0]]
    if first.ndim == 1:
        return result
    along = _one_axis(axis, 2)
    if along is None:
        return result
    # reduced along the rows: one value per column, and the other way round
    return pd.Series(result, index=axes[1] if along == 0 else axes[0])


def _reduce_xarray(items, op, axis, keepdims, reduce):
    import xarray as xr

    if keepdims:
        raise TypeError("keepdims=True is not supported with xarray inputs (xarray drops "
                        "reduced dimensions); pass x.data")
    if any(kind_of(x) not in ("xarray",) and np.ndim(x) > 0 for x in items):
        raise TypeError("parallel_reduce over xarray objects takes xarray objects and "
                        "scalars; wrap NumPy arrays in a DataArray with named dims first")
    options = xr.get_options()
    keep = options["keep_attrs"]
    # align by label, then broadcast by name: every input then has the same dims
    objs = [x for x in items if kind_of(x) == "xarray"]
    objs = iter(xr.broadcast(*xr.align(*objs, join=options["arithmetic_join"])))
    items = tuple(next(objs) if kind_of(x) == "xarray" else x for x in items)
    first = next(x for x in items if kind_of(x) == "xarray")
    if axis is None:
        core, inner = list(first.dims), None
    else:
        axes = np.lib.array_utils.normalize_axis_tuple(axis, first.ndim) if hasattr(
            np.lib, "array_utils") else tuple(a % first.ndim for a in (
                axis if isinstance(axis, tuple) else (axis,)))
        core = [first.dims[a] for a in axes]
        inner = -1 if isinstance(axis, int) else tuple(range(-len(core), 0))

    def func(*plain):
        return reduce(plain, inner, False)

    return xr.apply_ufunc(
        func, *items,
        input_core_dims=[core if kind_of(x) == "xarray" else [] for x in items],
        keep_attrs=True if keep == "default" else keep, dask="allowed",
    )
