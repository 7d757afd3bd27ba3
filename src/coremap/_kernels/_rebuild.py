"""What Numba compiles for a user's function: a copy that reads its globals as Python does.

    user function f ──rebuild(f)──> a copy of f (same code, new globals and closure cells):
        math, math.sqrt, ..., int   -> the checked math of _checked.py (Python's errors)
        a plain Python helper       -> its own rebuilt copy, jitted (recursively, cycles too)
        a global or closure ndarray -> an ArrayRef: the compiled code reads the live array
                                       (its address), not a copy frozen at compile time
        a number, a string, a tuple -> itself: Numba folds it in as a constant
    and a Watch: every global (and closure cell) the code reads, with the value it had.

Numba freezes every global at compile time. Python reads them at each call. The
Watch closes that gap: ``Watch.current()`` runs before every use of a compiled
kernel (the fast path included) and is False once a number changed or a name
was rebound; the kernel is then compiled again with the new values. Arrays are
read by reference, so changing their elements needs no recompile; rebinding
the name (``TABLE = np.array(...)``) does, and is seen.

What stays Numba's: a global array resized in place (its address changes under
the compiled code) is not seen; integer arithmetic wraps at 64 bits (the guard,
``_guard.py``, catches it on the elements it samples).
"""
from __future__ import annotations

import numbers
import types

import numpy as np

from coremap._kernels import _checked

JIT_OPTIONS = {"nogil": True, "error_model": "python"}
_LOADS = frozenset(("LOAD_GLOBAL", "LOAD_NAME"))
_MISSING = object()
_BY_VALUE = (numbers.Number, np.generic, str, bytes)


class Watch:
    """The globals and closure cells a compiled function read, with their values then."""

    __slots__ = ("globals", "cells", "scalars", "arrays", "helpers", "checked_int")

    def __init__(self) -> None:
        self.globals: list = []  # (namespace dict, name, value, compare by value)
        self.cells: list = []  # (cell, value, compare by value)
        self.scalars: list[str] = []
        self.arrays: list[str] = []
        self.helpers: list[str] = []
        self.checked_int = False  # int() swapped for _checked.checked_int somewhere

    def current(self) -> bool:
        """True while every watched name still holds what the compiled code assumed."""
        for ns, name, value, by_value in self.globals:
            cur = ns.get(name, _MISSING)
            if cur is not value and not (by_value and type(cur) is type(value)
                                         and _equal(cur, value)):
                return False
        for cell, value, by_value in self.cells:
            try:
                cur = cell.cell_contents
            except ValueError:  # the cell was emptied (del)
                return False
            if cur is not value and not (by_value and type(cur) is type(value)
                                         and _equal(cur, value)):
                return False
        return True

    @property
    def empty(self) -> bool:
        return not (self.globals or self.cells)


def _by_value(value) -> bool:
    """Compared by value (a number, a string, a tuple of those), else by identity."""
    if isinstance(value, tuple):
        return all(_by_value(v) for v in value)
    return isinstance(value, _BY_VALUE)


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd __eq__: treat as changed
        return False


def global_names(code: types.CodeType) -> set[str]:
    """Names ``code`` (and the code nested in it) loads as globals."""
    import dis  # at the first compile, not at ``import coremap``

    names = set()
    for ins in dis.get_instructions(code):
        if ins.opname in _LOADS:
            names.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names


def is_plain_function(obj) -> bool:
    """A function written in Python (def or lambda): what Numba's njit can take."""
    return (isinstance(obj, types.FunctionType)
            and not obj.__code__.co_flags & (0x20 | 0x80 | 0x100 | 0x200))  # generators, async


class ArrayRef:
    """A global ndarray as the compiled code sees it: by reference (see ``_register``)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _array_ref_ok(arr: np.ndarray) -> bool:
    dt = arr.dtype  # what Numba types: native numbers, not float16 nor long double
    return dt.isnative and dt.kind in "biufc" and dt.char not in "egG"


_registered = False


def _register() -> None:
    """Teach Numba the ArrayRef: typed as an array, lowered as a pointer to the live data."""
    global _registered
    if _registered:
        return
    import numba
    from numba.core import cgutils
    from numba.core import types as nt
    from numba.core.imputils import lower_constant
    from numba.extending import models, register_model, typeof_impl

    class ArrayRefType(nt.Array):
        def __init__(self, dtype, ndim, layout):
            super().__init__(dtype, ndim, layout, readonly=False,
                             name=f"array_ref({dtype}, {ndim}d, {layout})")

        def copy(self, dtype=None, ndim=None, layout=None, readonly=None):
            # Numba marks global arrays read-only with copy(readonly=True): keep ours
            # (its constant is lowered by reference below); any other copy is an array.
            if dtype is None and ndim is None and layout is None:
                return self
            return nt.Array(dtype or self.dtype, ndim or self.ndim, layout or self.layout)

    register_model(ArrayRefType)(models.ArrayModel)

    @typeof_impl.register(ArrayRef)
    def _typeof(val, c):
        a = val.array
        layout = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"
        return ArrayRefType(numba.from_dtype(a.dtype), a.ndim, layout)

    @lower_constant(ArrayRefType)
    def _lower(context, builder, ty, pyval):
        a = pyval.array
        ary = context.make_array(ty)(context, builder)
        data = builder.inttoptr(context.get_constant(nt.uintp, a.ctypes.data), ary.data.type)
        shape = cgutils.pack_array(builder, [context.get_constant(nt.intp, s) for s in a.shape])
        strides = cgutils.pack_array(builder,
                                     [context.get_constant(nt.intp, s) for s in a.strides])
        context.populate_array(ary, data=data, shape=shape, strides=strides,
                               itemsize=context.get_constant(nt.intp, a.itemsize), meminfo=None)
        return ary._getvalue()

    _registered = True


class _Rebuilder:
    """One rebuild: the jitted helpers made so far (by identity) and the Watch."""

    def __init__(self, jit, check_int: bool) -> None:
        self.jit = jit
        self.check_int = check_int
        self.watch = Watch()
        self.done: dict[int, object] = {}

    def substitute(self, name: str, value):
        """The value the compiled code sees for ``value`` (named ``name``); None: keep it."""
        import numba

        if isinstance(value, np.ndarray):
            if _array_ref_ok(value):
                self.watch.arrays.append(name)
                return ArrayRef(value)
            return None
        if _by_value(value):
            self.watch.scalars.append(name)
            return None
        if value is int and self.check_int:
            self.watch.checked_int = True
            return _checked.checked_int
        if isinstance(value, types.ModuleType) or getattr(value, "__module__", None) == "math":
            return _checked.checked(value)
        if isinstance(value, numba.core.dispatcher.Dispatcher):
            return None
        if is_plain_function(value):
            if id(value) not in self.done:  # (the function itself is done first)
                self.watch.helpers.append(name)
            return self.function(value)
        return None

    def function(self, func):
        """The jitted, rebuilt copy of a helper (made once per rebuild)."""
        done = self.done.get(id(func))
        if done is not None:
            return done
        copy, fill = _copy(func)
        disp = self.jit(copy)
        self.done[id(func)] = disp  # before its globals: a recursive helper finds itself
        self._fill(func, *fill)
        return disp

    def _fill(self, func, new_globals, closure) -> None:
        g = func.__globals__
        for name in global_names(func.__code__):
            value = g.get(name, _MISSING)
            if value is _MISSING:  # a builtin (or a NameError, raised by the compile)
                if name == "int" and self.check_int:
                    new_globals[name] = _checked.checked_int  # see _checked.py
                    self.watch.checked_int = True
                continue
            self.watch.globals.append((g, name, value, _by_value(value)))
            sub = self.substitute(name, value)
            new_globals[name] = value if sub is None else sub
        if closure:
            for name, cell, new in zip(func.__code__.co_freevars, func.__closure__, closure):
                try:
                    value = cell.cell_contents
                except ValueError:
                    continue  # not bound yet: Numba reports it
                self.watch.cells.append((cell, value, _by_value(value)))
                sub = self.substitute(name, value)
                new.cell_contents = value if sub is None else sub


def _copy(func):
    """A copy of ``func`` with an empty globals dict and empty cells, to be filled."""
    new_globals = {"__builtins__": func.__globals__.get("__builtins__", __builtins__)}
    closure = None
    if func.__closure__:
        closure = tuple(types.CellType() for _ in func.__closure__)
    copy = types.FunctionType(func.__code__, new_globals, func.__name__,
                              func.__defaults__, closure)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    return copy, (new_globals, closure)


def rebuild(func, jit, check_int: bool = True) -> tuple[object, Watch]:
    """The dispatcher of ``func``'s rebuilt copy (not compiled yet), and its Watch.

    ``jit`` turns a copy into a dispatcher (``numba.njit(**JIT_OPTIONS)``);
    ``check_int`` swaps ``int`` for ``_checked.checked_int``.
    """
    _register()
    _checked.register_int()
    r = _Rebuilder(jit, check_int)
    disp = r.function(func)
    return disp, r.watch
