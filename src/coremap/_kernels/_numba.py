"""Numba: a user's scalar function, compiled into a GIL-free chunk kernel.

For the dtypes of a call, the scalar function ``f`` is compiled with
``njit(nogil=True, error_model="numpy")`` and then wrapped in a generated
``numba.cfunc`` that follows the runner's calling convention (see
``_runner.pxd``): the Cython runner calls its address with no GIL held. The
wrapper is specialised on each operand's *stride class*:

* ``"c"``: unit column stride, indexed ``a[base + c]`` so LLVM vectorizes the loop
  (BENCHMARKS.md: indexing full arrays with a runtime stride ran 4.6x slower on W1);
* ``"s"``: a scalar (both strides 0), read once before the loop;
* ``"g"``: any other stride, indexed ``a[base + c * cs]``.

A cfunc cannot raise: when ``f`` raises, Numba's wrapper returns the zeroed
result (0, where success returns 1) after reporting the exception through
``sys.unraisablehook``. The engine then re-runs that chunk element by element
through :func:`first_failure` to raise the real exception with its index, and
the hook installed here hides the duplicate report of failures inside coremap's
own kernels (and nothing else). A ``try``/``except`` in the generated kernel
would avoid the report, but measured it tripled the compile time (0.12 s ->
0.47 s for W2), against the 0.5 s first-call budget in BENCHMARKS.md.

Kernels are ``parallel=False``: parallelism is coremap's, never Numba's.
Compiled kernels are cached in memory per (function, dtypes, stride classes);
nothing is compiled twice for the same call signature.
"""
from __future__ import annotations

import sys
import threading
import weakref

import numpy as np

_lock = threading.RLock()
# function -> {(in dtypes, out dtype, stride classes): cfunc}; weak, so a
# discarded function frees its machine code with it.
_kernels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# function -> {in dtypes: (jitted function, result dtype)}
_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# function -> njit dispatcher (for functions that are not dispatchers already)
_dispatchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_BIG = 1 << 62  # nominal carray length: indices are unchecked, the planner bounds them


_scope = threading.local()
_hook_installed = False


class _KernelScope:
    """Marks the current thread as running coremap kernels (see the module docstring).

    A class, not ``contextlib.contextmanager``: it is on the fast path, where the
    generator version cost 2 us a call.
    """

    __slots__ = ()

    def __enter__(self):
        _scope.active = True

    def __exit__(self, *exc):
        _scope.active = False


_KERNEL_SCOPE = _KernelScope()


def kernel_scope() -> _KernelScope:
    return _KERNEL_SCOPE


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        obj = unraisable.object
        if (
            getattr(_scope, "active", False)
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


def _dispatcher(func):
    numba = _numba()
    if isinstance(func, numba.core.dispatcher.Dispatcher):
        return func
    disp = _dispatchers.get(func)
    if disp is None:
        disp = numba.njit(nogil=True, error_model="numpy")(func)
        _dispatchers[func] = disp
    return disp


def resolve(func, in_dtypes: tuple[np.dtype, ...]):
    """Compile ``func`` for ``in_dtypes``; return ``(jitted, result dtype)``.

    Raises
    ------
    NotCompilable
        Numba cannot compile it in nopython mode; the message names Numba's error.
    TypeError
        It compiles but does not return one number per element.
    """
    numba = _numba()
    from numba.np import numpy_support

    with _lock:
        per_func = _signatures.setdefault(func, {})
        hit = per_func.get(in_dtypes)
        if isinstance(hit, NotCompilable):
            raise hit  # a failed compile is remembered too: it costs milliseconds
        if hit is not None:
            return hit
        try:
            types = tuple(numpy_support.from_dtype(dt) for dt in in_dtypes)
        except (NotImplementedError, numba.core.errors.NumbaError) as exc:
            raise NotCompilable(f"Numba does not support dtypes {in_dtypes}: {exc}") from exc
        disp = _dispatcher(func)
        try:
            disp.compile(types)
        except Exception as exc:  # TypingError, UnsupportedError, LoweringError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failure = NotCompilable(f"{type(exc).__name__}: {first}")
            per_func[in_dtypes] = failure
            raise failure from exc
        rtype = disp.overloads[types].signature.return_type
        if not isinstance(rtype, (numba.types.Number, numba.types.Boolean)):
            name = getattr(func, "__name__", repr(func))
            raise TypeError(
                f"{name} returns {rtype} for inputs of dtype "
                f"{', '.join(str(d) for d in in_dtypes)}; parallel_map needs a function that "
                "returns one number per element (use vectorized=True for chunk functions)"
            )
        result = (disp, numpy_support.as_dtype(rtype))
        per_func[in_dtypes] = result
        return result


def _source(nin: int, classes: str) -> str:
    """Python source of the chunk kernel for ``nin`` inputs and one output."""
    out = nin
    lines = ["def kernel(ptrs, meta, lo, hi):", "    C = meta[0]"]
    for k in range(nin + 1):
        lines.append(f"    a{k} = carray(ptrs[{k}], (BIG,), dt{k})")
        lines.append(
            f"    off{k} = meta[{1 + 3 * k}]; rs{k} = meta[{2 + 3 * k}]; cs{k} = meta[{3 + 3 * k}]"
        )
        if classes[k] == "s":
            lines.append(f"    v{k} = a{k}[off{k}]")
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
        args.append(f"a{k}[b{k} + c]" if cls == "c" else f"a{k}[b{k} + c * cs{k}]")
    target = args.pop(out)
    lines += [
        "        for c in range(c0, cend):",
        f"            {target} = fn({', '.join(args)})",
        "        i += cend - c0",
        "        r += 1",
        "        c0 = 0",
        "    return 1",
    ]
    return "\n".join(lines) + "\n"


def kernel_address(func, in_dtypes, out_dtype, classes: str) -> int:
    """Address of the cfunc chunk kernel (compiled once per signature and classes)."""
    key = (in_dtypes, out_dtype, classes)
    with _lock:
        per_func = _kernels.setdefault(func, {})
        cf = per_func.get(key)
        if cf is None:
            cf = _build(func, in_dtypes, out_dtype, classes)
            per_func[key] = cf
        return cf.address


def _build(func, in_dtypes, out_dtype, classes):
    numba = _numba()
    from numba import types

    _install_hook()
    jitted, _ = resolve(func, in_dtypes)
    ns = {"carray": numba.carray, "BIG": _BIG, "fn": jitted}
    for k, dt in enumerate((*in_dtypes, out_dtype)):
        ns[f"dt{k}"] = dt
    exec(_source(len(in_dtypes), classes), ns)  # generated source: see _source
    sig = types.int64(types.CPointer(types.voidptr), types.CPointer(types.int64),
                      types.int64, types.int64)
    try:
        return numba.cfunc(sig, nopython=True, nogil=True, error_model="numpy")(ns["kernel"])
    except Exception as exc:  # e.g. a result that cannot be stored into out's dtype
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TypeError(
            f"cannot store the result of {getattr(func, '__name__', func)!r} into dtype "
            f"{out_dtype}: {first}"
        ) from exc


def first_failure(func, in_dtypes, getters, lo: int, hi: int):
    """Re-run elements ``lo..hi`` one by one: ``(index, exception)`` of the first failure.

    ``getters`` are callables of the flat index returning each input's element.
    Returns ``None`` if no element raises this time.
    """
    jitted, _ = resolve(func, in_dtypes)
    for i in range(lo, hi):
        try:
            jitted(*[get(i) for get in getters])
        except Exception as exc:
            return i, exc
    return None
