"""A plain Python function gives what Python gives: each row of issue 10's table, the
callables coremap accepts, globals read at call time, helpers, float16, and explain().

The reference is always the plain Python function applied to Python numbers (what the
process engine runs), or NumPy for float16.
"""
from __future__ import annotations

import functools
import math
import warnings

import numba
import numpy as np
import pytest

import coremap as cm
from coremap._api import CoremapWarning
from coremap._kernels import _checked, _half

ENGINES = ["threads", "serial"]  # the process engine: the few tests marked below


def python_answer(func, *arrays):
    arrays = np.broadcast_arrays(*arrays)
    return np.array([func(*row) for row in zip(*(a.ravel().tolist() for a in arrays))])


def kind_of(arrays, func, **kw):
    return cm.explain(arrays, func, **kw).kind


# -- 1. Python's errors ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ENGINES)
def test_float_division_by_zero_raises(backend):
    x = np.linspace(0.0, 1.0, 5000)
    with pytest.raises(ZeroDivisionError):
        cm.parallel_map(x, lambda v: 1.0 / (v - v), backend=backend)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("op", ["floordiv", "mod"])
def test_integer_division_by_zero_raises_on_an_unsampled_element(backend, op):
    x = np.arange(1, 10_001, dtype=np.int64)
    x[4321] = 0  # not among the guard's samples: the kernel itself raises
    f = (lambda v: 10 // v) if op == "floordiv" else (lambda v: 10 % v)
    with pytest.raises(ZeroDivisionError) as info:
        cm.parallel_map(x, f, backend=backend)
    assert any("4321" in n for n in getattr(info.value, "__notes__", ["4321"]))


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("func, bad", [
    (lambda v: math.sqrt(v - 2.0), 1.0),
    (lambda v: math.log(v), 0.0),
    (lambda v: math.log(v), -1.0),
    (lambda v: math.acos(v), 2.0),
    (lambda v: math.gamma(v), -2.0),
    (lambda v: math.fmod(v, 0.0), 1.0),
])
def test_math_domain_errors_raise_valueerror(backend, func, bad):
    x = np.full(3000, 3.0)
    x[1234] = bad
    with pytest.raises(ValueError, match="math domain error"):
        func(bad)  # the reference
    with pytest.raises(ValueError, match="math domain error"):
        cm.parallel_map(x, func, backend=backend)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("bad, error", [(np.nan, ValueError), (np.inf, OverflowError),
                                        (1e30, OverflowError)])
def test_int_of_a_float_raises_on_an_unsampled_element(backend, bad, error):
    x = np.linspace(0.0, 5.0, 5000)
    x[2345] = bad
    with pytest.raises(error):
        cm.parallel_map(x, lambda v: int(v) + 1, backend=backend)


def test_int_still_compiles_where_the_checked_one_does_not_type():
    def f(v):
        if isinstance(v, int):
            return 1.0
        return int(v) * 2.0

    x = np.arange(5.0)
    assert kind_of(x, f) == "numba"
    np.testing.assert_array_equal(cm.parallel_map(x, f), python_answer(f, x))
    np.testing.assert_array_equal(cm.parallel_map(np.arange(4), int), np.arange(4))


def test_math_range_error_raises_overflowerror():
    x = np.ones(3000)
    x[77] = 1000.0
    with pytest.raises(OverflowError):
        cm.parallel_map(x, lambda v: math.exp(v))


def test_checked_math_keeps_nan_in_nan_out_and_values():
    x = np.array([np.nan, 0.25, 4.0, np.inf])
    got = cm.parallel_map(x, lambda v: math.sqrt(v) + math.log(v, 2.0))
    want = np.array([math.sqrt(v) + math.log(v, 2.0) for v in x.tolist()])
    np.testing.assert_array_equal(got, want)


def test_math_errors_also_in_the_process_engine():
    x = np.full(2000, 3.0)
    x[1500] = -1.0
    with pytest.raises(ValueError, match="math domain error"):
        cm.parallel_map(x, lambda v: math.sqrt(v), backend="processes", workers=2)


# -- 3. the semantic guard ----------------------------------------------------------------

def _warned(arrays, func, **kw):
    with pytest.warns(CoremapWarning) as rec:
        try:
            out = cm.parallel_map(arrays, func, **kw)
        except Exception as exc:  # noqa: BLE001 - Python's own error is the answer
            out = exc
    return out, " ".join(str(w.message) for w in rec)


def test_int_of_nan_on_a_sampled_element_raises_pythons_error_without_warning():
    x = np.linspace(0.0, 5.0, 200)
    x[0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="NaN"):
            cm.parallel_map(x, lambda v: int(v))


def test_integer_overflow_is_named():
    x = np.array([2**40, 3, 5], dtype=np.int64)
    out, msg = _warned(x, lambda v: v * v)
    assert str((2**40) ** 2) in msg and "gives 0" in msg
    assert isinstance(out, TypeError)  # Python's big int does not fit any dtype: loud


@pytest.mark.parametrize("func, x", [
    (lambda v: float(len(str(v))), np.array([0.6369616873214543, 0.25])),
    (lambda v: 2**70 + v, np.array([0.0, 1.0])),
    (lambda v: round(v, 2), np.array([2.675, 1.005])),
])
def test_python_semantics_differences_run_as_python(func, x):
    out, msg = _warned(x, func)
    assert "disagrees with Python at element (0,)" in msg
    np.testing.assert_array_equal(out, python_answer(func, x))


def test_guard_samples_first_and_last_and_caches_its_verdict(monkeypatch):
    from coremap._kernels import _guard

    seen = []
    real = _guard.check

    def spy(func, jitted, name, in_dtypes, out_dtype, inputs, shape, compute_dtype):
        seen.append(_guard.sample_indices(int(np.prod(shape))))
        return real(func, jitted, name, in_dtypes, out_dtype, inputs, shape, compute_dtype)

    monkeypatch.setattr(_guard, "check", spy)

    def f(v):
        return v * 2.0

    x = np.linspace(0.0, 1.0, 10_000)
    cm.parallel_map(x, f, workers=1)
    assert len(seen) == 1 and seen[0][:2] == [0, x.size - 1] and len(seen[0]) > 2
    cm.parallel_map(x[::-1].copy(), f, workers=1)
    cm.parallel_map(x, f, backend="serial")
    assert len(seen) == 1


def test_guard_keeps_a_slow_python_function_fast(monkeypatch):
    from coremap._kernels import _guard

    calls = []
    real = _guard._run
    monkeypatch.setattr(_guard, "_run", lambda fn, args: calls.append(fn) or real(fn, args))

    def slow(v):
        s = 0.0
        for k in range(1_000_000):  # >= 0.05 s per element in Python, 1 ms compiled
            s += v * k
        return s

    x = np.linspace(0.0, 1.0, 16)
    assert kind_of(x, slow) == "numba"
    assert calls.count(slow) == 2  # the first and the last element, then the budget


def test_guard_tolerates_rounding_in_float32():
    x = np.linspace(0.1, 3.0, 5000, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = cm.explain(x, lambda v: np.sin(v) * np.exp(-v * v) + np.sqrt(v) - 0.3)
    assert plan.kind == "numba"


# -- 2. globals are read at call time -----------------------------------------------------

K = 2.0
TABLE = np.array([1.0, 2.0, 3.0])


def scaled(v):
    return K * v


def tabled(v):
    return TABLE[int(v) % 3] * v


def test_global_scalar_change_recompiles_fast_path_too():
    global K
    x = np.linspace(0.0, 1.0, 100)
    try:
        K = 2.0
        np.testing.assert_array_equal(cm.parallel_map(x, scaled), 2.0 * x)
        np.testing.assert_array_equal(cm.parallel_map(x, scaled), 2.0 * x)  # fast path
        K = 3.0
        np.testing.assert_array_equal(cm.parallel_map(x, scaled), 3.0 * x)
        np.testing.assert_array_equal(cm.parallel_map(x, scaled, workers=1), 3.0 * x)
    finally:
        K = 2.0


def test_global_array_read_by_reference():
    global TABLE
    x = np.arange(6.0)
    saved = TABLE
    try:
        np.testing.assert_array_equal(cm.parallel_map(x, tabled), python_answer(tabled, x))
        TABLE[:] = [10.0, 20.0, 30.0]  # no recompile needed: the kernel reads the array
        np.testing.assert_array_equal(cm.parallel_map(x, tabled), python_answer(tabled, x))
        TABLE = np.array([-1.0, -2.0, -3.0])  # rebound: seen, recompiled
        np.testing.assert_array_equal(cm.parallel_map(x, tabled), python_answer(tabled, x))
    finally:
        TABLE = saved
        TABLE[:] = [1.0, 2.0, 3.0]


PAIR = (np.array([1.0, 2.0]), 3.0)


def uses_pair(v):
    return PAIR[1] * v


def test_unchanged_globals_compile_once():
    from coremap._kernels import _numba

    x = np.arange(5.0)
    cm.parallel_map(x, uses_pair)
    state = _numba._state[uses_pair]
    for _ in range(3):
        np.testing.assert_array_equal(cm.parallel_map(x, uses_pair), 3.0 * x)
    assert _numba._state[uses_pair] is state


def test_closure_value_change_is_seen():
    k = 2.0

    def f(v):
        return k * v

    x = np.arange(4.0)
    np.testing.assert_array_equal(cm.parallel_map(x, f), 2.0 * x)
    k = 5.0
    np.testing.assert_array_equal(cm.parallel_map(x, f), 5.0 * x)


# -- 4. every callable ---------------------------------------------------------------------

class _Adder:
    def __call__(self, v):
        return v + 1.0

    def method(self, v):
        return v + 2.0


@numba.vectorize
def _dufunc(v):
    return v * 2.0


@numba.guvectorize(["void(float64, float64[:])"], "()->()")
def _gufunc(a, out):
    out[0] = a * 3.0


@numba.njit
def _jitted(v):
    return v * 4.0


@pytest.mark.parametrize("func, kind", [
    (math.sin, "numba"), (abs, "numba"), (math.gamma, "numba"), (round, "numba"),
    (math.sqrt, "numba"), (_jitted, "numba"), (_dufunc, "ufunc"), (_gufunc, "ufunc"),
    (np.sin, "ufunc"),
])
@pytest.mark.parametrize("backend", ENGINES)
def test_callables_that_compile(func, kind, backend):
    x = np.linspace(0.5, 3.0, 101)
    assert kind_of(x, func) == kind
    got = cm.parallel_map(x, func, backend=backend)
    np.testing.assert_allclose(got, python_answer(func, x), rtol=1e-15)


def test_builtin_with_two_inputs():
    x = np.linspace(0.0, 3.0, 50)
    np.testing.assert_array_equal(cm.parallel_map((x, 1.5), min), np.minimum(x, 1.5))


@pytest.mark.parametrize("func, what", [
    (_Adder(), "callable _Adder object"),
    (_Adder().method, "bound method"),
    (functools.partial(lambda a, v: a * v, 3.0), "functools.partial"),
])
def test_callables_numba_cannot_compile_run_as_python(func, what):
    x = np.linspace(0.0, 1.0, 50)
    with pytest.warns(CoremapWarning, match=what):
        got = cm.parallel_map(x, func)
    np.testing.assert_array_equal(got, python_answer(func, x))


def test_gufunc_with_core_dimensions_is_refused_before_work():
    @numba.guvectorize(["void(float64[:], float64[:])"], "(n)->(n)")
    def g(a, out):
        out[:] = a

    with pytest.raises(TypeError, match="core dimensions"):
        cm.parallel_map(np.ones(4), g)


# -- 5. helpers are compiled too -----------------------------------------------------------

def cnd(d):
    return 0.5 * (1.0 + math.erf(d / math.sqrt(2.0)))


def black_scholes_call(s):
    k, t, r, sigma = 100.0, 1.0, 0.02, 0.3
    d1 = (math.log(s / k) + (r + 0.5 * sigma * sigma) * t) / (sigma * math.sqrt(t))
    d2 = d1 - sigma * math.sqrt(t)
    return s * cnd(d1) - k * math.exp(-r * t) * cnd(d2)


def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)


_CONFIG = {"scale": 2.0}


def uses_dict(v):
    return _CONFIG["scale"] * v


def calls_uses_dict(v):
    return uses_dict(v) + 1.0


@pytest.mark.parametrize("backend", ENGINES)
def test_black_scholes_with_helper_compiles(backend):
    s = np.linspace(50.0, 150.0, 2001)
    plan = cm.explain(s, black_scholes_call)
    assert plan.kind == "numba" and any("cnd" in r for r in plan.reasons)
    got = cm.parallel_map(s, black_scholes_call, backend=backend)
    np.testing.assert_allclose(got, python_answer(black_scholes_call, s), rtol=1e-13)


def test_recursive_and_closure_helpers():
    def twice(v):
        return 2 * v

    def f(n):
        return fact(n) + twice(n)

    x = np.arange(10, dtype=np.int64)
    assert kind_of(x, f) == "numba"
    np.testing.assert_array_equal(cm.parallel_map(x, f), python_answer(f, x))


def test_numba_failure_quotes_its_cause_and_a_fix():
    with pytest.warns(CoremapWarning) as rec:
        got = cm.parallel_map(np.arange(5.0), calls_uses_dict)
    msg = str(rec[0].message)
    assert "Untyped global name '_CONFIG'" in msg and "to compile it" in msg
    assert "nopython frontend" not in msg
    np.testing.assert_array_equal(got, python_answer(calls_uses_dict, np.arange(5.0)))


def test_redefined_helper_is_seen():
    global cnd
    saved = cnd
    s = np.linspace(90.0, 110.0, 11)
    before = cm.parallel_map(s, black_scholes_call)
    try:
        cnd = lambda d: 0.0  # noqa: E731 - a rebound global helper
        np.testing.assert_array_equal(cm.parallel_map(s, black_scholes_call),
                                      python_answer(black_scholes_call, s))
    finally:
        cnd = saved
    np.testing.assert_array_equal(cm.parallel_map(s, black_scholes_call), before)


# -- 6. float16 ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ENGINES)
def test_float16_computed_in_float32_stored_as_float16(backend):
    x = np.linspace(-3.0, 3.0, 3001).astype(np.float16)
    plan = cm.explain(x, np.sin)
    assert plan.kind == "ufunc"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cm.parallel_map(x, lambda v: np.sin(v) * np.float32(2.0), backend=backend)
        assert kind_of(x, lambda v: np.sin(v) * np.float32(2.0)) == "numba"
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.sin(x) * np.float16(2.0))


def test_float16_with_out_and_mixed_inputs():
    x = np.linspace(0.0, 1.0, 64).astype(np.float16)
    y = np.linspace(1.0, 2.0, 64)
    out = np.empty(64, np.float16)
    cm.parallel_map((x, y), lambda a, b: a * b, out=out)
    np.testing.assert_array_equal(out, (x.astype(np.float64) * y).astype(np.float16))


def test_half_conversions_match_numpy_for_every_bit_pattern():
    h2f, f2h = _half.h2f(), _half.f2h()

    @numba.njit
    def roundtrip(bits, out_f, out_h):
        for i in range(bits.size):
            out_f[i] = h2f(bits[i])
            out_h[i] = f2h(out_f[i])

    bits = np.arange(2**16, dtype=np.uint16)
    f = np.empty(bits.size, np.float32)
    h = np.empty(bits.size, np.uint16)
    roundtrip(bits, f, h)
    want = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(f, want)  # NaN == NaN here
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(h[finite], bits[finite])

    @numba.njit
    def down(x, out):
        for i in range(x.size):
            out[i] = f2h(x[i])

    rng = np.random.default_rng(0)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(all="ignore"):  # NaN patterns
        ties = halves + np.abs(halves) * 2.0**-11  # half a float16 unit up: ties to even
    for x in (rng.standard_normal(10**5) * 10.0 ** rng.integers(-9, 6, 10**5), ties,
              np.nextafter(ties, 0.0), np.nextafter(ties, np.inf)):
        x = x[np.isfinite(x)]
        with np.errstate(over="ignore"):
            for arr in (x, x.astype(np.float32)):
                out = np.empty(arr.size, np.uint16)
                down(arr, out)
                np.testing.assert_array_equal(out, arr.astype(np.float16).view(np.uint16))


# -- 7. explain, and every kernel kind on every engine --------------------------------------

def test_explain_says_what_applied():
    text = str(cm.explain(np.linspace(50.0, 150.0, 10), black_scholes_call))
    assert "Python's error model" in text
    assert "semantic guard passed" in text
    assert "helpers compiled too: cnd" in text
    assert "K (number" in str(cm.explain(np.ones(3), scaled))
    assert "TABLE (array: read by reference)" in str(cm.explain(np.ones(3), tabled))


def _plain_python(v):
    return math.fsum((v, v * v, 1.0))  # math.fsum: not compiled by Numba


@pytest.mark.parametrize("backend", ["threads", "serial", "processes"])
def test_every_kernel_kind_on_every_engine(backend):
    x = np.linspace(0.0, 3.0, 40)
    cases = [
        (lambda v: 2.0 * v + 1.0, {}, "numba"),
        (cm.kernels.affine(2.0, 1.0), {}, "builtin"),
        (np.sin, {}, "ufunc"),
        (lambda c: np.sin(c) + 1.0, {"vectorized": True}, "vectorized"),
        (_plain_python, {}, "python"),
    ]
    for func, kw, kind in cases:
        assert cm.explain(x, func, backend=backend, **kw).kind == kind
        want = (np.sin(x) + 1.0 if kind == "vectorized" else
                2.0 * x + 1.0 if kind == "builtin" else python_answer(func, x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoremapWarning)
            got = cm.parallel_map(x, func, backend=backend, workers=2, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-15, err_msg=f"{kind} on {backend}")


# -- the checked math module against CPython, value by value ----------------------------------

_SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0,
            710.0, -710.0, 1e308, -1e308, 5e-324, 3.0, -3.0]


def _outcome(fn, *args):
    try:
        r = fn(*args)
    except (ValueError, OverflowError, ZeroDivisionError) as exc:
        return type(exc)
    return "nan" if r != r else r


def _same(got, want) -> bool:
    if isinstance(got, float) and isinstance(want, float) and math.isfinite(want):
        return abs(got - want) <= 4 * math.ulp(want)  # the guard's float tolerance
    return got == want


# Numba has no math.fmod or math.remainder: functions calling them run as Python.
@pytest.mark.parametrize("name", sorted(_checked._CHECKED_NAMES - {"fmod", "remainder"}))
def test_checked_math_matches_cpython_on_special_values(name):
    fn = getattr(_checked.module(), name)
    ref = getattr(math, name)
    two = name in _checked._TWO_ARG or name == "pow"
    cases = [(a, b) for a in _SPECIAL for b in _SPECIAL] if two else [(a,) for a in _SPECIAL]
    if name == "log":
        cases += [(a, b) for a in _SPECIAL for b in (2.0, 10.0, 1.0, 0.5)]
    for args in cases:
        assert _same(_outcome(fn, *args), _outcome(ref, *args)), (name, args)


def test_checked_int_matches_python_on_special_values():
    _checked.register_int()
    to_int = numba.njit(error_model="python")(lambda v: _checked.checked_int(v))
    for v in [*_SPECIAL, 9.2e18, -9.2e18, 9.3e18, -9.3e18, 2.0**63, -(2.0**63)]:
        want = _outcome(int, v)
        if isinstance(want, int) and not -(2**63) <= want < 2**63:
            want = OverflowError  # a compiled 64-bit integer cannot hold it: loud
        assert _outcome(to_int, v) == want, v
