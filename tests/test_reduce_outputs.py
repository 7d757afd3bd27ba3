"""Several outputs: a function returning a tuple gives a tuple of arrays, on every engine."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import same_bits

import coremap as cm
from coremap import _workloads

ENGINES = ["serial", "threads", "processes"]


def polar(x, y):
    return np.hypot(x, y), np.arctan2(y, x)


_NAMES = {0: "zero"}


def python_pair(v):
    return len(_NAMES[0]) * v, v - 1.0  # a global dict: runs as Python


def fails_on_negative(v):
    if v < 0:
        raise ValueError("negative")
    return v, v


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ENGINES)
def test_tuple_returning_function_gives_a_tuple_of_arrays(backend):
    x = np.random.default_rng(0).random((40, 300))
    y = np.random.default_rng(1).random(300)
    r, t = cm.parallel_map((x, y), polar, backend=backend, workers=2)
    assert same_bits(r, np.hypot(x, y)) or np.allclose(r, np.hypot(x, y), rtol=1e-15)
    np.testing.assert_allclose(t, np.arctan2(y, x), rtol=1e-14)
    assert r.shape == t.shape == (40, 300)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ENGINES)
def test_black_scholes_call_and_put_in_one_call(backend):
    args = _workloads.bs_data(20000)
    call, put = cm.parallel_map(args, _workloads.bs_both, backend=backend, workers=2)
    ref_call, ref_put = _workloads.bs_numpy(*args)
    np.testing.assert_allclose(call, ref_call, atol=1e-9)
    np.testing.assert_allclose(put, ref_put, atol=1e-9)


@pytest.mark.parametrize("ufunc", [np.modf, np.frexp, np.divmod])
def test_ufuncs_with_several_outputs(ufunc):
    x = np.linspace(-5.0, 5.0, 50001)
    args = (x, 0.7) if ufunc.nin == 2 else x
    got = cm.parallel_map(args, ufunc, workers=2)
    ref = ufunc(*args) if ufunc.nin == 2 else ufunc(x)
    assert len(got) == ufunc.nout
    for g, r in zip(got, ref):
        assert same_bits(g, r)


def test_out_and_dtype_as_tuples():
    x = np.random.default_rng(2).random(30000)
    o = (np.empty(x.size), np.empty(x.size, np.float32))
    res = cm.parallel_map(x, lambda v: (v * 2.0, v + 1.0), out=o, workers=2)
    assert res[0] is o[0] and res[1] is o[1]
    np.testing.assert_array_equal(o[0], x * 2.0)
    np.testing.assert_array_equal(o[1], (x + 1.0).astype(np.float32))
    a, b = cm.parallel_map(x, lambda v: (v * 2.0, v + 1.0), dtype=(np.float32, np.float64))
    assert a.dtype == np.float32 and b.dtype == np.float64
    strided = np.empty(2 * x.size)[::2]
    res = cm.parallel_map(x, lambda v: (v, -v), out=(strided, None))
    assert res[0] is strided
    np.testing.assert_array_equal(strided, x)
    np.testing.assert_array_equal(res[1], -x)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ENGINES)
def test_python_function_needs_and_takes_a_dtype_tuple(backend):
    x = np.random.default_rng(3).random(5000)
    a, b = cm.parallel_map(x, python_pair, dtype=(np.float64, np.float64), backend=backend,
                           workers=2)
    np.testing.assert_array_equal(a, 4 * x)
    np.testing.assert_array_equal(b, x - 1.0)


def test_vectorized_with_several_outputs():
    x = np.random.default_rng(4).random(40000)
    lo, hi = cm.parallel_map(x, lambda c: (np.floor(c * 10), np.ceil(c * 10)),
                             vectorized=True, dtype=(np.float64, np.float64), workers=2)
    np.testing.assert_array_equal(lo, np.floor(x * 10))
    np.testing.assert_array_equal(hi, np.ceil(x * 10))


def test_errors_keep_their_type():
    x = np.linspace(1.0, 2.0, 30000)
    x[12345] = -1.0
    with pytest.raises(ValueError, match="negative"):
        cm.parallel_map(x, fails_on_negative, workers=2)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"out": (np.empty(3), np.empty(3))}, ValueError, "shape"),
    ({"out": (np.empty(10), np.empty(10), np.empty(10))}, ValueError, "returns 2 outputs"),
    ({"dtype": (np.int32, np.float64)}, TypeError, "same_kind"),
    ({"out": (np.empty(10), [0.0] * 10)}, TypeError, "numpy.ndarray"),
])
def test_bad_several_output_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cm.parallel_map(np.ones(10), polar_one, **kwargs)


def polar_one(v):
    return v * 2.0, v + 1.0


def test_python_function_without_a_dtype_tuple_is_refused():
    # Python functions are only known to return tuples once run: dtype= must say so
    with pytest.raises(ValueError, match="returned shape"):
        cm.parallel_map(np.ones(2000), python_pair, backend="serial")


def _halves(v):
    return v * 0.5, v + 0.5


@pytest.mark.parametrize("options", [
    {"workers": 10**6}, {"timeout": "x"}, {"timeout": -1.0}, {"retries": 2},
    {"workers": 0}, {"schedule": "statics"}, {"chunk_size": 0},
])
def test_several_outputs_refuse_what_parallel_map_refuses(options):
    x = np.arange(10.0)
    with pytest.raises((TypeError, ValueError)) as single:
        cm.parallel_map(x, lambda v: v * 0.5, **options)
    with pytest.raises(type(single.value)) as several:  # dtype= as a tuple: several outputs
        cm.parallel_map(x, _halves, dtype=(np.float64, np.float64), **options)
    assert str(several.value) == str(single.value)


@pytest.mark.parametrize("backend", ["threads", "serial"])
def test_several_outputs_show_progress(capsys, backend):
    x = np.arange(100_000.0)
    a, b = cm.parallel_map(x, _halves, progress=True, backend=backend)
    np.testing.assert_array_equal(a, x * 0.5)
    err = capsys.readouterr().err
    assert "100%" in err and "100k" in err
