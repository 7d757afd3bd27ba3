"""The W8 (map-reduce) and W9 (Black-Scholes) workloads of ``coremap bench`` run right."""
from __future__ import annotations

import numpy as np
import pytest

import coremap as cm
from coremap import _bench, _workloads


@pytest.fixture
def no_dask(monkeypatch):
    # dask's threaded scheduler keeps a pool of threads alive: the leak guard objects
    real = _bench._has
    monkeypatch.setattr(_bench, "_has", lambda m: m != "dask" and real(m))


@pytest.mark.timeout(300)
def test_w8_rows_and_accuracy(no_dask):
    rows = _bench.bench_w8(20000, 1) + _bench.bench_rows(1, shape=(60, 50))
    names = {(r.workload, r.contender) for r in rows}
    assert ("W8 sum 2e+04", "coremap") in names and ("W8 max 2e+04", "numba prange") in names
    assert ("W8 rowsum 60x50", "coremap") in names
    err = next(r for r in rows if r.contender == "relative error vs math.fsum")
    assert err.met


@pytest.mark.timeout(300)
def test_black_scholes_workload_matches_numpy(no_dask):
    args = _workloads.bs_data(5000)
    call, put = _workloads.bs_numpy(*args)
    np.testing.assert_allclose(cm.parallel_map(args, _workloads.bs_call), call, rtol=1e-12)
    np.testing.assert_allclose(cm.parallel_map(args, _workloads.bs_put), put, atol=1e-9)
    # put-call parity: C - P = S - K exp(-rT)
    s, k, t, r, _ = args
    np.testing.assert_allclose(call - put, s - k * np.exp(-r * t), atol=1e-6)
    rows = _bench.bench_w9(2000, 1)
    assert {"numpy", "numba vectorize parallel, 2 calls"} <= {r.contender for r in rows}
