"""asv suite: the docs/benchmarks.rst workloads over size x dtype x engine, peers included.

Data is made in ``setup`` from a fixed seed; JIT compiles and pools are warmed in
``setup`` too, so ``time_*`` measures warm calls. Peers that are not installed
are skipped (``NotImplementedError`` in ``setup``).
"""
import importlib.util

import numpy as np

import coremap as cm
from coremap import _workloads
from coremap._bench import _numba_peers, median_time

ENGINES = ["numpy", "coremap serial", "coremap threads", "coremap threads out=",
           "numexpr", "numba prange"]

EXPR = {"W1": "2.0*x + 1.0", "W2": "sin(x)*exp(-x*x) + sqrt(x)"}
SCALAR = {"W1": _workloads.w1, "W2": _workloads.w2}
NUMPY = {"W1": _workloads.w1_numpy, "W2": _workloads.w2_numpy}


def _prange(scalar, out_dtype=np.float64):
    return _numba_peers(scalar, out_dtype)[1]  # prange into a fresh array


class ElementWise:
    params = (["W1", "W2"], [10**5, 10**7], ["float32", "float64"], ENGINES)
    param_names = ["workload", "n", "dtype", "engine"]
    timeout = 120

    def setup(self, workload, n, dtype, engine):
        x = _workloads.data(n, dtype=np.dtype(dtype))
        scalar = SCALAR[workload]
        self.out = np.empty_like(x)
        if engine == "numpy":
            self.fn = lambda: NUMPY[workload](x)
        elif engine == "coremap serial":
            self.fn = lambda: cm.parallel_map(x, scalar, backend="serial")
        elif engine == "coremap threads":
            self.fn = lambda: cm.parallel_map(x, scalar, backend="threads")
        elif engine == "coremap threads out=":
            self.fn = lambda: cm.parallel_map(x, scalar, backend="threads", out=self.out)
        elif engine == "numexpr":
            if importlib.util.find_spec("numexpr") is None:
                raise NotImplementedError("numexpr not installed")
            import numexpr

            self.fn = lambda: numexpr.evaluate(EXPR[workload], local_dict={"x": x})
        elif engine == "numba prange":
            run = _prange(scalar)
            self.fn = lambda: run(x)
        self.fn()  # warm: JIT compile, thread pool, page faults

    def time_map(self, workload, n, dtype, engine):
        self.fn()

    def peakmem_map(self, workload, n, dtype, engine):
        self.fn()


class Mandelbrot:
    """W3: uneven cost per element; sorted input defeats static splitting."""

    params = ([False, True], ["numba 1 thread", "numba prange", "coremap threads",
                              "coremap static"])
    param_names = ["sorted", "engine"]
    timeout = 120

    def setup(self, sort, engine):
        x = _workloads.data(2 * 10**5, sort=sort)
        if engine == "numba 1 thread":
            serial = _numba_peers(_workloads.w3, np.int64)[3]
            o = np.empty(x.size, np.int64)
            self.fn = lambda: serial(x, o)
        elif engine == "numba prange":
            run = _prange(_workloads.w3, np.int64)
            self.fn = lambda: run(x)
        elif engine == "coremap threads":
            self.fn = lambda: cm.parallel_map(x, _workloads.w3)
        else:
            self.fn = lambda: cm.parallel_map(x, _workloads.w3, schedule="static")
        self.fn()

    def time_mandelbrot(self, sort, engine):
        self.fn()


class SmallCall:
    """W5: the overhead of one call on 10^3 elements."""

    params = ["numpy", "coremap", "coremap affine"]
    param_names = ["engine"]

    def setup(self, engine):
        x = _workloads.data(1000)
        aff = cm.kernels.affine(2.0, 1.0)
        self.fn = {
            "numpy": lambda: _workloads.w1_numpy(x),
            "coremap": lambda: cm.parallel_map(x, _workloads.w1),
            "coremap affine": lambda: cm.parallel_map(x, aff),
        }[engine]
        self.fn()

    def time_call(self, engine):
        self.fn()


class Speedup:
    """Ratios measured side by side in one process (what the targets are written in)."""

    timeout = 300

    def setup(self):
        self.x = _workloads.data(10**7)
        self.xs = _workloads.data(10**6, sort=True)
        cm.parallel_map(self.x, _workloads.w2)
        cm.parallel_map(self.xs, _workloads.w3)

    def track_w2_workers2_over_workers1(self):
        one = median_time(lambda: cm.parallel_map(self.x, _workloads.w2, workers=1))
        two = median_time(lambda: cm.parallel_map(self.x, _workloads.w2, workers=2))
        return one / two

    track_w2_workers2_over_workers1.unit = "x"

    def track_w2_over_numba_prange(self):
        run = _prange(_workloads.w2)
        run(self.x)
        peer = median_time(lambda: run(self.x))
        ours = median_time(lambda: cm.parallel_map(self.x, _workloads.w2))
        return peer / ours

    track_w2_over_numba_prange.unit = "x"

    def track_w3_sorted_over_numba_prange(self):
        run = _prange(_workloads.w3, np.int64)
        run(self.xs)
        peer = median_time(lambda: run(self.xs), 3)
        ours = median_time(lambda: cm.parallel_map(self.xs, _workloads.w3), 3)
        return peer / ours

    track_w3_sorted_over_numba_prange.unit = "x"


class PythonFunction:
    """W4: a function Numba cannot compile, per element, on the process engine."""

    params = ["serial", "coremap processes", "coremap vectorized threads", "numpy vectorized"]
    param_names = ["engine"]
    timeout = 300

    def setup(self, engine):
        x = _workloads.data(2 * 10**5)
        self.fn = {
            "serial": lambda: _workloads.w4_serial(x),
            "coremap processes": lambda: cm.parallel_map(x, _workloads.w4, backend="processes"),
            "coremap vectorized threads": lambda: cm.parallel_map(
                x, _workloads.w4_vectorized, vectorized=True),
            "numpy vectorized": lambda: _workloads.w4_vectorized(x),
        }[engine]
        self.fn()

    def time_w4(self, engine):
        self.fn()
