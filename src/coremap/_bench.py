"""``coremap bench``: the workloads of docs/benchmarks.rst, head to head, in one process.

Every workload builds its contenders (NumPy, the installed peers, coremap),
warms each once (JIT compiles, page faults), then times them interleaved, in a
rotating order, ``repeat`` times, and reports medians. Ratios are only ever
taken between timings of the same run: the machines are shared and noisy.

Peers that are not installed are skipped with a note (``pip install
"coremap[bench]"`` installs them).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import numpy as np

import coremap as cm
from coremap import _config, _workloads

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W8", "W9", "JIT", "POOL", "SCALING")


@dataclasses.dataclass
class Row:
    workload: str
    contender: str
    seconds: float
    speedup: float | None = None  # over the workload's baseline (NumPy, or Numba 1 thread)
    target: str = ""
    met: bool | None = None
    note: str = ""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def median_time(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median seconds of ``repeat`` back-to-back calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# Pause before each timing: OpenMP threads (Numba's omp layer) spin for a few
# milliseconds after a parallel region and slow whatever runs next on a 2-core
# machine (measured: W1 into out= 9.6 ms right after prange, 7.0 ms 10 ms later).
GAP = 0.02
# After the pause, a call shorter than WARM_BELOW is timed inside a loop of calls
# in a row lasting at least LOOP_S (and LOOP calls); the sample is the median of the
# loop's second half, as users make such calls. After a pause every contender
# runs slow for its first few calls on the 2-core VM, one Numba thread included:
# W1 at 10^6 elements took 395, 352, 245, 208, 203 us on its first five calls.
# Timed cold, a 10-element coremap call took 110-125 us instead of 4 us (a no-op
# Python call 1.0-1.3 us instead of 0.1 us), and prange on 10^4 elements of W2
# 5 ms instead of 64 us (a halted virtual CPU is slow to wake). Longer calls are
# timed one at a time.
WARM_BELOW = 0.05
LOOP = 6
LOOP_S = 0.01


def time_interleaved(contenders: Mapping[str, Callable[[], object]],
                     repeat: int) -> dict[str, float]:
    """Median seconds per contender, in a shuffled order, each sample after a pause.

    Each contender is warmed once first. A contender whose last sample took less
    than ``WARM_BELOW`` seconds is sampled in a loop of calls lasting at least
    ``LOOP_S`` seconds and ``LOOP`` calls: the median of the loop's second half.
    """
    import random

    last = {}
    for name, fn in contenders.items():
        t = time.perf_counter()
        fn()
        last[name] = time.perf_counter() - t
    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(repeat):
        order = names[:]
        rng.shuffle(order)  # nobody always runs right after the same neighbour
        for name in order:
            time.sleep(GAP)
            loop: list[float] = []
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                contenders[name]()
                loop.append(time.perf_counter() - t)
                if last[name] >= WARM_BELOW or (
                        len(loop) >= LOOP and time.perf_counter() - start >= LOOP_S):
                    break
            last[name] = statistics.median(loop[len(loop) // 2:])
            samples[name].append(last[name])
    return {n: statistics.median(v) for n, v in samples.items()}


# -- peers -------------------------------------------------------------------------------

def _numba_peers(scalar, out_dtype=np.float64):
    """Numba's own parallel targets for a scalar function, and a 1-thread loop."""
    import numba

    jf = numba.njit(scalar)
    vec_par = numba.vectorize(["float64(float64)"], target="parallel")(scalar)

    @numba.njit(parallel=True)
    def prange_fresh(x):
        o = np.empty(x.size, out_dtype)
        for i in numba.prange(x.size):
            o[i] = jf(x[i])
        return o

    @numba.njit(parallel=True)
    def prange_out(x, o):
        for i in numba.prange(x.size):
            o[i] = jf(x[i])

    @numba.njit
    def serial(x, o):
        for i in range(x.size):
            o[i] = jf(x[i])

    return vec_par, prange_fresh, prange_out, serial


def _numexpr(expr: str, x):
    import numexpr

    numexpr.set_num_threads(_config.usable_cores())
    return lambda: numexpr.evaluate(expr, local_dict={"x": x})


def _pool_map_chunks(scalar_name: str, x, chunks: int):
    """multiprocessing.Pool.map over ``chunks`` pieces (forkserver): the stdlib way."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    pool = ctx.Pool(_config.usable_cores())
    pieces = np.array_split(x, chunks)

    def run():
        return np.concatenate(pool.map(_chunk_apply, [(scalar_name, p) for p in pieces]))

    return run, pool


def _joblib_chunks(scalar_name: str, x, chunks: int):
    """joblib.Parallel (loky) over ``chunks`` pieces, as a user would write it."""
    from joblib import Parallel, delayed

    pieces = np.array_split(x, chunks)
    run = Parallel(n_jobs=_config.usable_cores(), backend="loky")
    return lambda: np.concatenate(run(delayed(_chunk_apply)((scalar_name, p)) for p in pieces))


def _chunk_apply(args):
    name, piece = args
    import numba

    from coremap import _workloads as w

    f = _JIT_CACHE.get(name)
    if f is None:
        scalar = numba.njit(getattr(w, name))

        @numba.njit
        def loop(x):
            o = np.empty(x.size, np.int64)
            for i in range(x.size):
                o[i] = scalar(x[i])
            return o

        f = _JIT_CACHE[name] = loop
    return f(piece)


_JIT_CACHE: dict = {}


# -- workloads ---------------------------------------------------------------------------

def _array_peers(x, scalar, reference, expr: str) -> tuple[dict, Callable]:
    """NumPy, numexpr and Numba's parallel targets on ``x``; also prange into an out."""
    contenders = {"numpy": lambda: reference(x)}
    if _has("numexpr"):
        contenders["numexpr"] = _numexpr(expr, x)
    vec_par, prange_fresh, prange_out, _ = _numba_peers(scalar)
    contenders["numba vectorize parallel"] = lambda: vec_par(x)
    contenders["numba prange"] = lambda: prange_fresh(x)
    return contenders, prange_out


# W1 below this many elements is a medium call (10^6: ~100 us on 2 cores), whose
# target is 0.9x prange into the same out= (docs/benchmarks.rst); from it, the
# large-call targets (bandwidth, NumPy).
MEDIUM_W1 = 10**7


def bench_w1(n: int, repeat: int) -> list[Row]:
    x = _workloads.data(n)
    o = np.empty_like(x)
    contenders, prange_out = _array_peers(x, _workloads.w1, _workloads.w1_numpy,
                                          "2.0*x + 1.0")
    contenders["numba prange, out="] = lambda: prange_out(x, o)
    aff = cm.kernels.affine(2.0, 1.0)
    contenders["coremap"] = lambda: cm.parallel_map(x, _workloads.w1)
    contenders["coremap, out="] = lambda: cm.parallel_map(x, _workloads.w1, out=o)
    contenders["coremap affine, out="] = lambda: cm.parallel_map(x, aff, out=o)
    contenders["copy, 2 threads (bandwidth)"] = lambda: cm.parallel_map(x, np.positive, out=o)
    t = time_interleaved(contenders, repeat)
    base = t["numpy"]
    rows = [Row(f"W1 {n:.0e}", k, v, base / v) for k, v in t.items()]
    peers_out = t["numba prange, out="]
    copy = t["copy, 2 threads (bandwidth)"]
    for r in rows:
        if r.contender == "coremap" and n >= MEDIUM_W1:
            r.target, r.met = ">= 1.5x numpy", base / r.seconds >= 1.5
        elif r.contender.startswith("coremap") and "out=" in r.contender:
            r.note = f"{peers_out / r.seconds:.2f}x prange out="
            if n < MEDIUM_W1:  # a ~100 us call: the target is the peer's, within 10 %
                r.target = ">= 0.9x prange out="
                r.met = peers_out / r.seconds >= 0.9
            else:
                r.note += f", {copy / r.seconds:.0%} of copy bw"
                r.target = ">= prange out=, >= 85% copy bw"
                r.met = r.seconds <= peers_out and copy / r.seconds >= 0.85
    return rows


def bench_w2(n: int, repeat: int) -> list[Row]:
    x = _workloads.data(n)
    contenders, _ = _array_peers(x, _workloads.w2, _workloads.w2_numpy,
                                 "sin(x)*exp(-x*x) + sqrt(x)")
    if _has("dask"):
        import dask.array as da

        xd = da.from_array(x, chunks=max(1, x.size // (4 * _config.usable_cores())))
        contenders["dask.array map_blocks"] = (
            lambda: xd.map_blocks(_workloads.w2_numpy).compute(scheduler="threads"))
    contenders["coremap"] = lambda: cm.parallel_map(x, _workloads.w2)
    contenders["coremap workers=1"] = lambda: cm.parallel_map(x, _workloads.w2, workers=1)
    t = time_interleaved(contenders, repeat)
    base = t["numpy"]
    rows = [Row(f"W2 {n:.0e}", k, v, base / v) for k, v in t.items()]
    best_peer = min(v for k, v in t.items() if not k.startswith("coremap") and k != "numpy")
    for r in rows:
        if r.contender == "coremap":
            peer_ratio = best_peer / r.seconds
            scaling = t["coremap workers=1"] / r.seconds
            r.target = ">= 1.1x best peer, >= 1.85x workers=1"
            r.met = peer_ratio >= 1.1 and scaling >= 1.85
            r.note = f"{peer_ratio:.2f}x best peer, {scaling:.2f}x workers=1"
    return rows


def bench_w3(n: int, repeat: int, pool: bool = True) -> list[Row]:
    rows = []
    for sort in (False, True):
        x = _workloads.data(n, sort=sort)
        vec_par, prange_fresh, _, serial = _numba_peers(_workloads.w3, np.int64)
        o = np.empty(n, np.int64)
        contenders = {  # called within this iteration only: x, o, ... are this sort's
            "numba 1 thread": lambda: serial(x, o),  # noqa: B023
            "numba vectorize parallel": lambda: vec_par(x),  # noqa: B023
            "numba prange": lambda: prange_fresh(x),  # noqa: B023
        }
        mp_pool = None
        if pool:
            contenders["mp.Pool.map, 64 chunks"], mp_pool = _pool_map_chunks("w3", x, 64)
        if pool and _has("joblib"):
            contenders["joblib loky, 64 chunks"] = _joblib_chunks("w3", x, 64)
        contenders["coremap"] = lambda: cm.parallel_map(x, _workloads.w3)  # noqa: B023
        contenders["coremap workers=1"] = (
            lambda: cm.parallel_map(x, _workloads.w3, workers=1))  # noqa: B023
        try:
            t = time_interleaved(contenders, repeat)
        finally:
            if mp_pool is not None:
                mp_pool.terminate()
                mp_pool.join()
        base = t["numba 1 thread"]
        name = f"W3 {'sorted' if sort else 'random'} {n:.0e}"
        part = [Row(name, k, v, base / v) for k, v in t.items()]
        numba_par = min(t["numba vectorize parallel"], t["numba prange"])
        best_peer = min(v for k, v in t.items()
                        if not k.startswith("coremap") and "1 thread" not in k)
        for r in part:
            if r.contender != "coremap":
                continue
            scaling = t["coremap workers=1"] / r.seconds
            if sort:
                r.target = ">= 1.6x numba parallel, >= 1.85x workers=1"
                r.met = numba_par / r.seconds >= 1.6 and scaling >= 1.85
                r.note = f"{numba_par / r.seconds:.2f}x numba parallel, {scaling:.2f}x workers=1"
            else:
                r.target = ">= best peer"
                r.met = r.seconds <= best_peer
                r.note = f"{best_peer / r.seconds:.2f}x best peer"
        rows += part
    return rows


def _w4_chunk(piece):
    return _workloads.w4_serial(piece)


def bench_w4(n: int, repeat: int, pool: bool = True) -> list[Row]:
    """W4: a Python function Numba cannot compile, and NumPy on chunks."""
    import multiprocessing as mp

    x = _workloads.data(n)
    # Callable[..., object]: some contenders bind a loop value as a default argument
    contenders: dict[str, Callable[..., object]] = {
        "serial: list comprehension": lambda: np.array([_workloads.w4(v) for v in x.tolist()]),
        "serial: np.fromiter(map)": lambda: _workloads.w4_serial(x),
        "serial: np.frompyfunc": lambda: np.frompyfunc(_workloads.w4, 1, 1)(x).astype(float),
    }
    mp_pool = None
    if pool:
        mp_pool = mp.get_context("forkserver").Pool(_config.usable_cores())
        for chunks in (2, 64):
            pieces = np.array_split(x, chunks)
            contenders[f"mp.Pool.map, {chunks} chunks"] = (
                lambda p=pieces: np.concatenate(mp_pool.map(_w4_chunk, p)))
        if _has("joblib"):
            from joblib import Parallel, delayed

            run = Parallel(n_jobs=_config.usable_cores(), backend="loky")
            pieces = np.array_split(x, 64)
            contenders["joblib loky, 64 chunks"] = (
                lambda: np.concatenate(run(delayed(_w4_chunk)(p) for p in pieces)))
    contenders["coremap processes"] = lambda: cm.parallel_map(x, _workloads.w4,
                                                              backend="processes")
    try:
        t = time_interleaved(contenders, repeat)
    finally:
        if mp_pool is not None:
            mp_pool.terminate()
            mp_pool.join()
    serial = min(v for k, v in t.items() if k.startswith("serial"))
    rows = [Row(f"W4 {n:.0e}", k, v, serial / v) for k, v in t.items()]
    procs = [v for k, v in t.items() if k.startswith(("mp.", "joblib"))]
    for r in rows:
        if r.contender == "coremap processes":
            r.target = ">= 1.85x fastest serial, >= process peers"
            r.met = serial / r.seconds >= 1.85 and all(r.seconds <= p for p in procs)
            r.note = f"{serial / r.seconds:.2f}x fastest serial idiom"
    # the NumPy-on-chunks variant: vectorized=True on threads
    t = time_interleaved({
        "numpy (1 thread)": lambda: _workloads.w4_vectorized(x),
        "coremap vectorized=True": lambda: cm.parallel_map(x, _workloads.w4_vectorized,
                                                           vectorized=True),
    }, repeat)
    rows += [Row(f"W4 vec {n:.0e}", k, v, t["numpy (1 thread)"] / v) for k, v in t.items()]
    return rows


def _double(a):
    return a * 2.0


def _square(x):
    return x * x


def bench_pool(repeat: int, arrays: int = 16, mb: int = 8) -> list[Row]:
    """coremap.Pool against multiprocessing.Pool: big arrays both ways, and tiny items."""
    import multiprocessing as mp

    big = [_workloads.data(mb * 2**20 // 8 + i) for i in range(arrays)]
    items = list(range(10**5))
    mp_pool = mp.get_context("forkserver").Pool(_config.usable_cores())
    cm_pool = cm.Pool(_config.usable_cores())
    try:
        t = time_interleaved({
            "multiprocessing.Pool": lambda: mp_pool.map(_double, big),
            "coremap.Pool": lambda: cm_pool.map(_double, big),
        }, repeat)
        rows = [Row(f"Pool {arrays}x{mb}MB", k, v, t["multiprocessing.Pool"] / v)
                for k, v in t.items()]
        rows[-1].target = ">= 2x multiprocessing.Pool"
        rows[-1].met = t["multiprocessing.Pool"] / rows[-1].seconds >= 2
        t = time_interleaved({
            "multiprocessing.Pool": lambda: mp_pool.map(_square, items),
            "coremap.Pool": lambda: cm_pool.map(_square, items),
        }, repeat)
        part = [Row("Pool 1e5 ints", k, v, t["multiprocessing.Pool"] / v) for k, v in t.items()]
        part[-1].target = "within 1.3x of multiprocessing.Pool"
        part[-1].met = part[-1].seconds <= 1.3 * t["multiprocessing.Pool"]
        rows += part
    finally:
        mp_pool.terminate()
        mp_pool.join()
        cm_pool.terminate()
        cm_pool.join()
    return rows


_W5_SCALE = 2.0


def _w1_global(v):
    """W1 reading a global number: the check that it did not change runs on every call."""
    return _W5_SCALE * v + 1.0


def bench_w5(repeat: int) -> list[Row]:
    import timeit

    x = _workloads.data(1000)
    import numba

    vec_cpu = numba.vectorize(["float64(float64)"])(_workloads.w1)
    aff = cm.kernels.affine(2.0, 1.0)
    contenders = {
        "numpy": lambda: _workloads.w1_numpy(x),
        "numba vectorize cpu": lambda: vec_cpu(x),
        "coremap": lambda: cm.parallel_map(x, _workloads.w1),
        "coremap, reads a global": lambda: cm.parallel_map(x, _w1_global),
        "coremap affine": lambda: cm.parallel_map(x, aff),
    }
    for fn in contenders.values():
        fn()
    samples: dict[str, list[float]] = {}
    for _ in range(repeat):
        for k, fn in contenders.items():
            samples.setdefault(k, []).append(
                min(timeit.repeat(fn, number=200, repeat=3)) / 200)
    t = {k: statistics.median(v) for k, v in samples.items()}
    rows = [Row("W5 1e+03", k, v, t["numpy"] / v) for k, v in t.items()]
    for r in rows:
        if r.contender.startswith("coremap"):
            r.target, r.met = "<= 6x numpy", r.seconds <= 6 * t["numpy"]
            r.note = f"{r.seconds / t['numpy']:.1f}x numpy's time"
    return rows


def bench_w6(n: int, repeat: int) -> list[Row]:
    base = _workloads.data(n)
    side = int(np.sqrt(n))
    variants = {
        "contiguous float64": (base,),
        "float32": (base.astype(np.float32),),
        "Fortran 2-D": (np.asfortranarray(base[: side * side].reshape(side, side)),),
        "strided view": (_workloads.data(2 * n)[::2],),
        "two broadcast inputs": (base[:side].reshape(side, 1),
                                 base[side:2 * side].reshape(1, side)),
    }

    def two(a, b):  # W2 of a, plus b: compiled as one kernel
        return np.sin(a) * np.exp(-a * a) + np.sqrt(a) + b

    contenders: dict[str, Callable[..., object]] = {}  # each binds its arrays by default
    for name, arrays in variants.items():
        func = two if len(arrays) == 2 else _workloads.w2
        arg = arrays if len(arrays) == 2 else arrays[0]
        contenders[name] = (lambda a=arg, f=func: cm.parallel_map(a, f))
    t = time_interleaved(contenders, repeat)
    # per byte of output, as docs/benchmarks.rst states the target
    nbytes = {k: int(np.prod(np.broadcast_shapes(*(a.shape for a in v)))) * v[0].itemsize
              for k, v in variants.items()}
    ref = t["contiguous float64"] / nbytes["contiguous float64"]
    rows = []
    for k, v in t.items():
        per = v / nbytes[k]
        r = Row(f"W6 {n:.0e}", k, v, ref / per, target="within 1.3x of contiguous per byte")
        r.met = per <= 1.3 * ref
        r.note = f"{per / ref:.2f}x contiguous time per byte"
        rows.append(r)
    return rows


def bench_jit(repeat: int) -> list[Row]:
    """First call of a new scalar function (compile), and a warm call's overhead."""
    from coremap._kernels import _numba, _runner

    x = _workloads.data(100_000)
    cm.parallel_map(x[:10], _workloads.w1)  # Numba imported and initialised
    firsts = []
    # A constant new to every run: the kernel disk cache keys on the code and its
    # constants, so this times a compile, never a load from an earlier run's cache.
    salt = time.time_ns() % 10**9
    for k in range(repeat):
        src = f"def f{k}(v):\n    return np.sin(v) * {k + 2}.{salt:09d} + v\n"
        ns: dict[str, Any] = {"np": np}
        exec(src, ns)
        f = ns[f"f{k}"]
        t0 = time.perf_counter()
        cm.parallel_map(x, f)
        firsts.append(time.perf_counter() - t0)
    first = statistics.median(firsts)
    rows = [Row("JIT", "first call, new function (compile + run 1e5)", first,
                target="<= 0.5 s", met=first <= 0.5)]
    small = x[:1000]
    out = np.empty_like(small)
    addr = _numba.kernel_address(_workloads.w2, (small.dtype,), small.dtype, "cc")
    ptrs = [small.ctypes.data, out.ctypes.data]
    meta = [small.size, 0, 0, 1, 0, 0, 1]
    import timeit

    # microsecond calls: best of several timeit runs, back to back (no pause:
    # time_interleaved's pause would measure a cold CPU instead)
    t: dict[str, float] = {}
    for _ in range(max(repeat, 5)):
        for name, fn in (("kernel alone", lambda: _runner.run_inline(addr, ptrs, meta, 0,
                                                                      small.size)),
                         ("coremap warm call", lambda: cm.parallel_map(small, _workloads.w2))):
            best = min(timeit.repeat(fn, number=200, repeat=3)) / 200
            t[name] = min(t.get(name, best), best)
    over = t["coremap warm call"] - t["kernel alone"]
    rows.append(Row("JIT", "warm call overhead over the kernel (1e3 elements)", over,
                    target="<= 20 us", met=over <= 20e-6, note=f"{over * 1e6:.1f} us"))
    return rows


# -- strong scaling ----------------------------------------------------------------------

def scaling_workers(cores: int) -> list[int]:
    """1, 2, 4, ... up to ``cores`` (``cores`` itself included)."""
    ws = [1]
    while ws[-1] * 2 < cores:
        ws.append(ws[-1] * 2)
    if cores > 1:
        ws.append(cores)
    return ws


def _batched(fn: Callable[[], object], k: int, context=None) -> Callable[[], object]:
    def run():
        if context is None:
            for _ in range(k):
                fn()
            return
        with context():
            for _ in range(k):
                fn()

    return run


def bench_scaling(sizes: Iterable[int], repeat: int,
                  workers: list[int] | None = None) -> list[Row]:
    """Strong scaling of W2: coremap, Numba prange and numexpr at 1, 2, 4, ... workers.

    Speed-ups are over one Numba thread (a plain ``@njit`` loop into a fresh NumPy
    array); every contender allocates its output with NumPy. Small sizes are timed
    in batches of calls lasting ~2 ms, so the clock's resolution does not matter.
    coremap's worker count is set with ``cm.config(workers=w)`` around the batch,
    as a program making many calls would: each call then takes the cached fast
    path (an explicit ``workers=`` keyword is cached too, once per value).
    """
    import numba

    workers = workers or scaling_workers(_config.usable_cores())
    # numba.config sets its options from the environment at run time: not declared
    max_threads = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    workers = [w for w in workers if w <= max_threads]
    _, _, prange_out, serial = _numba_peers(_workloads.w2)
    rows: list[Row] = []
    for n in sizes:
        x = _workloads.data(n)
        # (call, context): Callable[..., object], as some bind w as a default argument
        calls: dict[str, tuple[Callable[..., object], object]] = {
            "numba 1 thread": (lambda: serial(x, np.empty_like(x)), None),  # noqa: B023
        }
        for w in workers:
            calls[f"coremap w={w}"] = (
                lambda: cm.parallel_map(x, _workloads.w2),  # noqa: B023
                lambda w=w: cm.config(workers=w))

            def prange_at(w: int = w) -> object:
                numba.set_num_threads(w)
                return prange_out(x, np.empty_like(x))  # noqa: B023

            calls[f"prange w={w}"] = (prange_at, None)
            if _has("numexpr"):
                import numexpr

                calls[f"numexpr w={w}"] = (
                    lambda w=w: (numexpr.set_num_threads(w),  # noqa: B023
                                 numexpr.evaluate("sin(x)*exp(-x*x) + sqrt(x)",
                                                  local_dict={"x": x})), None)  # noqa: B023
        for fn, context in calls.values():
            _batched(fn, 2, context)()  # compile, warm, and fill the fast path's cache
        one = median_time(calls["numba 1 thread"][0], 3)
        k = max(1, int(2e-3 / max(one, 1e-7)))
        t = time_interleaved({name: _batched(fn, k, context)
                              for name, (fn, context) in calls.items()}, repeat)
        numba.set_num_threads(max_threads)
        base = t["numba 1 thread"] / k
        for name, sec in t.items():
            rows.append(_scaling_row(n, name, sec / k, base, t, workers))
    return rows


def _scaling_row(n, name, sec, base, t, workers) -> Row:
    row = Row(f"SCALING {n:.0e}", name, sec, base / sec)
    if name.startswith("coremap"):
        w = int(name.split("=")[1])
        prange = t[f"prange w={w}"] / t[name]
        row.note = f"{prange:.2f}x prange w={w}"
        if w == 1 and n >= 10**6:
            row.target = ">= 0.95x one Numba thread"
            row.met = base / sec >= 0.95
        elif w == workers[-1] and n >= 10**4:
            row.target = ">= 1.0x one thread" + (", >= 0.9x prange" if n >= 3 * 10**4 else "")
            row.met = base / sec >= 1.0 and (n < 3 * 10**4 or prange >= 0.9)
    return row


def print_scaling(rows: list[Row], file: TextIO | None = None) -> None:
    """The SCALING rows as a matrix: one line per size, speed-ups per contender."""
    file = file or sys.stdout
    sizes = list(dict.fromkeys(r.workload for r in rows))
    names = [r.contender for r in rows if r.workload == sizes[0]] if sizes else []
    print("\nspeed-up over one Numba thread (W2, fresh output each call)", file=file)
    print(f"{'size':>8} " + " ".join(f"{c:>13}" for c in names), file=file)
    for size in sizes:
        by = {r.contender: r for r in rows if r.workload == size}
        cells = [f"{by[c].speedup:>12.2f}x" if c in by else f"{'':>13}" for c in names]
        print(f"{size.split()[1]:>8} " + " ".join(cells), file=file)
    from coremap._kernels import _runner

    print(f"native pool wake-up (post to first helper inside), moving estimate: "
          f"{_runner.pool_wake_ns() / 1e3:.1f} us", file=file)
    file.flush()


# -- W8 (map-reduce) and W9 (Black-Scholes, two outputs) ----------------------------------
#
# W8: sum(W2(x)) and max(W2(x)) at 10^7 (10^8 in a full run), and a row sum along
# axis=1 of W2 over a 10^4 x 10^3 array, against NumPy (f(x).sum()), a Numba prange
# reduction, numexpr's sum() where it has one, and dask.array. W9: call and put prices
# of 10^7 options (5 inputs, 2 outputs) against NumPy and Numba's parallel @vectorize
# (two calls).

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
        # Callable[..., object]: each contender binds its op (or kernel) by default
        contenders: dict[str, Callable[..., object]] = {
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
                r.met = vs_prange >= 1.0 and base / r.seconds >= 1.6
                r.note = f"{vs_prange:.2f}x prange"
        rows += part
    exact = math.fsum(_workloads.w2_numpy(x))
    err = abs(float(cm.parallel_reduce(x, _workloads.w2)) - exact) / exact
    rows.append(Row(f"W8 sum {n:.0e}", "relative error vs math.fsum", err,
                    target="<= 1e-11", met=err <= 1e-11, note=f"{err:.1e}"))
    return rows


def bench_rows(repeat: int, shape: tuple[int, int] = (10**4, 10**3)) -> list[Row]:
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


# -- driver ------------------------------------------------------------------------------

def machine() -> str:
    from coremap._info import _cpu_name, _version

    vers = ", ".join(
        f"{m} {_version(m)}" for m in ("numpy", "numba", "numexpr") if _version(m)
    )
    return (f"{_config.usable_cores()} cores, {_cpu_name()}, Python {platform.python_version()}, "
            f"{vers}, coremap {cm.__version__}")


def run(workloads: Iterable[str] = WORKLOADS, quick: bool = False,
        file: TextIO | None = None) -> list[Row]:
    file = file or sys.stdout
    repeat = 3 if quick else 7
    big = 10**7
    rows: list[Row] = []
    print(f"machine: {machine()}", file=file)
    for peer in ("numexpr", "joblib", "dask"):
        if not _has(peer):
            print(f"note: {peer} not installed, its rows are skipped "
                  "(pip install 'coremap[bench]')", file=file)
    steps = {
        "W1": lambda: bench_w1(10**6, repeat) + bench_w1(big, repeat)
        + ([] if quick else bench_w1(10**8, 3)),
        "W2": lambda: bench_w2(big, repeat),
        "W3": lambda: bench_w3(10**6 if not quick else 3 * 10**5, repeat),
        "W4": lambda: bench_w4(10**6 if not quick else 2 * 10**5, repeat),
        "W5": lambda: bench_w5(repeat),
        "W6": lambda: bench_w6(big if not quick else 10**6, repeat),
        "W8": lambda: bench_w8(big, repeat)
        + ([] if quick else bench_w8(10**8, 3))
        + bench_rows(repeat),
        "W9": lambda: bench_w9(big if not quick else 10**6, repeat),
        "JIT": lambda: bench_jit(repeat),
        "POOL": lambda: bench_pool(repeat, arrays=16 if not quick else 4),
        "SCALING": lambda: bench_scaling(
            [10**3, 10**4, 3 * 10**4, 10**5] + ([10**6] if quick else [3 * 10**5, 10**6, 10**7]),
            repeat),
    }
    for w in workloads:
        part = steps[w]()
        print_table(part, file=file)
        if w == "SCALING":
            print_scaling(part, file=file)
        rows += part
    return rows


def print_table(rows: list[Row], file: TextIO | None = None) -> None:
    file = file or sys.stdout
    print(f"\n{'workload':16} {'contender':34} {'median':>10} {'speed-up':>9}  "
          f"{'target':42} {'met':4} note", file=file)
    for r in rows:
        sec = f"{r.seconds * 1e3:.2f} ms" if r.seconds >= 1e-4 else f"{r.seconds * 1e6:.1f} us"
        sp = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        met = "" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.workload:16} {r.contender:34} {sec:>10} {sp:>9}  {r.target:42} {met:4} {r.note}",
              file=file)
    file.flush()


def to_json(rows: list[Row], path: str) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), "pid": os.getpid(),
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def plot(rows: list[Row], path: str) -> None:
    """A bar chart of speed-ups (log scale), one panel per workload.

    SCALING rows are drawn as speed-up against workers, one panel per size (into
    ``path`` when they are all there is, else into ``<path stem>-scaling.png``).
    """
    scaling = [r for r in rows if r.workload.startswith("SCALING")]
    rows = [r for r in rows if not r.workload.startswith("SCALING")]
    if scaling:
        root, ext = os.path.splitext(path)
        plot_scaling(scaling, path if not rows else f"{root}-scaling{ext or '.png'}")
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'coremap[bench]'") from exc
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.speedup is not None:
            groups.setdefault(r.workload, []).append(r)
    n = len(groups)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (name, part) in zip(axes.flat, groups.items()):
        labels = [r.contender for r in part]
        values = [r.speedup for r in part if r.speedup is not None]  # all of them
        colors = ["#d95f02" if lab.startswith("coremap") else "#7570b3" for lab in labels]
        ax.barh(range(len(part)), values, color=colors)
        for k, v in enumerate(values):
            ax.text(v, k, f" {v:.2f}x", va="center", fontsize=6)
        ax.set_xlim(min(values + [1.0]) * 0.8, max(values + [1.0]) * 1.6)
        ax.set_yticks(range(len(part)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"speed-up over each workload's baseline (higher is better)\n{machine()}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[Row], path: str) -> None:
    """Speed-up over one Numba thread against workers: one panel per size, a line per tool."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'coremap[bench]'") from exc
    sizes = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 3.2), squeeze=False)
    for ax, size in zip(axes.flat, sizes):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.workload == size and "=" in r.contender and r.speedup is not None:
                tool, w = r.contender.split(" w=")
                lines.setdefault(tool, []).append((int(w), r.speedup))
        colors = {"coremap": "#d95f02", "prange": "#7570b3", "numexpr": "#1b9e77"}
        for tool, pts in lines.items():
            ax.plot(*zip(*pts), marker="o", label=tool, color=colors.get(tool))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ticks = sorted({w for pts in lines.values() for w, _ in pts})
        ax.set_xticks(ticks, [str(w) for w in ticks])
        ax.set_title(f"n = {size.split()[1]}", fontsize=9)
        ax.set_xlabel("workers", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("speed-up over one Numba thread", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"W2 strong scaling (higher is better)\n{machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
