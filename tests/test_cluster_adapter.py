"""The cluster engines' shared ``execute`` with an in-process adapter: no cluster needed.

The real clusters (ipyparallel, dask.distributed) are in test_cluster.py; here an
adapter runs each chunk function at once, so the chunking, the dtype learnt from the
first chunk, the output layouts and progress are checked against the serial engine
wherever the test suite runs.
"""
from __future__ import annotations

import numpy as np
import pytest

import coremap as cm
from coremap import _plan
from coremap._execute import run_cluster_chunk
from coremap.engines import Hooks
from coremap.engines._cluster import _Adapter


class _Done:
    def __init__(self, value) -> None:
        self.value = value
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Inline(_Adapter):
    """A cluster of ``n`` slots in this process: a chunk runs when submitted."""

    name = "inline-cluster"

    def __init__(self, n: int = 3) -> None:
        self.n = n
        self.submitted: list = []

    def engines(self) -> int:
        return self.n

    def submit(self, fn, args, retries):
        self.submitted.append((args[2], args[4], retries))
        return _Done(fn(*args))

    def result(self, fut, timeout):
        return fut.value


def _call(arrays, func, adapter, **options):
    call = _plan.plan_call(arrays, func, backend="serial", **options)
    call.adapter = adapter
    return call


def _half(v):
    return v * 0.5 + 1.0


@pytest.mark.parametrize("func,vectorized", [(_half, False), (np.sin, False),
                                             (lambda c: c * 3.0, True)])
def test_cluster_execute_matches_serial(func, vectorized):
    x = np.linspace(0.0, 4.0, 1001).reshape(7, 143)
    adapter = _Inline()
    seen = []
    call = _call(x, func, adapter, vectorized=vectorized)
    got = adapter.execute(call, Hooks(on_progress=seen.append, run_chunk=run_cluster_chunk))
    want = cm.parallel_map(x, func, backend="serial", vectorized=vectorized)
    np.testing.assert_array_equal(got, want)
    assert len(adapter.submitted) == 3 * 4  # CHUNKS_PER_ENGINE per slot
    assert seen == sorted(seen) and seen[-1] == x.size
    if vectorized:  # the dtype came from the first chunk, then went with the others
        assert adapter.submitted[0][1] is None
        assert all(d == np.float64 for _, d, _ in adapter.submitted[1:])


def test_cluster_execute_into_an_out_with_no_2d_form():
    x = np.arange(4 * 2 * 6, dtype=np.float64).reshape(4, 2, 6)
    holder = np.zeros((8, 6, 4))
    out = holder[::2, :, ::2].transpose(0, 2, 1)[:, :, :6]
    adapter = _Inline()
    got = adapter.execute(_call(x, _half, adapter, out=out), Hooks(run_chunk=run_cluster_chunk))
    assert got is out
    np.testing.assert_array_equal(out, _half(x))


def test_cluster_execute_needs_the_chunk_function():
    call = _call(np.arange(10.0), _half, _Inline())
    with pytest.raises(TypeError, match="run_chunk"):
        _Inline().execute(call, Hooks())


def test_a_chunk_error_cancels_the_others():
    def bad(v):
        if v == 500.0:
            raise ZeroDivisionError("at 500")
        return v

    adapter = _Inline(2)

    def submit(fn, args, retries):
        try:
            return _Done(fn(*args))
        except ZeroDivisionError as exc:
            return _Done(exc)

    def result(fut, timeout):
        if isinstance(fut.value, BaseException):
            raise fut.value
        return fut.value

    adapter.submit, adapter.result = submit, result
    futures = []
    real = submit

    def keep(fn, args, retries):
        futures.append(real(fn, args, retries))
        return futures[-1]

    adapter.submit = keep
    with pytest.raises(ZeroDivisionError, match="at 500"):
        adapter.execute(_call(np.arange(1000.0), bad, adapter, dtype=np.float64),
                        Hooks(run_chunk=run_cluster_chunk))
    assert all(f.cancelled for f in futures)
