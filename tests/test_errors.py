"""Bad input fails before any work; errors in the function come back with their type."""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

import coremap as cm
from coremap.engines import thread_engine


@pytest.fixture
def no_threads_started():
    """Shut the pool down; the test must not start it again."""
    thread_engine().shutdown()
    before = threading.active_count()
    yield
    assert thread_engine().size == 0, "a thread was started for an invalid call"
    assert threading.active_count() == before


def f(v):
    return v + 1.0


X = np.arange(100_000, dtype=np.float64)

BAD_CALLS = [
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(workers=-1), ValueError, "workers must be >= 1"),
    (dict(workers=1.5), TypeError, "workers must be a positive int"),
    (dict(workers="2"), TypeError, "workers must be a positive int"),
    (dict(workers=True), TypeError, "workers must be a positive int"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=-1), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=1.5), TypeError, "chunk_size must be a positive int"),
    (dict(chunk_size="2"), TypeError, "chunk_size must be a positive int"),
    (dict(schedule="round-robin"), ValueError, "schedule must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(timeout=0), ValueError, "timeout must be > 0"),
    (dict(timeout="1"), TypeError, "timeout must be a number"),
    (dict(timeout=1.0, backend="serial"), ValueError, "timeout= needs an engine"),
    (dict(backend=object()), TypeError, "an ipyparallel Client"),
    (dict(retries=2), ValueError, "retries= re-runs chunks on a cluster"),
    (dict(vectorized="yes"), TypeError, "vectorized must be True or False"),
    (dict(progress="yes"), TypeError, "progress must be True or False"),
    (dict(dtype=object), TypeError, "dtype must be numeric"),
    (dict(out=[0.0] * 100_000), TypeError, "out must be a numpy.ndarray"),
    (dict(out=np.empty(10)), ValueError, r"out has shape \(10,\), but the inputs broadcast to"),
    (dict(out=np.empty(100_000, np.int64)), TypeError, "cannot store the float64 results"),
    (dict(out=np.empty(100_000, object)), TypeError, "numeric dtype"),
    (dict(dtype=np.int32), TypeError, "casting rule 'same_kind'"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_CALLS)
def test_bad_arguments_raise_before_work(kwargs, exc, match, no_threads_started):
    with pytest.raises(exc, match=match):
        cm.parallel_map(X, f, **kwargs)


def test_read_only_out(no_threads_started):
    out = np.empty_like(X)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        cm.parallel_map(X, f, out=out)


@pytest.mark.parametrize(
    "arrays, func, exc, match",
    [
        (X, 3, TypeError, "func must be callable"),
        (np.array(["a", "b"]), f, TypeError, "input 0 has dtype <U1"),
        (np.array([object(), 1]), f, TypeError, "input 0 has dtype object"),
        ((X, np.ones(3)), np.add, ValueError, "do not broadcast"),
        ((), f, ValueError, "at least one input"),
        ((X, None), np.add, TypeError, "input 1 is None"),
        ((X, X), np.sin, TypeError, "sin takes 1 inputs, got 2"),
        # a tuple of numbers is several outputs (test_reduce_outputs.py); a nested one is not
        (X, lambda v: (v, (v, v)), TypeError, "returns one number per element"),
    ],
)
def test_bad_inputs(arrays, func, exc, match, no_threads_started):
    with pytest.raises(exc, match=match):
        cm.parallel_map(arrays, func)


def test_dtype_disagrees_with_out():
    with pytest.raises(TypeError, match="disagrees"):
        cm.parallel_map(X, f, out=np.empty_like(X), dtype=np.float32)


def test_vectorized_wrong_length():
    with pytest.raises(ValueError, match="must return one value per element"):
        cm.parallel_map(X, lambda c: c[:-1], vectorized=True)


def test_vectorized_returns_strings():
    with pytest.raises(TypeError, match="needs numbers"):
        cm.parallel_map(X[:10], lambda c: c.astype(str), vectorized=True)


# -- exceptions raised by the function ---------------------------------------------------

class Boom(Exception):
    pass


def raises_at(v):
    if v == 77_777.0:
        raise ValueError("bad element")
    return v * 2.0


@pytest.mark.parametrize("engine", ["serial", "threads"])
def test_numba_exception_type_and_index(engine):
    with pytest.raises(ValueError, match="bad element") as info:
        cm.parallel_map(X, raises_at, backend=engine, workers=2, chunk_size=1000)
    if sys.version_info >= (3, 11):
        assert any("(77777,)" in n for n in info.value.__notes__)


def test_numba_exception_2d_index():
    x = X.reshape(100, 1000)
    with pytest.raises(ValueError) as info:
        cm.parallel_map(x, raises_at, workers=2, chunk_size=64)
    if sys.version_info >= (3, 11):
        assert any("(77, 777)" in n for n in info.value.__notes__)


def test_numba_exception_fast_path():
    x = X.copy()
    cm.parallel_map(x * 0, raises_at)  # cache the signature
    with pytest.raises(ValueError, match="bad element"):
        cm.parallel_map(x, raises_at)


@pytest.mark.parametrize("engine", ["serial", "threads"])
def test_vectorized_exception_type(engine):
    def h(chunk):
        if chunk[0] >= 50_000:
            raise Boom("chunk failed")
        return chunk

    with pytest.raises(Boom, match="chunk failed") as info:
        cm.parallel_map(X, h, vectorized=True, backend=engine, workers=2, chunk_size=10_000)
    if sys.version_info >= (3, 11):
        assert any("on the chunk of elements" in n for n in info.value.__notes__)


def test_ufunc_error_type():
    with np.errstate(divide="raise"), pytest.raises(FloatingPointError):
        cm.parallel_map((X, 0.0), np.divide, backend="threads", workers=2)


def test_python_function_exception_names_element():
    def g(v):
        if v == 123:
            raise KeyError("missing")
        return {1: 2}.get(1, 0) + v

    with pytest.raises(KeyError) as info:
        cm.parallel_map(np.arange(500.0), g, backend="serial")
    if sys.version_info >= (3, 11):
        assert any("(123,)" in n for n in info.value.__notes__)


def test_error_cancels_other_chunks():
    """After the first error, the remaining chunks are not started."""
    calls = []

    def h(chunk):
        calls.append(len(chunk))
        if len(calls) == 1:
            raise Boom("first")
        time.sleep(0.01)
        return chunk

    with pytest.raises(Boom):
        cm.parallel_map(np.zeros(100_000), h, vectorized=True, backend="serial",
                        schedule="dynamic", chunk_size=1000)
    assert len(calls) == 1


def test_pool_usable_after_errors():
    for _ in range(5):
        with pytest.raises(ValueError):
            cm.parallel_map(X, raises_at, backend="threads", workers=2)
    np.testing.assert_array_equal(cm.parallel_map(X, f, backend="threads", workers=2), X + 1)


def test_no_fork_anywhere(monkeypatch):
    """coremap never forks (a fork after threads or OpenMP started can hang the child)."""

    def no_fork(*a, **k):
        raise AssertionError("coremap called fork")

    monkeypatch.setattr(os, "fork", no_fork)
    if hasattr(os, "forkpty"):
        monkeypatch.setattr(os, "forkpty", no_fork)
    for backend in ("serial", "threads", "auto"):
        cm.parallel_map(X, f, backend=backend)
        cm.parallel_map(X, np.sin, backend=backend)
        cm.parallel_map(X, lambda c: c + 1, vectorized=True, backend=backend)


def test_a_kernels_failure_is_raised_once_and_not_printed():
    """Numba reports a cfunc's exception through sys.unraisablehook; coremap raises it
    with its element instead, so nothing is printed for its own kernels (inline, a
    job with pool helpers, the planner's path), and a cfunc outside coremap still is."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numba, numpy as np, coremap as cm
        f = lambda v: 1.0 / v
        for n, workers in [(3000, 1), (3000, 2), (3_000_000, 2)]:
            x = np.arange(float(n)) - (n - 10)  # fails near the end: helpers are in
            for _ in range(3):  # planned, then cached (inline or a job)
                try:
                    cm.parallel_map(x, f, workers=workers)
                except ZeroDivisionError:
                    print("raised", flush=True)
        g = numba.cfunc("float64(float64)", error_model="python")(lambda v: 1.0 / v)
        g.ctypes(0.0)  # not coremap's: reported as usual
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["raised"] * 9
    assert proc.stderr.count("Exception ignored") == 1, proc.stderr
