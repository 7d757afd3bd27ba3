"""Python's math errors inside compiled code: ``math`` functions that raise as CPython's do.

Numba compiles ``math.sqrt(-1.0)`` to the C library's answer, ``nan``; CPython
raises ``ValueError: math domain error``. When coremap compiles a user's
function it swaps the ``math`` module it sees (and functions imported from it)
for :func:`module`, whose functions call the same C function and then apply
CPython's own rule (``Modules/mathmodule.c``, ``math_1``):

* a NaN result from arguments that are not NaN -> ``ValueError("math domain error")``;
* an infinite result from finite arguments -> ``OverflowError("math range error")``
  for functions that can overflow (``exp``, ``cosh``, ...), else ``ValueError``
  (a pole: ``log(0.0)``, ``atanh(1.0)``).

Everything else in ``math`` (constants, ``floor``, ``isnan``...) is passed
through unchanged. The checks are two compares after each call.

``int(x)`` of a float is swapped for :func:`checked_int`: NaN raises
``ValueError`` and infinity ``OverflowError`` as in Python, and a float beyond
the 64-bit range raises ``OverflowError`` (Python's unbounded int would hold
it; a compiled int64 cannot: loud rather than wrong). Other argument types
convert as before. Where the swap does not type (``dtype=int``,
``isinstance(v, int)``), the function is compiled again without it
(``_numba.resolve``).
"""
from __future__ import annotations

import math
import types
from typing import Any

# name -> can overflow (CPython's ``can_overflow`` flag; False means an infinite
# result from a finite argument is a pole, ValueError)
_ONE_ARG = {
    "sqrt": False, "log2": False, "log10": False, "log1p": False,
    "acos": False, "asin": False, "acosh": False, "atanh": False,
    "sin": False, "cos": False, "tan": False,
    "exp": True, "expm1": True, "cosh": True, "sinh": True,
}
# functions that CPython checks on two arguments (both finite -> finite result)
_TWO_ARG = {"fmod": False, "hypot": True, "remainder": False}

_SOURCE_ONE = """
def {name}(x):
    return _check1(x, math.{name}(x), {overflow})
"""
_SOURCE_TWO = """
def {name}(x, y):
    return _check2(x, y, math.{name}(x, y), {overflow})
"""

_module: types.ModuleType | None = None


# The checks are split in two: a hot part, one ``isfinite`` test of the result,
# and a cold part called only for a NaN or infinite result, which applies the
# rule. Written as one function with both tests, the checks cost W2 (sin, exp,
# sqrt per element) 14-15 % on one core (12.3 vs 14.3 ms at 10^6 elements, AMD
# EPYC); split, the cost is not measurable (12.31 ms): Numba cannot keep the
# exception paths out of the hot loop otherwise.


def _rule1(x, r, can_overflow):
    if math.isnan(r):
        if not math.isnan(x):
            raise ValueError("math domain error")
    elif math.isfinite(x):
        if can_overflow:
            raise OverflowError("math range error")
        raise ValueError("math domain error")
    return r


def _rule2(x, y, r, can_overflow):
    if math.isnan(r):
        if not (math.isnan(x) or math.isnan(y)):
            raise ValueError("math domain error")
    elif math.isfinite(x) and math.isfinite(y):
        if can_overflow:
            raise OverflowError("math range error")
        raise ValueError("math domain error")
    return r


def _check1(x, r, can_overflow):
    if not math.isfinite(r):
        return _rule1(x, r, can_overflow)
    return r


def _check2(x, y, r, can_overflow):
    if not math.isfinite(r):
        return _rule2(x, y, r, can_overflow)
    return r


def _log(x, base=None):
    r = _check1(x, math.log(x), False)
    if base is not None:  # pruned at compile time when there is no base
        r = r / _check1(base, math.log(base), False)  # log(x, 1.0): ZeroDivisionError
    return r


def _pow_rule(x, y, r):
    if math.isinf(r) and math.isfinite(x) and math.isfinite(y):
        if x == 0.0:
            raise ValueError("math domain error")
        raise OverflowError("math range error")
    return _rule2(x, y, r, True)


def _pow(x, y):
    r = math.pow(x, y)
    if not math.isfinite(r):
        return _pow_rule(x, y, r)
    return r


def _gamma(x):
    if math.isfinite(x) and x <= 0 and x == math.floor(x):
        raise ValueError("math domain error")
    return _check1(x, math.gamma(x), True)


def _lgamma(x):
    if math.isfinite(x) and x <= 0 and x == math.floor(x):
        raise ValueError("math domain error")
    return _check1(x, math.lgamma(x), True)


# 2**63 as a float: the first float that does not fit an int64
_INT64_END = 9.223372036854775808e18


def checked_int(x):
    """``int(x)``, with Python's errors for NaN and infinity (compiled by an overload)."""
    return int(x)


_int_registered = False


def register_int() -> None:
    """Give :func:`checked_int` its compiled overload (once)."""
    global _int_registered
    if _int_registered:
        return
    import numba
    from numba.core import types as nt
    from numba.extending import overload

    @numba.njit(nogil=True, error_model="python")
    def int_rule(x):  # always raises: kept out of the hot path, as _rule1 is
        if x != x:
            raise ValueError("cannot convert float NaN to integer")
        if math.isinf(x):
            raise OverflowError("cannot convert float infinity to integer")
        raise OverflowError("int too large for a compiled 64-bit integer")

    @overload(checked_int, jit_options={"nogil": True, "error_model": "python"})
    def _checked_int(x):
        if not isinstance(x, nt.Float):
            return lambda x: int(x)

        def impl(x):
            if not -_INT64_END <= x < _INT64_END:  # NaN and infinities too: cold path
                int_rule(x)
            return int(x)

        return impl

    _int_registered = True


def module() -> types.ModuleType:
    """The checked ``math`` module (built once): compiled lazily, per argument type."""
    global _module
    if _module is not None:
        return _module
    import numba

    jit = numba.njit(nogil=True, error_model="python")
    ns: dict[str, Any] = {"math": math}  # exec fills in the generated functions
    rules = {"math": math, "_rule1": jit(_rule1), "_rule2": jit(_rule2)}
    ns["_check1"] = jit(types.FunctionType(_check1.__code__, rules, "_check1"))
    ns["_check2"] = jit(types.FunctionType(_check2.__code__, rules, "_check2"))
    for name, overflow in _ONE_ARG.items():
        exec(_SOURCE_ONE.format(name=name, overflow=overflow), ns)  # generated: see above
    for name, overflow in _TWO_ARG.items():
        exec(_SOURCE_TWO.format(name=name, overflow=overflow), ns)
    mod = types.ModuleType("math", "math, with CPython's domain and range errors")
    for name in dir(math):
        if not name.startswith("_"):
            setattr(mod, name, getattr(math, name))
    for name in (*_ONE_ARG, *_TWO_ARG):
        ns[name].__qualname__ = f"math.{name}"
        setattr(mod, name, jit(ns[name]))
    rules["_pow_rule"] = jit(types.FunctionType(_pow_rule.__code__, rules, "_pow_rule"))
    for name, fn in (("log", _log), ("pow", _pow), ("gamma", _gamma), ("lgamma", _lgamma)):
        glob = {"math": math, "_check1": ns["_check1"], "_check2": ns["_check2"],
                "_pow_rule": rules["_pow_rule"]}
        setattr(mod, name, jit(types.FunctionType(fn.__code__, glob, name, fn.__defaults__)))
    _module = mod
    return mod


def checked(value: object) -> object:
    """The checked stand-in for ``value`` (the ``math`` module or one of its functions)."""
    if value is math:
        return module()
    name = getattr(value, "__name__", None)
    if getattr(value, "__module__", None) == "math" and name in _CHECKED_NAMES:
        return getattr(module(), name)
    return value


_CHECKED_NAMES = frozenset((*_ONE_ARG, *_TWO_ARG, "log", "pow", "gamma", "lgamma"))
