"""asv suite: W8 map-reduce (sum and max of W2, a row sum) and W9 Black-Scholes, peers included.

Data is made in ``setup`` from a fixed seed and every contender is warmed there
(JIT compiles, thread pools), so ``time_*`` measures warm calls. ``peakmem_*``
checks the point of a fused reduction: no array of ``f(x)`` (80 MB at 10^7).
Peers that are not installed are skipped (``NotImplementedError`` in ``setup``).
"""
import importlib.util

import numpy as np

import coremap as cm
from coremap import _workloads
from coremap._bench import W2_EXPR, _prange_reducers, _with_jitted_cnd, median_time

REDUCE_ENGINES = ["numpy", "numba prange", "numexpr", "dask.array", "coremap",
                  "coremap workers=1"]


def _need(module):
    if importlib.util.find_spec(module) is None:
        raise NotImplementedError(f"{module} not installed")


class MapReduce:
    """W8: ``op(W2(x))`` over 10^7 float64."""

    params = (["sum", "max"], [10**7], REDUCE_ENGINES)
    param_names = ["op", "n", "engine"]
    timeout = 180

    def setup(self, op, n, engine):
        x = _workloads.data(n)
        if engine == "numpy":
            self.fn = lambda: getattr(_workloads.w2_numpy(x), op)()
        elif engine == "numba prange":
            psum, pmax, _ = _prange_reducers(_workloads.w2)
            red = psum if op == "sum" else pmax
            self.fn = lambda: red(x)
        elif engine == "numexpr":
            _need("numexpr")
            if op != "sum":
                raise NotImplementedError("numexpr reduces with sum() and prod() only")
            import numexpr

            self.fn = lambda: numexpr.evaluate(f"sum({W2_EXPR})", local_dict={"x": x})
        elif engine == "dask.array":
            _need("dask")
            import dask.array as da

            xd = da.from_array(x, chunks=n // 8)
            self.fn = lambda: getattr(xd.map_blocks(_workloads.w2_numpy), op)().compute(
                scheduler="threads")
        else:
            workers = 1 if engine.endswith("workers=1") else None
            self.fn = lambda: cm.parallel_reduce(x, _workloads.w2, op=op, workers=workers)
        self.fn()

    def time_reduce(self, op, n, engine):
        self.fn()

    def peakmem_reduce(self, op, n, engine):
        self.fn()


class RowSum:
    """W8: row sums (``axis=1``) of W2 over a 10^4 x 10^3 float64 array."""

    params = (["numpy", "numba prange", "coremap"],)
    param_names = ["engine"]

    def setup(self, engine):
        m = np.random.default_rng(0).random((10**4, 10**3))
        if engine == "numpy":
            self.fn = lambda: _workloads.w2_numpy(m).sum(axis=1)
        elif engine == "numba prange":
            prows = _prange_reducers(_workloads.w2)[2]
            self.fn = lambda: prows(m)
        else:
            self.fn = lambda: cm.parallel_reduce(m, _workloads.w2, axis=1)
        self.fn()

    def time_rowsum(self, engine):
        self.fn()


class BlackScholes:
    """W9: call and put of 10^6 options: 5 inputs, 2 outputs."""

    params = (["numpy", "numba vectorize parallel, 2 calls", "coremap, 2 calls",
               "coremap, 1 call"],)
    param_names = ["engine"]
    timeout = 180

    def setup(self, engine):
        args = _workloads.bs_data(10**6)
        if engine == "numpy":
            self.fn = lambda: _workloads.bs_numpy(*args)
        elif engine.startswith("numba"):
            import numba

            sig = ["float64(float64, float64, float64, float64, float64)"]
            vc, vp = (numba.vectorize(sig, target="parallel")(_with_jitted_cnd(f))
                      for f in (_workloads.bs_call, _workloads.bs_put))
            self.fn = lambda: (vc(*args), vp(*args))
        elif engine == "coremap, 1 call":  # one pass, two outputs
            self.fn = lambda: cm.parallel_map(args, _workloads.bs_both)
        else:
            self.fn = lambda: (cm.parallel_map(args, _workloads.bs_call),
                               cm.parallel_map(args, _workloads.bs_put))
        self.fn()

    def time_price(self, engine):
        self.fn()


class TrackReduceSpeedup:
    """coremap's ``sum(W2(x))`` at 10^7 over NumPy's ``f(x).sum()`` and a prange reduction."""

    params = (["numpy", "numba prange"],)
    param_names = ["peer"]
    timeout = 240

    def setup(self, peer):
        self.x = _workloads.data(10**7)
        x = self.x
        if peer == "numpy":
            self.peer = lambda: _workloads.w2_numpy(x).sum()
        else:
            psum = _prange_reducers(_workloads.w2)[0]
            self.peer = lambda: psum(x)
        self.mine = lambda: cm.parallel_reduce(x, _workloads.w2)
        self.peer()
        self.mine()

    def track_speedup(self, peer):
        return median_time(self.peer) / median_time(self.mine)

    track_speedup.unit = "x"
