"""``coremap demo``: the main job on a fresh machine, in a few seconds.

Runs W2 (transcendental) and W3 sorted (Mandelbrot, uneven cost) from the
benchmark definitions (docs/benchmarks.rst) with NumPy as a user writes it and
with one ``parallel_map`` call, and prints the times, the speed-up, and a check
against NumPy. Both sides are timed the same way: one untimed first call (NumPy's
faults in its temporaries, coremap's compiles the function), then the median of
``repeat`` warm calls.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import coremap as cm
from coremap import _config, _workloads
from coremap._bench import median_time


def run(n_w2: int = 20_000_000, n_w3: int = 1_000_000, repeat: int = 3, file=None) -> list[dict]:
    """Run the demo and print its table; returns the rows."""
    file = file or sys.stdout
    cores = _config.usable_cores()
    print(f"coremap {cm.__version__} demo: NumPy on one thread vs coremap.parallel_map "
          f"on {cores} core{'s' if cores != 1 else ''}", file=file)
    rows = []
    cases = [
        ("W2  sin(x)*exp(-x*x)+sqrt(x)", n_w2, False, _workloads.w2, _workloads.w2_numpy),
        ("W3  Mandelbrot, sorted x", n_w3, True, _workloads.w3, _workloads.w3_numpy),
    ]
    baselines = [
        "W2: the same formula as NumPy array expressions, on one thread.",
        "W3: a different algorithm, since a per-element loop with an early exit has no NumPy\n"
        "    form: up to 500 array-wide passes over the points still inside the set, on one\n"
        "    thread; coremap runs the scalar escape loop per element.",
    ]
    header = (f"{'workload':32} {'n':>11} {'numpy':>9} {'1st call':>9} {'coremap':>9} "
              f"{'speed-up':>9}  check")
    print(header, file=file)
    print("-" * len(header), file=file)
    for name, n, sort, scalar, reference in cases:
        x = _workloads.data(n, sort=sort)
        expected = reference(x)  # untimed: the first call faults in NumPy's temporaries
        t_numpy = median_time(lambda: reference(x), repeat)  # noqa: B023
        t0 = time.perf_counter()
        got = cm.parallel_map(x, scalar)  # includes the JIT compile
        t_first = time.perf_counter() - t0
        t_cm = median_time(lambda: cm.parallel_map(x, scalar), repeat)  # noqa: B023
        if expected.dtype.kind == "f":
            ok = bool(np.allclose(got, expected, rtol=1e-12, atol=0))
            check = "ok (allclose, rtol 1e-12)" if ok else "MISMATCH"
        else:
            same = int(np.count_nonzero(got == expected))
            ok = same == n
            check = "ok (all equal)" if ok else f"{n - same} of {n} differ"
        row = dict(workload=name, n=n, numpy=t_numpy, first=t_first, coremap=t_cm,
                   speedup=t_numpy / t_cm, ok=ok)
        rows.append(row)
        print(f"{name:32} {n:>11,} {t_numpy:>8.3f}s {t_first:>8.3f}s {t_cm:>8.3f}s "
              f"{row['speedup']:>8.2f}x  {check}", file=file)
    print(f"\nnumpy, coremap: median of {repeat} warm call{'s' if repeat != 1 else ''}. "
          "1st call: coremap's first call, which includes\ncompiling the scalar function "
          "with Numba; later calls reuse the compiled kernel.", file=file)
    print("The numpy baseline of each row:", file=file)
    for line in baselines:
        print(f"  {line}", file=file)
    print("See what coremap chose and why: coremap.explain(x, f).", file=file)
    return rows
