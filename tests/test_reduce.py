"""parallel_reduce against NumPy: every op x dtype class x axis x engine, and determinism."""
from __future__ import annotations

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from helpers import same_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coremap as cm
from coremap import _workloads

OPS = ["sum", "prod", "min", "max", "any", "all", "mean", "argmin", "argmax"]
DTYPES = [np.bool_, np.int8, np.uint16, np.int64, np.float32, np.float64, np.complex128]
AXES = [None, 0, 1, -1, (0, 2)]


def numpy_reduce(a, op, axis=None, **kw):
    """The reference: NumPy's own function for ``op``."""
    if isinstance(op, np.ufunc):
        return op.reduce(a, axis=axis, **kw)
    return getattr(np, op)(a, axis=axis, **kw)


def data(dtype, shape=(5, 3, 2100), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "b":
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 4, shape).astype(dtype)  # small: prod wraps like NumPy's
    a = rng.random(shape) + 0.5
    if np.dtype(dtype).kind == "c":
        a = a + 1j * rng.random(shape)
    return a.astype(dtype)


def assert_matches(got, ref, dtype):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.dtype.kind in "fc":
        rtol = 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) or \
            got.dtype == np.float32 else 1e-10
        np.testing.assert_allclose(got, ref, rtol=rtol)
    else:
        np.testing.assert_array_equal(got, ref)


def square(v):
    return v * v


_TABLE = {0: 0.0}


def square_py(v):
    return _TABLE.get(0, 0.0) + v * v  # a global dict: Numba cannot compile it


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_every_op_dtype_axis_against_numpy(op, dtype):
    a = data(dtype)
    if op == "prod" and a.dtype.kind in "fc":
        a = (a - 1.0) * 0.002 + 1.0  # about 1: stays finite over 31,500 factors
    for axis in AXES:
        if op in ("argmin", "argmax") and isinstance(axis, tuple):
            continue
        for backend in ("threads", "serial"):
            got = cm.parallel_reduce(a, op=op, axis=axis, backend=backend, workers=2)
            assert_matches(got, numpy_reduce(a, op, axis), dtype)


@pytest.mark.parametrize("op", [np.add, np.multiply, np.maximum, np.minimum, np.logical_or,
                                np.logical_and, np.bitwise_or, np.fmax])
def test_ufunc_ops(op):
    a = data(np.int64 if op is np.bitwise_or else np.float64, (4, 5000))
    if op is np.multiply:
        a = 1.0 + (a - 1.0) * 1e-3  # a product of 20,000 factors that stays finite
    for axis in (None, 1, 0):
        got = cm.parallel_reduce(a, op=op, axis=axis, workers=2)
        assert_matches(got, op.reduce(a, axis=axis), a.dtype)


@pytest.mark.parametrize("op", ["min", "max", "argmin", "argmax"])
def test_nan_propagates(op):
    a = np.random.default_rng(0).random((3, 20000))
    a[1, 12345] = np.nan
    a[1, 17000] = np.nan
    a[2, 3] = np.nan
    for axis in (None, 1):
        got = cm.parallel_reduce(a, op=op, axis=axis, workers=2)
        assert same_bits(got, numpy_reduce(a, op, axis)) or \
            np.array_equal(got, numpy_reduce(a, op, axis), equal_nan=True)


def test_ties_give_the_first_index():
    a = np.zeros(50000)
    a[[7000, 9000, 40000]] = 5.0
    assert cm.parallel_reduce(a, op="argmax", workers=2) == 7000
    m = a.reshape(5, 10000)
    assert cm.parallel_reduce(m, op="argmax", axis=1).tolist() == [7000, 0, 0, 0, 0]
    assert cm.parallel_reduce(m, op="argmin", axis=1).tolist() == np.argmin(m, 1).tolist()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.bool_, np.int32, np.float32])
def test_sum_promotes_like_numpy(dtype):
    a = np.full(100000, 3, dtype)
    got = cm.parallel_reduce(a)
    assert got.dtype == np.sum(a).dtype
    assert got == np.sum(a)
    assert cm.parallel_reduce(a, dtype=np.float64).dtype == np.float64


def test_empty_reductions_follow_numpy():
    e = np.zeros((0, 4))
    assert cm.parallel_reduce(e) == 0.0
    assert cm.parallel_reduce(e, op="prod") == 1.0
    np.testing.assert_array_equal(cm.parallel_reduce(e, axis=0), np.zeros(4))
    assert cm.parallel_reduce(e, op="max", axis=1).shape == (0,)
    with pytest.raises(ValueError, match="identity"):
        cm.parallel_reduce(e, op="max")
    with pytest.raises(ValueError):
        cm.parallel_reduce(e, op="argmin")
    assert cm.parallel_reduce(e, op="max", initial=-1.0) == -1.0
    assert cm.parallel_reduce(e, op="any") == np.False_
    with pytest.warns(RuntimeWarning):
        assert np.isnan(cm.parallel_reduce(e, op="mean"))


def test_initial_keepdims_out():
    a = data(np.float64, (4, 6, 3000))
    for op in ("sum", "max", "min", "prod"):
        b = a if op != "prod" else a * 0 + 1.0001
        np.testing.assert_allclose(cm.parallel_reduce(b, op=op, axis=(0, 2), initial=2.0),
                                   numpy_reduce(b, op, (0, 2), initial=2.0), rtol=1e-12)
    for op in OPS:
        got = cm.parallel_reduce(a, op=op, axis=1, keepdims=True)
        assert_matches(got, numpy_reduce(a, op, 1, keepdims=True), a.dtype)
    out = np.empty(6)
    res = cm.parallel_reduce(a, op="mean", axis=(0, 2), out=out)
    assert res is out
    np.testing.assert_allclose(out, a.mean(axis=(0, 2)), rtol=1e-12)
    out0 = np.empty(())
    assert cm.parallel_reduce(a, out=out0) is out0
    assert math.isclose(float(out0), a.sum(), rel_tol=1e-12)


def test_fused_function_matches_the_map_then_reduce():
    x = np.random.default_rng(2).random((30, 7000))
    y = np.random.default_rng(3).random(7000)

    def f(a, b):
        return a * b * 1e-3 + 1.0  # near 1: the product stays finite

    for op in OPS:
        for axis in (None, 0, 1):
            got = cm.parallel_reduce((x, y), f, op=op, axis=axis, workers=2)
            assert_matches(got, numpy_reduce(x * y * 1e-3 + 1.0, op, axis), np.float64)
    # a scalar operand, read once
    got = cm.parallel_reduce((x, 2.0), f, op="max", axis=1)
    np.testing.assert_array_equal(got, (x * 2.0 * 1e-3 + 1.0).max(axis=1))


@pytest.mark.parametrize("layout", ["F", "strided", "negative", "readonly", "swapped"])
def test_layouts(layout):
    a = np.random.default_rng(4).random((300, 400))
    if layout == "F":
        a = np.asfortranarray(a)
    elif layout == "strided":
        a = np.random.default_rng(4).random((600, 800))[::2, ::2]
    elif layout == "negative":
        a = a[::-1, ::-1]
    elif layout == "readonly":
        a.flags.writeable = False
    else:
        a = a.astype(a.dtype.newbyteorder())
    for axis in (None, 0, 1):
        for op in ("sum", "max", "argmin"):
            assert_matches(cm.parallel_reduce(a, square, op=op, axis=axis),
                           numpy_reduce(np.asarray(a) ** 2, op, axis), np.float64)


def test_func_kinds_ufunc_vectorized_builtin():
    x = np.random.default_rng(5).random((8, 9000))
    np.testing.assert_allclose(cm.parallel_reduce(x, np.sin, axis=1), np.sin(x).sum(axis=1),
                               rtol=1e-12)
    got = cm.parallel_reduce(x, lambda c: np.sqrt(c), op="max", vectorized=True)
    assert got == np.sqrt(x).max()
    got = cm.parallel_reduce(x, cm.kernels.affine(2.0, 1.0), op="sum", axis=0)
    np.testing.assert_allclose(got, (2.0 * x + 1.0).sum(axis=0), rtol=1e-12)


@pytest.mark.timeout(120)
def test_python_function_runs_on_processes_with_the_same_bits():
    x = np.random.default_rng(6).random(300000)
    with pytest.warns(cm.CoremapWarning, match="Numba could not compile"):
        auto = cm.parallel_reduce(x, square_py, workers=2)
    serial = cm.parallel_reduce(x, square_py, backend="serial")
    procs = cm.parallel_reduce(x, square_py, backend="processes", workers=2)
    assert same_bits(auto, serial) and same_bits(procs, serial)
    assert math.isclose(serial, float((x * x).sum()), rel_tol=1e-12)
    # a function Numba compiles: fused on threads, mapped on processes: the same bits
    fused = cm.parallel_reduce(x, square, workers=2)
    mapped = cm.parallel_reduce(x, square, backend="processes", workers=2)
    assert same_bits(fused, mapped)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_every_op_on_processes_gives_the_threads_bits(dtype):
    a = data(dtype, (3, 9000))
    if a.dtype.kind == "f":
        a = (a - 1.0) * 0.002 + 1.0  # about 1: the product of 27,000 squares stays normal
    mapped = cm.parallel_map(a, square)  # Numba's dtype for v * v (int16 -> int64)
    for op in OPS:
        for axis in (None, 1, 0):
            here = cm.parallel_reduce(a, square, op=op, axis=axis, workers=2)
            there = cm.parallel_reduce(a, square, op=op, axis=axis, backend="processes",
                                       workers=2)
            assert same_bits(here, there), (op, axis)
            assert_matches(there, numpy_reduce(mapped, op, axis), dtype)


def raises_above(v):
    if v > 0.999:
        raise ValueError("too big")
    return v


def test_function_errors_keep_their_type_and_index():
    x = np.linspace(0.0, 1.0, 100001).reshape(1, -1)
    with pytest.raises(ValueError, match="too big") as info:
        cm.parallel_reduce(x, raises_above, workers=2)
    first = int(np.argmax(x[0] > 0.999))
    notes = getattr(info.value, "__notes__", [])
    if notes:  # Python >= 3.11
        assert f"(0, {first})" in notes[0]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"op": "median"}, ValueError, "op must be one of"),
    ({"op": np.sin}, TypeError, "binary ufunc"),
    ({"op": 3}, TypeError, "op must be"),
    ({"axis": 2}, np.exceptions.AxisError, "axis 2"),
    ({"axis": (0, 0)}, ValueError, "repeated"),
    ({"axis": 1.5}, TypeError, "axis must be"),
    ({"op": "argmax", "axis": (0, 1)}, TypeError, "int axis"),
    ({"op": "max", "dtype": np.float32}, TypeError, "dtype"),
    ({"op": "mean", "initial": 1.0}, TypeError, "initial"),
    ({"out": np.empty(3)}, ValueError, "shape"),
    ({"out": np.empty((), np.int64)}, TypeError, "same_kind"),
    ({"keepdims": 1}, TypeError, "keepdims"),
    ({"schedule": "fast"}, ValueError, "schedule"),
    ({"workers": 0}, ValueError, "workers"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"func": 3}, TypeError, "callable"),
])
def test_bad_arguments_fail_before_any_work(kwargs, exc, match):
    a = np.ones((4, 5))
    kwargs = dict(kwargs)
    func = kwargs.pop("func", None)
    with pytest.raises(exc, match=match):
        cm.parallel_reduce(a, func, **kwargs)


def test_func_none_takes_one_input():
    with pytest.raises(TypeError, match="one array"):
        cm.parallel_reduce((np.ones(3), np.ones(3)))


# -- determinism -----------------------------------------------------------------

_DET_X = np.random.default_rng(7).standard_normal((3, 70001)) * 1e3


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(1, 4), chunk=st.one_of(st.none(), st.integers(1, 50000)),
       schedule=st.sampled_from(["guided", "dynamic", "static"]),
       backend=st.sampled_from(["threads", "serial"]),
       op=st.sampled_from(["sum", "mean", "prod", "argmax"]),
       axis=st.sampled_from([None, 1, 0]))
def test_bit_identical_for_any_workers_chunks_schedule(workers, chunk, schedule, backend, op,
                                                      axis):
    x = _DET_X if op != "prod" else 1.0 + _DET_X * 1e-9
    ref = cm.parallel_reduce(x, square, op=op, axis=axis, backend="serial")
    got = cm.parallel_reduce(x, square, op=op, axis=axis, backend=backend, workers=workers,
                             chunk_size=chunk, schedule=schedule)
    assert same_bits(got, ref)


@pytest.mark.timeout(300)
def test_sum_of_w2_is_accurate_and_identical_across_workers():
    x = _workloads.data(10**7)
    exact = math.fsum(_workloads.w2_numpy(x))
    results = [cm.parallel_reduce(x, _workloads.w2, workers=w, chunk_size=c)
               for w, c in ((1, None), (2, None), (3, 10000), (4, 4096))]
    assert all(same_bits(r, results[0]) for r in results)
    assert abs(results[0] - exact) / exact <= 1e-11


def test_no_temporary_of_the_input_size():
    x = np.random.default_rng(8).random(10**7)
    cm.parallel_reduce(x, square, workers=2)  # compile and warm first
    cm.parallel_reduce(x, op="max", workers=2)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        cm.parallel_reduce(x, square, workers=2)
        cm.parallel_reduce(x, op="max", workers=2)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_progress_and_timeout_are_accepted(capsys):
    x = np.ones(100000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm may warn about a missing terminal
        assert cm.parallel_reduce(x, progress=True, workers=2) == 100000.0
    assert cm.parallel_reduce(x, square, timeout=30, backend="threads") == 100000.0



SCALE = 2.0


def scaled(v):
    return SCALE * v


def test_a_changed_global_is_seen_as_parallel_map_sees_it():
    global SCALE
    x = np.ones(20000)
    try:
        assert cm.parallel_reduce(x, scaled) == 40000.0
        SCALE = 3.0
        assert cm.parallel_reduce(x, scaled) == 60000.0
    finally:
        SCALE = 2.0


def test_compiled_reduce_and_several_outputs_get_native_pool_helpers(monkeypatch):
    """The fused kernels run as the engine's native task, so pool helpers join them
    (a task the engine does not recognise runs on the caller alone on guided chunks)."""
    from coremap.engines import _threads

    seen = []
    run = _threads.ThreadEngine.run

    def spy(self, job, task, workers, **kw):
        seen.append(getattr(task, "native", False))
        return run(self, job, task, workers, **kw)

    monkeypatch.setattr(_threads.ThreadEngine, "run", spy)
    x = np.linspace(0.0, 1.0, 100_000)
    cm.parallel_reduce(x, lambda v: v * v, op="sum", workers=2, backend="threads")
    cm.parallel_map(x, lambda v: (v + 1.0, v - 1.0), workers=2, backend="threads")
    assert seen == [True, True]
