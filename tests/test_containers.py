"""Containers in, containers out: pandas, xarray, masked and dask inputs.

The reference for every container is what the library itself does with a real
ufunc made from the same scalar function (``numba.vectorize``): that is the
behaviour users know (alignment, index and name, dims, coords and attrs).
"""
from __future__ import annotations

import math
import subprocess
import sys

import numba
import numpy as np
import pytest

import coremap as cm

pytestmark = pytest.mark.timeout(120)

pd = pytest.importorskip("pandas")
xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")


def twice_plus(a, b):
    return a * 2.0 + b


def plus_one(v):
    return v + 1


def checked_sqrt(v):
    if v < 0:
        raise ValueError("negative input: a masked element reached the function")
    return math.sqrt(v)


# The same functions as real ufuncs, the way users already get containers kept.
ref_twice_plus = numba.vectorize(["float64(float64, float64)"])(twice_plus)
ref_plus_one = numba.vectorize(["int64(int64)", "float64(float64)"])(plus_one)
ref_sum3 = numba.vectorize(["float64(float64, float64, float64)"])(lambda a, b, c: a + b + c)


@pytest.fixture(params=["threads", "processes"])
def run(request):
    """``parallel_map`` on one engine, with small chunks so several workers take part."""

    def call(arrays, func, **kwargs):
        return cm.parallel_map(arrays, func, backend=request.param, workers=2, chunk_size=3,
                               **kwargs)

    call.backend = request.param
    return call


# -- pandas ------------------------------------------------------------------------------

def test_series_keeps_index_name_and_attrs(run):
    s = pd.Series(np.linspace(0, 1, 11), index=[f"r{i}" for i in range(11)], name="x")
    s.attrs = {"unit": "m"}
    got = run(s, plus_one)
    pd.testing.assert_series_equal(got, ref_plus_one(s))
    assert got.attrs == {"unit": "m"}


def test_two_series_align_as_pandas_ufuncs_do(run):
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=list("abcd"), name="v")
    b = pd.Series([10.0, 20.0, 30.0], index=list("dbe"), name="v")
    got = run((a, b), twice_plus)
    want = ref_twice_plus(a, b)
    pd.testing.assert_series_equal(got, want)
    assert list(got.index) == list(want.index) and got.name == "v"
    # different names: no name, as in pandas
    assert run((a, b.rename("w")), twice_plus).name is None


def test_three_series_align_on_the_union(run):
    s = [pd.Series(np.arange(len(idx)) + k + 0.5, index=idx)
         for k, idx in enumerate([[0, 1, 2, 3], [2, 3, 4], [3, 9]])]
    pd.testing.assert_series_equal(run(tuple(s), lambda a, b, c: a + b + c), ref_sum3(*s))


def test_series_with_scalar_and_ndarray(run):
    s = pd.Series(np.arange(6.0), index=np.arange(6) * 10, name="s")
    got = run((s, np.full(6, 0.5)), twice_plus)
    pd.testing.assert_series_equal(got, ref_twice_plus(s, np.full(6, 0.5)))
    pd.testing.assert_series_equal(run((3.0, s), twice_plus), ref_twice_plus(3.0, s))


def test_dataframe_keeps_index_columns_and_column_dtypes(run):
    df = pd.DataFrame({"i": np.arange(7), "f": np.linspace(0, 1, 7), "j": np.arange(7) * 3},
                      index=pd.Index(list("abcdefg"), name="row"))
    got = run(df, plus_one)
    pd.testing.assert_frame_equal(got, ref_plus_one(df))
    assert list(got.dtypes) == [np.int64, np.float64, np.int64]


def test_two_dataframes_align(run):
    a = pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0]}, index=[0, 1])
    b = pd.DataFrame({"y": [5.0, 6.0], "z": [7.0, 8.0]}, index=[1, 2])
    pd.testing.assert_frame_equal(run((a, b), twice_plus), ref_twice_plus(a, b))


def test_mixed_series_and_frame_is_refused_before_work():
    seen = []

    def spy(a, b):
        seen.append(a)
        return a + b

    with pytest.raises(TypeError, match="mixed DataFrame and Series"):
        cm.parallel_map((pd.Series([1.0]), pd.DataFrame({"a": [1.0]})), spy, backend="serial")
    assert seen == []


def test_out_is_refused_with_containers():
    with pytest.raises(TypeError, match="out= is not supported with pandas"):
        cm.parallel_map(pd.Series([1.0, 2.0]), plus_one, out=np.empty(2))


# -- xarray ------------------------------------------------------------------------------

def _grid():
    d = xr.DataArray(np.arange(12.0).reshape(3, 4), dims=("x", "y"),
                     coords={"x": [10, 20, 30], "y": list("abcd")}, attrs={"units": "K"},
                     name="t")
    e = xr.DataArray(np.linspace(0, 1, 4), dims=("y",), coords={"y": list("bcde")})
    return d, e


def test_dataarray_keeps_dims_coords_attrs(run):
    d, _ = _grid()
    got = run(d, plus_one)
    xr.testing.assert_identical(got, ref_plus_one(d))
    assert got.attrs == {"units": "K"} and got.dims == ("x", "y")


def test_dataarrays_broadcast_by_name_and_align(run):
    d, e = _grid()
    got = run((d, e), twice_plus)
    xr.testing.assert_identical(got, ref_twice_plus(d, e))
    assert got.sizes == {"x": 3, "y": 3}  # inner join on y, as xarray arithmetic
    got = run((e, d), twice_plus)
    xr.testing.assert_identical(got, ref_twice_plus(e, d))


def test_dataarray_follows_keep_attrs_option():
    d, _ = _grid()
    with xr.set_options(keep_attrs=False):
        got = cm.parallel_map(d, plus_one)
        xr.testing.assert_identical(got, ref_plus_one(d))
    assert got.attrs == {}


def test_dataarray_over_dask_stays_lazy():
    d = xr.DataArray(da.arange(20.0, chunks=6), dims="t", attrs={"a": 1})
    got = cm.parallel_map(d, plus_one)
    assert kind(got.data) == "dask" and got.data.chunks == ((6, 6, 6, 2),)
    xr.testing.assert_identical(got.compute(scheduler="synchronous"),
                                ref_plus_one(d).compute(scheduler="synchronous"))


def kind(obj):
    from coremap._containers import kind_of

    return kind_of(obj)


# -- masked arrays -----------------------------------------------------------------------

def test_masked_elements_never_reach_the_function(run):
    x = np.ma.array([4.0, -1.0, 9.0, 16.0, -5.0, 25.0, 1.0], mask=[0, 1, 0, 0, 1, 0, 0])
    got = run(x, checked_sqrt)
    assert isinstance(got, np.ma.MaskedArray)
    np.testing.assert_array_equal(got.mask, x.mask)
    np.testing.assert_array_equal(got.compressed(), np.sqrt(x.compressed()))
    with pytest.raises(ValueError, match="negative input"):  # the check is real
        run(x.data, checked_sqrt)


def test_mask_is_the_union_of_input_masks_broadcast(run):
    a = np.ma.array(np.arange(12.0).reshape(3, 4), mask=np.eye(3, 4, dtype=bool))
    b = np.ma.array([1.0, 2.0, 3.0, 4.0], mask=[0, 0, 0, 1])
    got = run((a, b, ), twice_plus)
    want = np.ma.MaskedArray(a.data * 2.0 + b.data, mask=a.mask | b.mask)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.compressed(), want.compressed())
    assert got.shape == (3, 4)


def test_masked_without_masked_elements(run):
    x = np.ma.array(np.arange(5.0))
    got = run((x, 1.0), twice_plus)
    assert isinstance(got, np.ma.MaskedArray) and not np.ma.getmaskarray(got).any()
    np.testing.assert_array_equal(got.data, np.arange(5.0) * 2 + 1)


# -- dask --------------------------------------------------------------------------------

def test_dask_is_lazy_and_keeps_chunks():
    calls = []

    def chunky(c):
        calls.append(len(c))
        return c * 3.0

    x = da.arange(100.0, chunks=30)
    y = cm.parallel_map(x, chunky, vectorized=True, dtype=np.float64)
    assert kind(y) == "dask" and calls == []  # nothing computed yet
    assert y.chunks == x.chunks and y.dtype == np.float64
    np.testing.assert_array_equal(y.compute(scheduler="synchronous"), np.arange(100.0) * 3)
    assert sum(calls) == 100


def test_dask_blocks_on_each_engine(run):
    x = da.from_array(np.linspace(0, 1, 40).reshape(8, 5), chunks=(3, 5))
    got = run((x, np.arange(5.0)), twice_plus)
    assert kind(got) == "dask" and got.chunks == x.chunks
    want = ref_twice_plus(x.compute(scheduler="synchronous"), np.arange(5.0))
    np.testing.assert_array_equal(got.compute(scheduler="synchronous"), want)


def test_dask_result_dtype_of_a_python_function():
    x = da.arange(10.0, chunks=4)
    y = cm.parallel_map(x, lambda v: int(v) * 3, backend="serial")
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y.compute(scheduler="synchronous"), np.arange(10) * 3)


def test_dask_threaded_scheduler():
    from concurrent.futures import ThreadPoolExecutor

    import dask

    x = da.arange(1000.0, chunks=100)
    with ThreadPoolExecutor(2) as pool, dask.config.set(pool=pool, scheduler="threads"):
        got = cm.parallel_map(x, plus_one).compute()
    np.testing.assert_array_equal(got, np.arange(1000.0) + 1)


def test_dask_bad_option_raises_before_compute():
    with pytest.raises(ValueError, match="schedule"):
        cm.parallel_map(da.ones(4, chunks=2), plus_one, schedule="nope")


# -- planning and imports ------------------------------------------------------------------

def test_explain_names_the_container_and_computes_nothing():
    x = da.ones((1000, 10), chunks=(100, 10))
    plan = cm.explain(x, plus_one)
    assert plan.shape == (100, 10)
    assert "dask input" in str(plan)
    assert "pandas input" in str(cm.explain(pd.Series([1.0, 2.0]), plus_one))


def test_import_coremap_imports_no_container_library():
    code = ("import sys, numpy as np, coremap as cm; "
            "cm.parallel_map(np.ma.array([1.0, 2.0]), np.sqrt); "
            "cm.parallel_map(np.ones(3), lambda v: v + 1); "
            "print(sorted(m for m in ('pandas', 'xarray', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# -- parallel_reduce ---------------------------------------------------------------------

@pytest.fixture(params=["threads", "processes"])
def reduce_run(request):
    """``parallel_reduce`` on one engine."""

    def call(arrays, func, op="sum", **kwargs):
        return cm.parallel_reduce(arrays, func, op, backend=request.param, workers=2,
                                  **kwargs)

    return call


def test_reduce_series_and_aligned_series(reduce_run):
    s = pd.Series(np.linspace(0, 1, 9), index=list("abcdefghi"))
    assert reduce_run(s, plus_one) == pytest.approx(ref_plus_one(s).sum(), rel=1e-15)
    a = pd.Series([1.0, 2.0, 3.0], index=list("abc"))
    b = pd.Series([10.0, 20.0, 30.0], index=list("cab"))
    assert reduce_run((a, b), twice_plus, "max") == ref_twice_plus(a, b).max()
    # NumPy's semantics for what alignment leaves missing: NaN propagates
    assert np.isnan(reduce_run((a, b.rename(index={"c": "z"})), twice_plus))


def test_reduce_dataframe_along_an_axis_gives_a_labelled_series(reduce_run):
    df = pd.DataFrame({"i": np.arange(5.0), "j": np.arange(5.0) * 3},
                      index=pd.Index(list("vwxyz"), name="row"))
    pd.testing.assert_series_equal(reduce_run(df, plus_one, axis=0),
                                   ref_plus_one(df).sum(axis=0))
    pd.testing.assert_series_equal(reduce_run(df, plus_one, "max", axis=1),
                                   ref_plus_one(df).max(axis=1), check_names=False)
    assert reduce_run(df, plus_one) == ref_plus_one(df).to_numpy().sum()


def test_reduce_dataarray_drops_reduced_dims(reduce_run):
    d, e = _grid()
    got = reduce_run(d, plus_one, axis=1)
    want = ref_plus_one(d).sum("y")
    xr.testing.assert_allclose(got, want)
    assert got.attrs == want.attrs and got.name == want.name
    got = reduce_run((d, e), twice_plus, "argmax", axis=0)
    xr.testing.assert_equal(got, ref_twice_plus(d, e).argmax("x"))
    assert float(reduce_run(d, plus_one)) == float(ref_plus_one(d).sum())


def test_reduce_masked_skips_masked_elements(reduce_run):
    m = np.ma.array([[4.0, -1.0, 9.0], [-4.0, -9.0, -1.0]], mask=[[0, 1, 0], [1, 1, 1]])
    got = reduce_run(m, checked_sqrt, axis=1)
    want = np.ma.sum(np.ma.sqrt(m), axis=1)
    np.testing.assert_array_equal(np.ma.getmaskarray(got), [False, True])
    assert got[0] == want[0] == 5.0
    assert reduce_run(m, checked_sqrt, np.maximum) == 3.0  # a ufunc op, by its np.ma name
    assert reduce_run(m, checked_sqrt, "mean") == 2.5


def test_reduce_dask_is_lazy(reduce_run):
    x = da.from_array(np.linspace(0, 1, 60).reshape(6, 10), chunks=(2, 5))
    got = reduce_run(x, plus_one, axis=0)
    assert kind(got) == "dask"
    want = (x.compute(scheduler="synchronous") + 1).sum(axis=0)
    np.testing.assert_allclose(got.compute(scheduler="synchronous"), want)
    got = reduce_run(x, plus_one, "argmax")
    assert int(got.compute(scheduler="synchronous")) == 59


def test_reduce_refusals_before_work():
    with pytest.raises(TypeError, match="out= is not supported"):
        cm.parallel_reduce(pd.Series([1.0]), plus_one, out=np.empty(()))
    with pytest.raises(TypeError, match="keepdims"):
        cm.parallel_reduce(pd.Series([1.0]), plus_one, keepdims=True)
    with pytest.raises(TypeError, match="not supported with masked"):
        cm.parallel_reduce(np.ma.array([1.0]), plus_one, np.fmax)


# -- several outputs ---------------------------------------------------------------------

def sum_and_product(a, b):
    return a + b, a * b


def test_several_outputs_keep_the_container(run):
    s = pd.Series([1.0, 2.0, 3.0], index=list("abc"), name="n")
    add, mul = run((s, 2.0), sum_and_product)
    pd.testing.assert_series_equal(add, s + 2.0)
    pd.testing.assert_series_equal(mul, s * 2.0)
    d, _ = _grid()
    add, mul = run((d, 2.0), sum_and_product)
    xr.testing.assert_identical(add, np.add(d, 2.0))  # the ufunc protocol's result
    xr.testing.assert_identical(mul, np.multiply(d, 2.0))
    m = np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    add, mul = run((m, 2.0), sum_and_product)
    np.testing.assert_array_equal(add.mask, m.mask)
    np.testing.assert_array_equal(mul.compressed(), [2.0, 6.0])
    x = da.arange(10.0, chunks=4)
    add, mul = run((x, 2.0), sum_and_product)
    assert add.chunks == x.chunks and mul.chunks == x.chunks
    np.testing.assert_array_equal(mul.compute(scheduler="synchronous"), np.arange(10.0) * 2)
