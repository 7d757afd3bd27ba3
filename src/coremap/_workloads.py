"""The workloads of docs/benchmarks.rst as code, shared by ``coremap demo``, ``coremap bench``,
the asv suite and the tests: each has a scalar function (what a user hands to
``parallel_map``) and a NumPy reference (what a user writes without coremap).
"""
from __future__ import annotations

import numpy as np

MANDEL_ITER = 500


def data(n: int, sort: bool = False, dtype=np.float64) -> np.ndarray:
    """``x = default_rng(0).random(n)``, sorted for W3 sorted."""
    x = np.random.default_rng(0).random(n)
    if sort:
        x.sort()
    return x.astype(dtype, copy=False)


def w1(v):
    """W1: memory bound."""
    return 2.0 * v + 1.0


def w1_numpy(x):
    return 2.0 * x + 1.0


def w2(v):
    """W2: transcendental, compute bound."""
    return np.sin(v) * np.exp(-v * v) + np.sqrt(v)


def w2_numpy(x):
    return np.sin(x) * np.exp(-x * x) + np.sqrt(x)


def w3(v):
    """W3: Mandelbrot escape count of ``c = -2 + 2.5 v + 0.5j`` (uneven cost)."""
    cr = -2.0 + 2.5 * v
    ci = 0.5
    zr = 0.0
    zi = 0.0
    for i in range(MANDEL_ITER):
        zr, zi = zr * zr - zi * zi + cr, 2.0 * zr * zi + ci
        if zr * zr + zi * zi > 4.0:
            return i
    return MANDEL_ITER


def w3_numpy(x):
    """The same escape count, vectorized: iterate only the points still inside."""
    cr = -2.0 + 2.5 * np.asarray(x, dtype=np.float64)
    ci = 0.5
    count = np.full(cr.shape, MANDEL_ITER, dtype=np.int64)
    idx = np.arange(cr.size)
    zr = np.zeros(cr.size)
    zi = np.zeros(cr.size)
    crf = cr.ravel()
    flat = count.ravel()
    for i in range(MANDEL_ITER):
        zr, zi = zr * zr - zi * zi + crf[idx], 2.0 * zr * zi + ci
        out = zr * zr + zi * zi > 4.0
        if out.any():
            flat[idx[out]] = i
            keep = ~out
            idx, zr, zi = idx[keep], zr[keep], zi[keep]
            if idx.size == 0:
                break
    return count


_W4_TABLE = {i: i * 0.5 for i in range(16)}


def w4(v):
    """W4: a plain Python function Numba cannot compile (a dict lookup, math.fsum)."""
    import math

    return _W4_TABLE.get(int(v * 16), 0.0) + math.fsum((v, v * v, 1.0))


def w4_serial(x):
    """The fastest serial idiom measured for W4: ``np.fromiter(map(...))`` over a list."""
    return np.fromiter(map(w4, x.tolist()), np.float64, len(x))


def w4_vectorized(c):
    """W4, the NumPy-on-chunks variant (``vectorized=True``)."""
    return np.sin(c) * np.exp(-c * c) + np.log1p(c)
