"""The workloads of docs/benchmarks.rst as code, shared by ``coremap demo``, ``coremap bench``,
the asv suite and the tests: each has a scalar function (what a user hands to
``parallel_map``) and a NumPy reference (what a user writes without coremap).
"""
from __future__ import annotations

import math

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


# -- Black-Scholes (BS): five inputs, two outputs ------------------------------------------

def bs_data(n: int) -> tuple[np.ndarray, ...]:
    """Spot, strike, years, rate, volatility: ``n`` options from a fixed seed."""
    rng = np.random.default_rng(0)
    return (rng.uniform(50.0, 150.0, n), rng.uniform(50.0, 150.0, n),
            rng.uniform(0.1, 2.0, n), rng.uniform(0.0, 0.05, n), rng.uniform(0.1, 0.5, n))


# The cumulative normal of the classic Black-Scholes benchmark (Abramowitz & Stegun
# 26.2.17, error < 7.5e-8), so every contender computes the same formula: NumPy has
# no erf, and scipy is not a dependency.
_A = (0.31938153, -0.356563782, 1.781477937, -1.821255978, 1.330274429)
_RSQRT2PI = 0.39894228040143267794


def _cnd(d):
    k = 1.0 / (1.0 + 0.2316419 * abs(d))
    a1, a2, a3, a4, a5 = _A
    ret = _RSQRT2PI * math.exp(-0.5 * d * d) * (k * (a1 + k * (a2 + k * (a3 + k * (a4 + k * a5)))))
    return 1.0 - ret if d > 0 else ret


def _cnd_numpy(d):
    k = 1.0 / (1.0 + 0.2316419 * np.abs(d))
    a1, a2, a3, a4, a5 = _A
    ret = _RSQRT2PI * np.exp(-0.5 * d * d) * (k * (a1 + k * (a2 + k * (a3 + k * (a4 + k * a5)))))
    return np.where(d > 0, 1.0 - ret, ret)


def bs_call(s, k, t, r, v):
    """Black-Scholes price of a European call."""
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    return s * _cnd(d1) - k * math.exp(-r * t) * _cnd(d1 - sq)


def bs_put(s, k, t, r, v):
    """Black-Scholes price of a European put."""
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    return k * math.exp(-r * t) * _cnd(sq - d1) - s * _cnd(-d1)


def bs_both(s, k, t, r, v):
    """Call and put from one pass over the inputs (a function with two outputs)."""
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    disc = k * math.exp(-r * t)
    c1 = _cnd(d1)
    c2 = _cnd(d1 - sq)
    return s * c1 - disc * c2, disc * (1.0 - c2) - s * (1.0 - c1)


def bs_numpy(s, k, t, r, v):
    """Call and put prices with NumPy."""
    sq = v * np.sqrt(t)
    d1 = (np.log(s / k) + (r + 0.5 * v * v) * t) / sq
    disc = k * np.exp(-r * t)
    c1, c2 = _cnd_numpy(d1), _cnd_numpy(d1 - sq)
    return s * c1 - disc * c2, disc * (1.0 - c2) - s * (1.0 - c1)
