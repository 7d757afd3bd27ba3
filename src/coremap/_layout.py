"""Inputs and output of one call, reduced to a 2-D strided iteration space.

Every call iterates over the broadcast shape in one memory order (C, or F when
the arrays are Fortran-ordered), flattened to a single index ``i``. Dimensions
are dropped (size 1) and merged (when every operand's strides allow), which
leaves at most ``R`` rows of ``C`` columns; each operand is then an offset, a
row stride and a column stride, in elements. Kernels claim flat ranges
``[lo, hi)`` of this space (see ``_kernels/_runner.pxd``).

An operand that would need a third dimension (a strided view of a strided view,
a 3-way broadcast) is copied to contiguous memory first, so kernels stay
simple; so is an input that is unaligned, byte-swapped, or overlaps ``out``
in a way that an element-wise pass could corrupt.

Every engine prepares a call's operands the same way (``prepare_operands``)::

    call (inputs, out=, shape, order, result dtype)
      ──> target: where kernels write: out= itself, a new array, or the engine's
          own (the process engine's shared-memory segment); a private one when
          the engine asks (stuck Python chunks on threads)
      ──> iteration views of the inputs (native, cast, overlap with out copied)
          and of the target ──> Space (inputs needing a third dimension copied)
      ──> no 2-D form for the target: a temporary target, the space again
      ──> Operands(space, target, out);  .result(): target copied into out
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUMERIC_KINDS = "biufc"


@dataclass
class Input:
    """One input as given: an array, or a scalar broadcast to every element."""

    # the scalar as given (for ufuncs: NEP 50 weak promotion), or the array as given:
    # np.asarray of a SharedArray drops it from the view's .base chain (NumPy collapses
    # bases of one type), so the process engine finds the segment to attach here
    value: object
    array: np.ndarray  # the array (np.asarray), or a 0-d array of the scalar
    is_scalar: bool

    @property
    def dtype(self) -> np.dtype:
        """The dtype kernels see: native byte order (others are copied first)."""
        dt = self.array.dtype
        return dt if dt.isnative else dt.newbyteorder("=")


def _is_python_scalar(obj: object) -> bool:
    return isinstance(obj, (numbers.Number, np.generic)) and not isinstance(obj, np.ndarray)


def normalize_inputs(arrays: object) -> tuple[list[Input], tuple[int, ...]]:
    """Inputs as a list and their broadcast shape; raise before any work on bad input."""
    items = arrays if isinstance(arrays, tuple) else (arrays,)
    if len(items) == 0:
        raise ValueError("parallel_map needs at least one input array, got an empty tuple")
    inputs = []
    for k, item in enumerate(items):
        if _is_python_scalar(item):
            arr = np.asarray(item)
            scalar = True
        else:
            if item is None:
                raise TypeError(f"input {k} is None; expected an array-like or a number")
            arr = np.asarray(item)
            scalar = False
        if arr.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(
                f"input {k} has dtype {arr.dtype}; parallel_map takes numeric inputs "
                "(bool, int, uint, float, complex). Convert it first, e.g. x.astype(float)"
            )
        given = scalar or isinstance(item, np.ndarray)  # a list is kept as converted
        inputs.append(Input(item if given else arr, arr, scalar))
    shapes = [i.array.shape for i in inputs]
    try:
        shape = np.broadcast_shapes(*shapes)
    except ValueError:
        raise _broadcast_error(shapes) from None
    return inputs, tuple(shape)


def _broadcast_error(shapes: list[tuple[int, ...]]) -> ValueError:
    """The error for shapes NumPy refused: incompatible, or too many elements."""
    ndim = max(len(s) for s in shapes)
    padded = [(1,) * (ndim - len(s)) + tuple(s) for s in shapes]
    dims = []
    for sizes in zip(*padded):
        big = {n for n in sizes if n != 1}
        if len(big) > 1:
            return ValueError(
                f"inputs do not broadcast together: shapes {', '.join(map(str, shapes))}")
        dims.append(big.pop() if big else 1)
    return ValueError(
        f"inputs broadcast to shape {tuple(dims)}, whose {math.prod(dims):,} elements "
        "overflow a 64-bit index: the size is too large")


def memory_order(inputs: list[Input], shape: tuple[int, ...], out: np.ndarray | None) -> str:
    """'F' when the arrays (or ``out``) are Fortran-ordered, else 'C'."""
    if len(shape) < 2:
        return "C"
    if out is not None:
        return "F" if out.flags.f_contiguous and not out.flags.c_contiguous else "C"
    full = [i.array for i in inputs if not i.is_scalar and i.array.shape == shape]
    if full and all(a.flags.f_contiguous for a in full) and not all(
        a.flags.c_contiguous for a in full
    ):
        return "F"
    return "C"


def needs_native_copy(arr: np.ndarray) -> bool:
    """Kernels index in whole elements of native byte order: copy arrays that are not."""
    item = arr.dtype.itemsize
    return (
        not arr.dtype.isnative
        or not arr.flags.aligned
        or any(s % item for s in arr.strides)
    )


def native(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself, or a native-order aligned copy of it."""
    if needs_native_copy(arr):
        return np.array(arr, dtype=arr.dtype.newbyteorder("="), order="K", copy=True)
    return arr


def iteration_view(arr: np.ndarray, shape: tuple[int, ...], order: str) -> np.ndarray:
    """``arr`` broadcast to ``shape``, axes reversed for F order (a view)."""
    view = arr if arr.shape == shape else np.broadcast_to(arr, shape)  # keeps out writeable
    return view.T if order == "F" else view


def _collapse(shape: tuple[int, ...],
              strides_list: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Drop size-1 dims, merge dims whose strides allow it: ``[(size, [strides])]``."""
    merged: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        sts = [st[d] for st in strides_list]
        if merged:
            psize, psts = merged[-1]
            if all(p == s * size for p, s in zip(psts, sts)):
                merged[-1] = (psize * size, sts)
                continue
        merged.append((size, sts))
    return merged


@dataclass
class Space:
    """The collapsed iteration space and the operands' strides in it (elements)."""

    n: int
    rows: int
    cols: int
    views: list[np.ndarray]  # iteration views, inputs then output
    offsets: list[int]
    row_strides: list[int]
    col_strides: list[int]
    base_ptrs: list[int]  # lowest address each operand touches

    def classes(self, scalars: list[bool]) -> str:
        """Stride class per operand: 's' scalar, 'c' unit column stride, 'g' general."""
        out = []
        for k, cs in enumerate(self.col_strides):
            if k < len(scalars) and scalars[k]:
                out.append("s")
            elif cs == 1 or self.cols == 1:
                out.append("c")
            else:
                out.append("g")
        return "".join(out)

    def meta(self) -> list[int]:
        m = [self.cols]
        for o, r, c in zip(self.offsets, self.row_strides, self.col_strides):
            m += [o, r, c]
        return m

    def grid(self, k: int) -> np.ndarray:
        """Operand ``k`` as an ``(rows, cols)`` strided view."""
        v = self.views[k]
        item = v.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            v,
            (self.rows, self.cols),
            (self.row_strides[k] * item, self.col_strides[k] * item),
            writeable=v.flags.writeable,
        )

    def segments(self, lo: int, hi: int):
        """Split flat ``[lo, hi)`` into row blocks: ``(r0, r1, c0, c1)`` tuples."""
        C = self.cols
        r, c = divmod(lo, C)
        if c:
            c1 = min(C, c + hi - lo)
            yield r, r + 1, c, c1
            lo += c1 - c
            r += 1
        if hi - lo >= C:
            full = (hi - lo) // C
            yield r, r + full, 0, C
            lo += full * C
            r += full
        if hi > lo:
            yield r, r + 1, 0, hi - lo


def build_space(views: list[np.ndarray]) -> Space | None:
    """Collapse the iteration views; ``None`` if one would need a third dimension."""
    shape = views[-1].shape
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    strides = [
        [s // v.dtype.itemsize for s in v.strides] for v in views
    ]
    merged = _collapse(shape, strides)
    if len(merged) > 2:
        return None
    if len(merged) == 0:
        rows, cols = 1, 1
        rs = [0] * len(views)
        cs = [0] * len(views)
    elif len(merged) == 1:
        rows, cols = 1, merged[0][0]
        rs = [0] * len(views)
        cs = list(merged[0][1])
    else:
        (rows, rs), (cols, cs) = merged
        rs, cs = list(rs), list(cs)
    offsets, bases = [], []
    for v, r, c in zip(views, rs, cs):
        item = v.dtype.itemsize
        low = min(0, (rows - 1) * r) + min(0, (cols - 1) * c)
        offsets.append(-low)
        bases.append(v.__array_interface__["data"][0] + low * item)
    return Space(n, rows, cols, views, offsets, rs, cs, bases)


def bad_operands(views: list[np.ndarray]) -> list[int]:
    """Inputs (not the output) that are not C-contiguous: the ones worth copying."""
    return [k for k, v in enumerate(views[:-1]) if not v.flags.c_contiguous]


def space_copying(views: list[np.ndarray]) -> tuple[Space | None, list[np.ndarray]]:
    """The space of ``views`` (the inputs, then the output), copying to C-contiguous
    memory the inputs that would need a third dimension: ``(space, views)``.

    ``space`` is None only when the output itself is the obstacle (the caller then
    computes into a temporary and copies back). Every engine's operands go
    through here.
    """
    space = build_space(views)
    if space is None:
        views = list(views)
        for k in bad_operands(views):
            views[k] = np.ascontiguousarray(views[k])
        space = build_space(views)
    return space, views


def same_elements(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` view the very same elements in the same order."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
        and a.dtype == b.dtype
    )


def allocate_output(call) -> tuple[np.ndarray, np.ndarray]:
    """``(target, out)`` for a call: where kernels write, and what the call returns.

    ``target`` is ``call.out`` itself, or a new native array of the call's shape,
    dtype and order: when no ``out=`` was given, and for an ``out=`` that is
    byte-swapped or unaligned (copied back into ``out`` at the end).
    """
    out = call.out
    if out is None:
        target = np.empty(call.shape, call.out_dtype, order=call.order)
        return target, target
    if needs_native_copy(out):
        return np.empty(call.shape, out.dtype.newbyteorder("="), order=call.order), out
    return out, out


def _operand_space(call, target: np.ndarray, inputs: bool) -> Space | None:
    """The space of the call's inputs (with ``inputs``) and ``target``; None when the
    target itself has no 2-D form."""
    out_view = iteration_view(target, call.shape, call.order)
    if not inputs:
        return build_space([out_view])
    arrays = []
    for inp in call.inputs:
        arr = inp.array if inp.is_scalar else native(inp.array)
        if call.kind == "builtin":
            arr = arr.astype(call.out_dtype, copy=False)
        arrays.append(arr)
    if call.kind == "builtin":  # its parameters, as stride-0 operands after the inputs
        arrays += call.func.operands(call.out_dtype)
    views = [iteration_view(a, call.shape, call.order) for a in arrays]
    # An input that overlaps out, other than as the very same elements, is read
    # from a copy: NumPy's answer for overlapping ufunc operands.
    for k, (a, v) in enumerate(zip(arrays, views)):
        if a.size > 1 and np.may_share_memory(a, target) and not same_elements(v, out_view):
            views[k] = iteration_view(a.copy(), call.shape, call.order)
    space, _ = space_copying([*views, out_view])
    return space


@dataclass
class Operands:
    """A call's operands, ready for kernels (see ``prepare_operands``)."""

    space: Space  # the inputs' and the target's iteration views, collapsed
    target: np.ndarray  # where kernels write
    out: np.ndarray  # what the call returns

    def result(self) -> np.ndarray:
        """``out``, with the target copied into it when they differ."""
        if self.target is not self.out:
            np.copyto(self.out, self.target, casting="same_kind")
        return self.out


def prepare_operands(call, target: np.ndarray | None = None, temporary=None,
                     private: bool = False, inputs: bool = True) -> Operands:
    """The operands of ``call`` (a ``_plan.Call``) for every engine: the one place that
    allocates the output, builds the iteration space and falls back to a temporary.

    ``target`` is where kernels write (default: ``allocate_output``'s). ``temporary()``
    makes a replacement target when ``target`` has no 2-D form (default: a native
    array of the call's shape); with ``private`` it also replaces ``out=`` itself,
    so nothing is written into the caller's array before ``result()``. Without
    ``inputs`` the space holds only the target (an engine that ships inputs on its
    own). The call's result dtype must be known.
    """
    default, out = allocate_output(call)
    if target is None:
        target = default
    if temporary is None:
        def temporary():
            return np.empty(call.shape, out.dtype.newbyteorder("="), order=call.order)
    if private and target is call.out:
        target = temporary()
    space = _operand_space(call, target, inputs)
    if space is None:  # an out= whose layout has no 2-D form: compute into a temporary
        target = temporary()
        space = _operand_space(call, target, inputs)
        if space is None:  # a new contiguous array always has a 2-D form
            raise RuntimeError("the temporary output has no 2-D form (internal error)")
    return Operands(space, target, out)
