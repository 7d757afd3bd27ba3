"""Numba: a user's scalar function, compiled into a GIL-free chunk kernel.

    f ──_rebuild──> a copy reading globals as Python does, helpers jitted, checked math
      ──njit(nogil, error_model="python")──> jitted f for the call's dtypes (resolve)
      ──_guard──> agrees with Python on sampled elements? (else: run as Python)
      ──generated cfunc──> the chunk kernel the Cython runner calls (kernel_address)

For the dtypes of a call, the scalar function ``f`` is compiled with
``njit(nogil=True, error_model="python")`` and then wrapped in a generated
``numba.cfunc`` that follows the runner's calling convention (see
``_runner.pxd``): the Cython runner calls its address with no GIL held. The
wrapper is specialised on each operand's *stride class*:

* ``"c"``: unit column stride, indexed ``a[base + c]`` so LLVM vectorizes the loop
  (docs/benchmarks.rst: indexing full arrays with a runtime stride ran 4.6x slower on W1);
* ``"s"``: a scalar (both strides 0), read once before the loop;
* ``"g"``: any other stride, indexed ``a[base + c * cs]``.

A cfunc cannot raise: when ``f`` raises, Numba's wrapper returns the zeroed
result (0, where success returns 1) after reporting the exception through
``sys.unraisablehook``. The engine then re-runs that chunk element by element
through :func:`first_failure` to raise the real exception with its index, and
the hook installed here hides the duplicate report of failures inside coremap's
own kernels (and nothing else). A ``try``/``except`` in the generated kernel
would avoid the report, but measured it tripled the compile time (0.12 s ->
0.47 s for W2), against the 0.5 s first-call budget in docs/benchmarks.rst.

Python's error model (division by zero raises) cost nothing measurable on
W1-W3, which divide by nothing: the check sits on the division itself.

float16, which Numba lacks, is computed in float32 and stored as float16 (as
NumPy's ufuncs do): the kernel reads and writes its bits (``_half.py``).

Kernels are ``parallel=False``: parallelism is coremap's, never Numba's.
Compiled kernels are cached in memory per (function, dtypes, stride classes),
for as long as the globals the function read keep their values (``_rebuild.Watch``);
nothing is compiled twice for the same call signature.

Builtins (``abs``, ``round``, ``math.sin``) are compiled through a one-line
wrapper; ``@njit`` functions are used as they are. Callable objects, bound
methods and partials are no functions Numba compiles: ``not_compilable_reason``.
"""
from __future__ import annotations

import functools
import math
import sys
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coremap._functions import func_name as _name
from coremap._kernels import _diagnose, _diskcache, _guard, _rebuild

_lock = threading.RLock()
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)

_BIG = 1 << 62  # nominal carray length: indices are unchecked, the planner bounds them


_hook_installed = False


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    from coremap._kernels import _runner

    previous = sys.unraisablehook

    def hook(unraisable):
        obj = unraisable.object
        if (
            _runner.in_kernel()
            and isinstance(obj, str)
            and obj.startswith("<numba.core.cpu.CPUContext")
        ):
            return  # a coremap kernel's failure: re-raised with its index by the engine
        previous(unraisable)

    sys.unraisablehook = hook
    _hook_installed = True


class NotCompilable(TypeError):
    """Numba cannot compile the function for these dtypes (nopython mode)."""


def _numba():
    import numba  # imported lazily: ``import coremap`` must stay fast

    return numba


# -- which callables compile -----------------------------------------------------------

def is_numba_ufunc(func: object) -> bool:
    """A ``@numba.vectorize`` (DUFunc) or ``@numba.guvectorize`` (GUFunc) object."""
    return type(func).__module__.startswith("numba.np.ufunc") and hasattr(func, "nin")


def is_dispatcher(func: object) -> bool:
    """An ``@numba.njit`` function: compiled as the user asked, Numba's semantics."""
    return type(func).__module__.startswith("numba") and hasattr(func, "py_func")


def not_compilable_reason(func: object) -> str | None:
    """Why ``func`` is no function Numba compiles (None when it may compile)."""
    if is_dispatcher(func) or _rebuild.is_plain_function(func) or _is_builtin(func):
        return None
    if isinstance(func, functools.partial):
        what = "a functools.partial"
    elif isinstance(func, types.MethodType):
        what = "a bound method"
    elif isinstance(func, types.FunctionType):
        what = "a generator or coroutine function"
    elif isinstance(func, type):
        what = f"the class {func.__qualname__}"
    elif isinstance(func, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        what = f"the built-in {getattr(func, '__qualname__', func)!r} of a C module"
    else:
        what = f"a callable {type(func).__name__} object"
    return (f"Numba compiles plain functions only, and {_name(func)} is {what} (wrap the "
            "computation in a def, or pass backend='processes')")


def _is_builtin(func) -> bool:
    """A builtin or ``math`` function Numba knows (abs, round, min, math.sin, int, ...)."""
    if isinstance(func, (types.BuiltinFunctionType, type)):
        return getattr(func, "__module__", None) in ("builtins", "math", "cmath", "_operator",
                                                      "operator")
    return False


_wrappers: dict = {}  # (builtin, number of inputs) -> plain function calling it


def _target(func, nin: int):
    """What gets compiled for ``func``: itself, or for a builtin a function calling it."""
    if not _is_builtin(func):
        return func
    key = (func, nin)
    wrapper = _wrappers.get(key)
    if wrapper is None:
        args = ", ".join(f"a{k}" for k in range(nin))
        ns = {"target": func}
        exec(f"def wrapper({args}):\n    return target({args})\n", ns)  # generated
        wrapper = ns["wrapper"]
        wrapper.__name__ = wrapper.__qualname__ = getattr(func, "__name__", "builtin")
        _wrappers[key] = wrapper
    return wrapper


# -- compiling -------------------------------------------------------------------------

class _Compiled:
    """One user function compiled under the globals it read (see ``_rebuild.Watch``)."""

    __slots__ = ("dispatcher", "watch", "signatures", "kernels", "verdicts", "own",
                 "__weakref__")

    dispatcher: Any  # a numba Dispatcher (numba has no type information)
    watch: _rebuild.Watch

    def __init__(self, func, check_int: bool = True) -> None:
        numba = _numba()
        self.own = not is_dispatcher(func)
        if self.own:
            self.dispatcher, self.watch = _rebuild.rebuild(
                func, numba.njit(**_rebuild.JIT_OPTIONS), check_int)
            _diskcache.attach(self.dispatcher, func)  # on disk too, when it can be keyed
        else:  # the user's own @njit: compiled as they asked, globals as Numba reads them
            self.dispatcher, self.watch = func, _rebuild.Watch()
        self.signatures: dict = {}  # in dtypes -> (jitted, result dtype) or a failure text
        self.kernels: dict = {}  # (in dtypes, out dtype, stride classes) -> cfunc
        self.verdicts: dict = {}  # in dtypes -> None (guard passed) or the mismatch


# function (or a builtin's wrapper) -> _Compiled; weak, so a discarded function
# frees its machine code with it.
_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(func: object, nin: int) -> _Compiled:
    """``func``'s compiled state, rebuilt when a global it read has changed since."""
    target = _target(func, nin)
    st = _state.get(target)
    if st is None or not st.watch.current():
        with _lock:
            st = _state.get(target)
            if st is None or not st.watch.current():
                st = _state[target] = _Compiled(target)
    return st


def watch_of(func: object, nin: int) -> _rebuild.Watch | None:
    """The Watch the fast path checks before each call, or None when there is nothing."""
    w = compiled(func, nin).watch
    return None if w.empty else w


def compute_dtype(dt: np.dtype) -> np.dtype:
    """The dtype a kernel computes in: float16, which Numba lacks, as float32 (as NumPy)."""
    return _F32 if dt == _F16 else dt


def resolve(func: object, in_dtypes: tuple[np.dtype, ...]) -> tuple[Any, np.dtype]:
    """Compile ``func`` for ``in_dtypes``; return ``(jitted, result dtype)``.

    The single compile entry point: the function is rebuilt so that it reads its
    globals as Python does and calls compiled helpers (``_rebuild.py``), and
    compiled with Python's error model (``ZeroDivisionError``, math domain errors).

    Raises
    ------
    NotCompilable
        Numba cannot compile it in nopython mode; the message quotes Numba's cause.
    TypeError
        It compiles but does not return one number per element.
    """
    numba = _numba()
    from numba.np import numpy_support

    st = compiled(func, len(in_dtypes))
    with _lock:
        hit = st.signatures.get(in_dtypes)
        if isinstance(hit, str):
            # a failed compile is remembered as its message (not the exception, whose
            # traceback would keep Numba's compiler state alive): it costs milliseconds
            raise NotCompilable(hit)
        if hit is not None:
            return hit
        compute = tuple(compute_dtype(dt) for dt in in_dtypes)
        try:
            types_ = tuple(numpy_support.from_dtype(dt) for dt in compute)
        except (NotImplementedError, numba.core.errors.NumbaError) as exc:
            raise NotCompilable(f"Numba does not support dtypes {in_dtypes}: {exc}") from exc
        disp = st.dispatcher
        try:
            disp.compile(types_)
        except Exception as exc:  # TypingError, UnsupportedError, LoweringError, ...
            disp = _without_checked_int(func, st, types_)
            if disp is None:
                text = _diagnose.explain(exc, _name(func))
                st.signatures[in_dtypes] = text
                raise NotCompilable(text) from None
        rtype = disp.overloads[types_].signature.return_type
        if not isinstance(rtype, (numba.types.Number, numba.types.Boolean)):
            raise TypeError(
                f"{_name(func)} returns {rtype} for inputs of dtype "
                f"{', '.join(str(d) for d in in_dtypes)}; parallel_map needs a function that "
                "returns one number per element (use vectorized=True for chunk functions)"
            )
        result = numpy_support.as_dtype(rtype)
        if result == _F32 and _F16 in in_dtypes and _F32 not in in_dtypes:
            result = _F16  # NumPy's rule: float16 in, float16 out (computed in float32)
        st.signatures[in_dtypes] = (disp, result)
        return disp, result


def _without_checked_int(func, st: _Compiled, types_):
    """Compile again with the plain ``int`` when the checked one did not type (None: no)."""
    if not (st.own and st.watch.checked_int):
        return None
    plain = _Compiled(_target(func, len(types_)), check_int=False)
    try:
        plain.dispatcher.compile(types_)
    except Exception:  # noqa: BLE001 - the first error is the one to report
        return None
    return plain.dispatcher


def guard(func: object, in_dtypes: tuple[np.dtype, ...], out_dtype: np.dtype,
          inputs: Sequence[object], shape: tuple[int, ...]) -> str | None:
    """The semantic guard's verdict for (func, dtypes): None, or the mismatch (cached)."""
    st = compiled(func, len(in_dtypes))
    if not st.own:
        return None  # an @njit function: Numba's semantics were asked for
    with _lock:
        if in_dtypes in st.verdicts:
            return st.verdicts[in_dtypes]
    if math.prod(shape) == 0:
        return None  # nothing to compare: judged on the first call with elements
    jitted, _ = resolve(func, in_dtypes)
    verdict = _guard.check(func, jitted, _name(func), in_dtypes, out_dtype, inputs, shape,
                           compute_dtype)
    with _lock:
        st.verdicts[in_dtypes] = verdict
    return verdict


def notes(func: object, in_dtypes: tuple[np.dtype, ...]) -> list[str]:
    """What ``explain`` says about how ``func`` was compiled."""
    st = compiled(func, len(in_dtypes))
    if not st.own:
        return ["an @numba.njit function: run as compiled, with its own options"]
    w = st.watch
    out = ["Python's error model: division by zero raises ZeroDivisionError, "
           "math domain errors raise ValueError"]
    if st.verdicts.get(in_dtypes, 1) is None:
        out.append("semantic guard passed: the kernel agrees with Python on sampled "
                   "elements (first and last included)")
    if w.helpers:
        out.append(f"helpers compiled too: {', '.join(w.helpers)}")
    tracked = [*(f"{n} (number: recompiled when it changes)" for n in w.scalars),
               *(f"{n} (array: read by reference)" for n in w.arrays)]
    if tracked:
        out.append(f"globals tracked: {', '.join(tracked)}")
    if _F16 in in_dtypes:
        out.append("float16 computed in float32 and stored as float16, as NumPy does")
    return out


def _source(nin: int, classes: str, halves: str = "") -> str:
    """Python source of the chunk kernel for ``nin`` inputs and one output.

    ``halves[k] == "h"`` marks a float16 operand: read and written as its bits.
    """
    halves = halves or "-" * (nin + 1)
    out = nin
    lines = ["def kernel(ptrs, meta, lo, hi):", "    C = meta[0]"]
    for k in range(nin + 1):
        lines.append(f"    a{k} = carray(ptrs[{k}], (BIG,), dt{k})")
        lines.append(
            f"    off{k} = meta[{1 + 3 * k}]; rs{k} = meta[{2 + 3 * k}]; cs{k} = meta[{3 + 3 * k}]"
        )
        if classes[k] == "s":
            lines.append(f"    v{k} = {'h2f' if halves[k] == 'h' else ''}(a{k}[off{k}])")
    lines += [
        "    r = lo // C",
        "    c0 = lo - r * C",
        "    i = lo",
        "    while i < hi:",
        "        cend = min(C, c0 + (hi - i))",
    ]
    args = []
    for k in range(nin + 1):
        cls = classes[k]
        if cls == "s":
            args.append(f"v{k}")
            continue
        lines.append(f"        b{k} = off{k} + r * rs{k}")
        arg = f"a{k}[b{k} + c]" if cls == "c" else f"a{k}[b{k} + c * cs{k}]"
        args.append(f"h2f({arg})" if halves[k] == "h" and k != out else arg)
    target = args.pop(out)
    call = f"fn({', '.join(args)})"
    if halves[out] == "h":
        call = f"f2h({call})"
    lines += [
        "        for c in range(c0, cend):",
        f"            {target} = {call}",
        "        i += cend - c0",
        "        r += 1",
        "        c0 = 0",
        "    return 1",
    ]
    return "\n".join(lines) + "\n"


def kernel_address(func: object, in_dtypes: tuple[np.dtype, ...], out_dtype: np.dtype,
                   classes: str) -> int:
    """Address of the cfunc chunk kernel (compiled once per signature and classes)."""
    key = (in_dtypes, out_dtype, classes)
    st = compiled(func, len(in_dtypes))
    with _lock:
        cf = st.kernels.get(key)
        if cf is None:
            cf = _build(func, in_dtypes, out_dtype, classes)
            st.kernels[key] = cf
        return cf.address


def _build(func, in_dtypes, out_dtype, classes):
    numba = _numba()
    from numba import types as nt

    from coremap._kernels import _half

    _install_hook()
    jitted, _ = resolve(func, in_dtypes)
    ns = {"carray": numba.carray, "BIG": _BIG, "fn": jitted}
    halves = ""
    for k, dt in enumerate((*in_dtypes, out_dtype)):
        half = dt == _F16
        halves += "h" if half else "-"
        ns[f"dt{k}"] = np.dtype(np.uint16) if half else dt
    if "h" in halves:
        ns["h2f"], ns["f2h"] = _half.h2f(), _half.f2h()
    source = _source(len(in_dtypes), classes, halves)
    exec(source, ns)  # generated source: see _source
    sig = nt.int64(nt.CPointer(nt.voidptr), nt.CPointer(nt.int64), nt.int64, nt.int64)
    try:
        return _diskcache.cfunc(sig, ns["kernel"], jitted, (source, in_dtypes, out_dtype),
                                nopython=True, nogil=True, error_model="numpy")
    except Exception as exc:  # e.g. a result that cannot be stored into out's dtype
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TypeError(
            f"cannot store the result of {_name(func)!r} into dtype "
            f"{out_dtype}: {first}"
        ) from exc


def first_failure(func: object, in_dtypes: tuple[np.dtype, ...],
                  getters: Sequence[Callable[[int], object]], lo: int,
                  hi: int) -> tuple[int, Exception] | None:
    """Re-run elements ``lo..hi`` one by one: ``(index, exception)`` of the first failure.

    ``getters`` are callables of the flat index returning each input's element.
    Returns ``None`` if no element raises this time.
    """
    jitted, _ = resolve(func, in_dtypes)
    casts = [compute_dtype(dt).type for dt in in_dtypes]
    for i in range(lo, hi):
        try:
            jitted(*[cast(get(i)) for cast, get in zip(casts, getters)])
        except Exception as exc:
            return i, exc
    return None
