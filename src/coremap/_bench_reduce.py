"""``coremap bench`` W8 (map-reduce) and W9 (Black-Scholes, two outputs), head to head.

The workloads of docs/benchmarks.rst. W8: ``sum(W2(x))`` and ``max(W2(x))`` at 10^7
(10^8 in a full run), and a row sum along ``axis=1`` of W2 over a 10^4 x 10^3 array,
against NumPy (``f(x).sum()``), a Numba ``prange`` reduction, numexpr's ``sum()``
where it has one, and dask.array. W9: call and put prices of 10^7 options (5
inputs, 2 outputs) against NumPy and Numba's parallel ``@vectorize`` (two calls).
Timed as in ``_bench.py``: interleaved, medians.
"""
from __future__ import annotations

import math

import numpy as np

import coremap as cm
from coremap import _config, _workloads
from coremap._bench import Row, _has, _numexpr, time_interleaved

W2_EXPR = "sin(x)*exp(-x*x) + sqrt(x)"


def _prange_reducers(scalar):
    """Numba prange reductions of ``scalar``: sum, max, and row sums of a 2-D array."""
    import numba

    jf = numba.njit(scalar)

    @numba.njit(parallel=True)
    def psum(x):
        s = 0.0
        for i in numba.prange(x.size):
            s += jf(x[i])
        return s

    @numba.njit(parallel=True)
    def pmax(x):
        m = -np.inf
        for i in numba.prange(x.size):
            m = max(m, jf(x[i]))
        return m

    @numba.njit(parallel=True)
    def prows(a):
        out = np.empty(a.shape[0])
        for i in numba.prange(a.shape[0]):
            s = 0.0
            for j in range(a.shape[1]):
                s += jf(a[i, j])
            out[i] = s
        return out

    return psum, pmax, prows


def _dask_chunks(n: int) -> int:
    return max(1, n // (4 * _config.usable_cores()))


def bench_w8(n: int, repeat: int) -> list[Row]:
    """sum and max of W2 over ``n`` elements; the sum's accuracy against math.fsum."""
    x = _workloads.data(n)
    psum, pmax, _ = _prange_reducers(_workloads.w2)
    rows = []
    for op, prange in (("sum", psum), ("max", pmax)):
        contenders = {
            "numpy": lambda op=op: getattr(_workloads.w2_numpy(x), op)(),
            "numba prange": lambda prange=prange: prange(x),
        }
        if _has("numexpr") and op == "sum":  # numexpr reduces on one thread
            contenders["numexpr sum()"] = _numexpr(f"sum({W2_EXPR})", x)
        if _has("dask"):
            import dask.array as da

            xd = da.from_array(x, chunks=_dask_chunks(n))
            contenders["dask.array"] = lambda xd=xd, op=op: getattr(
                xd.map_blocks(_workloads.w2_numpy), op)().compute(scheduler="threads")
        contenders["coremap"] = lambda op=op: cm.parallel_reduce(x, _workloads.w2, op=op)
        contenders["coremap workers=1"] = lambda op=op: cm.parallel_reduce(
            x, _workloads.w2, op=op, workers=1)
        t = time_interleaved(contenders, repeat)
        base = t["numpy"]
        part = [Row(f"W8 {op} {n:.0e}", k, v, base / v) for k, v in t.items()]
        for r in part:
            if r.contender == "coremap" and op == "sum":
                vs_prange = t["numba prange"] / r.seconds
                r.target = ">= 1.0x prange, >= 1.6x numpy"
                r.met = vs_prange >= 1.0 and r.speedup >= 1.6
                r.note = f"{vs_prange:.2f}x prange"
        rows += part
    exact = math.fsum(_workloads.w2_numpy(x))
    err = abs(float(cm.parallel_reduce(x, _workloads.w2)) - exact) / exact
    rows.append(Row(f"W8 sum {n:.0e}", "relative error vs math.fsum", err,
                    target="<= 1e-11", met=err <= 1e-11, note=f"{err:.1e}"))
    return rows


def bench_rows(repeat: int, shape=(10**4, 10**3)) -> list[Row]:
    """Row sums (``axis=1``) of W2 over a C-ordered 10^4 x 10^3 array."""
    m = np.random.default_rng(0).random(shape)
    _, _, prows = _prange_reducers(_workloads.w2)
    contenders = {"numpy": lambda: _workloads.w2_numpy(m).sum(axis=1),
                  "numba prange": lambda: prows(m)}
    if _has("numexpr"):
        contenders["numexpr sum(axis=1)"] = _numexpr(f"sum({W2_EXPR}, axis=1)", m)
    if _has("dask"):
        import dask.array as da

        md = da.from_array(m, chunks=(max(1, shape[0] // (4 * _config.usable_cores())),
                                      shape[1]))
        contenders["dask.array"] = lambda: md.map_blocks(_workloads.w2_numpy).sum(
            axis=1).compute(scheduler="threads")
    contenders["coremap"] = lambda: cm.parallel_reduce(m, _workloads.w2, axis=1)
    t = time_interleaved(contenders, repeat)
    base = t["numpy"]
    return [Row(f"W8 rowsum {shape[0]}x{shape[1]}", k, v, base / v) for k, v in t.items()]


def bench_w9(n: int, repeat: int) -> list[Row]:
    """Black-Scholes call and put of ``n`` options: 5 inputs, 2 outputs."""
    import numba

    args = _workloads.bs_data(n)
    sig = ["float64(float64, float64, float64, float64, float64)"]
    vcall, vput = (numba.vectorize(sig, target="parallel")(_with_jitted_cnd(f))
                   for f in (_workloads.bs_call, _workloads.bs_put))
    contenders = {
        "numpy": lambda: _workloads.bs_numpy(*args),
        "numba vectorize parallel, 2 calls": lambda: (vcall(*args), vput(*args)),
        "coremap, 2 calls": lambda: (cm.parallel_map(args, _workloads.bs_call),
                                     cm.parallel_map(args, _workloads.bs_put)),
    }
    if _multi_outputs():
        contenders["coremap, 1 call"] = lambda: cm.parallel_map(args, _workloads.bs_both)
    t = time_interleaved(contenders, repeat)
    base = t["numpy"]
    rows = [Row(f"W9 {n:.0e}", k, v, base / v) for k, v in t.items()]
    peer = t["numba vectorize parallel, 2 calls"]
    for r in rows:
        if r.contender == "coremap, 1 call":
            r.target = ">= 1.0x numba vectorize, 2 calls"
            r.met = peer / r.seconds >= 1.0
            r.note = f"{peer / r.seconds:.2f}x numba vectorize"
    return rows


def _with_jitted_cnd(func):
    """``func`` reading a jitted ``_cnd``: Numba's own decorators compile no plain helper."""
    import types

    import numba

    scope = dict(func.__globals__, _cnd=numba.njit(_workloads._cnd))
    return types.FunctionType(func.__code__, scope, func.__name__)


def _multi_outputs() -> bool:
    """Whether parallel_map returns a tuple of arrays for a function returning a tuple."""
    try:
        res = cm.parallel_map(np.ones(2), _pair, backend="serial")
    except TypeError:
        return False
    return isinstance(res, tuple)


def _pair(v):
    return v, v
