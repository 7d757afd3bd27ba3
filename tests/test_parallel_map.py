"""parallel_map against serial references: dtypes x layouts x shapes, every kernel kind."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import jitted, same_bits, serial_reference

import coremap as cm

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
DTYPES = ["bool", *INT_DTYPES, "float32", "float64", "complex64", "complex128"]
ENGINES = ["serial", "threads"]


def poly(v):
    return v * v + v


def make(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -50), min(info.max, 50), shape, endpoint=True).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    return rng.standard_normal(shape).astype(dt)


def expected_for(func, arrays):
    jf, dt = jitted(func, arrays)
    return serial_reference(jf, arrays, dtype=dt)


# -- layouts ----------------------------------------------------------------------------

def _unaligned(a):
    buf = np.empty(a.nbytes + 1, dtype=np.uint8)
    view = buf[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned or a.dtype.itemsize == 1
    return view


def _swapped(a):
    return a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder != ">" else "<"))


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


LAYOUTS = {
    "C": lambda a: a,
    "F": lambda a: np.asfortranarray(a),
    "strided": lambda a: a[::2, ::3],
    "negative": lambda a: a[::-1, ::-2],
    "transposed": lambda a: a.T,
    "readonly": _readonly,
    "unaligned": _unaligned,
    "byteswapped": _swapped,
    "3d-view": lambda a: a.reshape(6, 5, 16)[:, ::2, 1::3],
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_numba(dtype, engine):
    x = make(dtype, (1000,))
    got = cm.parallel_map(x, poly, backend=engine, workers=2, chunk_size=64)
    assert same_bits(got, expected_for(poly, x))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["int16", "float32", "float64", "complex128"])
def test_layouts_numba(layout, dtype, engine):
    x = LAYOUTS[layout](make(dtype, (30, 16)))
    before = x.copy()
    got = cm.parallel_map(x, poly, backend=engine, workers=3, chunk_size=7)
    assert got.shape == x.shape
    np.testing.assert_array_equal(got, expected_for(poly, x))
    assert same_bits(x, before), "the input was modified"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_ufunc(layout, engine):
    x = LAYOUTS[layout](make("float64", (30, 16)))
    got = cm.parallel_map(x, np.sin, backend=engine, workers=2, chunk_size=5)
    assert same_bits(got, np.sin(x).astype(got.dtype))
    assert got.dtype == np.sin(x).dtype


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_vectorized(layout, engine):
    x = LAYOUTS[layout](make("float64", (30, 16)))
    got = cm.parallel_map(x, lambda c: np.cos(c) + 1.0, vectorized=True, backend=engine,
                          workers=2, chunk_size=9)
    np.testing.assert_array_equal(got, np.cos(x) + 1.0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative", "unaligned"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_builtin_affine_matches_numpy(layout, dtype, engine):
    x = LAYOUTS[layout](make(dtype, (30, 16)))
    a, b = (2, 3) if np.dtype(dtype).kind == "i" else (2.5, -1.0)
    got = cm.parallel_map(x, cm.kernels.affine(a, b), backend=engine, workers=2, chunk_size=11)
    want = a * x + b
    assert got.dtype == want.dtype
    assert same_bits(got, want)


def test_affine_int_input_promotes_like_numpy():
    x = np.arange(10, dtype=np.int16)
    got = cm.parallel_map(x, cm.kernels.affine(0.5, 1.0))
    want = 0.5 * x + 1.0
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# -- shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "shape", [(0,), (0, 3), (), (1,), (1, 1), (3,), (7,), (997,), (5, 0, 2), (13, 17)]
)
def test_shapes(shape, engine):
    x = make("float64", shape)
    got = cm.parallel_map(x, poly, backend=engine, workers=8)
    assert got.shape == shape
    np.testing.assert_array_equal(got, expected_for(poly, x))
    got = cm.parallel_map(x, np.exp, backend=engine, workers=8)
    assert got.shape == shape
    np.testing.assert_array_equal(got, np.exp(x))


def test_0d_and_scalar_inputs():
    got = cm.parallel_map(np.float64(2.0), poly)
    assert got.shape == () and got == 6.0
    got = cm.parallel_map((3.0, 4.0), lambda a, b: a * b)
    assert got.shape == () and got == 12.0


# -- several inputs, broadcasting --------------------------------------------------------

def three(a, b, c):
    return a * b + c


def four(a, b, c, d):
    return (a - b) * (c + d)


@pytest.mark.parametrize("engine", ENGINES)
def test_broadcast_inputs(engine):
    a = make("float64", (40, 1))
    b = make("float32", (1, 33), seed=1)
    got = cm.parallel_map((a, b, 2.0), three, backend=engine, workers=2, chunk_size=50)
    assert got.shape == (40, 33)
    np.testing.assert_array_equal(got, expected_for(three, (a, b, 2.0)))


@pytest.mark.parametrize("engine", ENGINES)
def test_four_inputs_mixed(engine):
    a = make("float64", (5, 6, 7))
    b = make("int32", (6, 7), seed=1)
    c = np.asfortranarray(make("float64", (5, 6, 7), seed=2))
    args = (a, b, c, 3)
    got = cm.parallel_map(args, four, backend=engine, workers=3, chunk_size=4)
    np.testing.assert_array_equal(got, expected_for(four, args))


def test_scalar_weak_promotion_for_ufuncs():
    x = make("float32", (100,))
    got = cm.parallel_map((x, 2.0), np.multiply)
    assert got.dtype == np.float32  # NEP 50: the Python scalar does not upcast
    assert same_bits(got, x * 2.0)


def test_list_input():
    got = cm.parallel_map([1.0, 2.0, 3.0], poly)
    np.testing.assert_array_equal(got, [2.0, 6.0, 12.0])


# -- out= and dtype= -------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_out_is_written_and_returned(engine):
    x = make("float64", (1000,))
    out = np.empty_like(x)
    res = cm.parallel_map(x, poly, out=out, backend=engine)
    assert res is out
    np.testing.assert_array_equal(out, expected_for(poly, x))


@pytest.mark.parametrize("kind", ["numba", "ufunc", "vectorized"])
def test_out_casts_same_kind(kind):
    x = make("float64", (1000,))
    out = np.empty(1000, np.float32)
    func, vec = {"numba": (poly, False), "ufunc": (np.exp, False),
                 "vectorized": (lambda c: c * 3.0, True)}[kind]
    res = cm.parallel_map(x, func, out=out, vectorized=vec, workers=2, chunk_size=100,
                          backend="threads")
    assert res is out and res.dtype == np.float32
    want = {"numba": lambda: expected_for(poly, x), "ufunc": lambda: np.exp(x),
            "vectorized": lambda: x * 3.0}[kind]().astype(np.float32)
    np.testing.assert_array_equal(res, want)


def test_out_strided_and_fortran():
    x = make("float64", (20, 30))
    big = np.zeros((40, 60))
    res = cm.parallel_map(x, poly, out=big[::2, ::2])
    np.testing.assert_array_equal(big[::2, ::2], expected_for(poly, x))
    assert np.all(big[1::2] == 0)
    assert res.base is big
    f = np.zeros((20, 30), order="F")
    cm.parallel_map(x, poly, out=f)
    np.testing.assert_array_equal(f, expected_for(poly, x))


def test_out_byteswapped():
    x = np.abs(make("float64", (100,)))
    out = np.zeros(100, dtype=">f8")
    cm.parallel_map(x, np.sqrt, out=out)
    np.testing.assert_array_equal(out, np.sqrt(x))


def test_dtype_argument():
    x = make("float64", (100,))
    got = cm.parallel_map(x, poly, dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected_for(poly, x).astype(np.float32))


@pytest.mark.parametrize("kind", ["numba", "ufunc"])
def test_out_same_as_input_in_place(kind):
    x = make("float64", (10_000,))
    want = expected_for(poly, x) if kind == "numba" else np.exp(x)
    res = cm.parallel_map(x, poly if kind == "numba" else np.exp, out=x, workers=2,
                          backend="threads", chunk_size=100)
    assert res is x
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_out_overlapping_input_with_offset(engine):
    base = make("float64", (10_001,))
    x = base[:-1]
    out = base[1:]
    want = expected_for(poly, x.copy())
    cm.parallel_map(x, poly, out=out, backend=engine, workers=2, chunk_size=64)
    np.testing.assert_array_equal(out, want)  # NumPy's answer: as if the input were copied


# -- other kernel kinds -------------------------------------------------------------------

def test_vectorized_scalars_passed_as_given():
    seen = []

    def h(chunk, k):
        seen.append(type(k))
        return chunk * k

    x = make("float64", (100_000,))
    got = cm.parallel_map((x, 3), h, vectorized=True, backend="threads", workers=2)
    np.testing.assert_array_equal(got, x * 3)
    assert set(seen) == {int}


def test_vectorized_dtype_from_function():
    x = make("float64", (5000,))
    got = cm.parallel_map(x, lambda c: (c > 0).astype(np.int8), vectorized=True)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, (x > 0).astype(np.int8))


def test_numba_dispatcher_accepted():
    import numba

    f = numba.njit(lambda v: v + 1.5)
    x = make("float64", (100,))
    np.testing.assert_array_equal(cm.parallel_map(x, f), x + 1.5)


def test_uncompilable_function_warns_and_runs():
    table = {0: "a", 1: "b"}

    def label_len(v):
        return len(table[int(v) % 2] * 3)

    x = np.arange(50.0)
    with pytest.warns(cm.CoremapWarning, match="Numba could not compile"):
        got = cm.parallel_map(x, label_len)
    np.testing.assert_array_equal(got, np.full(50, 3))
    got = cm.parallel_map(x, label_len, backend="serial")  # no warning when asked for
    np.testing.assert_array_equal(got, np.full(50, 3))


def test_compiled_once_per_signature():
    from coremap._kernels import _numba

    def f(v):
        return v + 1.0

    x = make("float64", (100,))
    cm.parallel_map(x, f)
    disp = _numba._state[f].dispatcher
    n_overloads = len(disp.overloads)
    kernels = dict(_numba._state[f].kernels)
    for _ in range(5):
        cm.parallel_map(x, f)
    assert _numba._state[f].dispatcher is disp
    assert len(disp.overloads) == n_overloads
    assert _numba._state[f].kernels == kernels
    cm.parallel_map(x.astype(np.float32), f)
    assert len(disp.overloads) == n_overloads + 1


# -- schedules ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["guided", "dynamic", "static"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_schedules(schedule, chunk_size):
    x = make("float64", (5003,))
    got = cm.parallel_map(x, poly, schedule=schedule, chunk_size=chunk_size, workers=3,
                          backend="threads")
    assert same_bits(got, expected_for(poly, x))


def test_fast_path_matches_full_path():
    x = make("float64", (50_000,))
    first = cm.parallel_map(x, poly)  # full path, then cached
    second = cm.parallel_map(x, poly)  # fast path
    third = cm.parallel_map(x, poly, chunk_size=3)  # full path again
    assert same_bits(first, second) and same_bits(first, third)
    aff = cm.kernels.affine(3.0, 1.0)
    assert same_bits(cm.parallel_map(x, aff), 3.0 * x + 1.0)
    assert same_bits(cm.parallel_map(x, cm.kernels.affine(2.0, 1.0)), 2.0 * x + 1.0)
