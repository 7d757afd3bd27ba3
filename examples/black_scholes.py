"""A Black-Scholes pricer: call and put prices of a million options, and their totals.

``parallel_map`` prices each option with a scalar function compiled by Numba: one
returning a tuple gives both prices in one pass. ``parallel_reduce`` sums the
prices of the book without storing them.
"""
import math

import numpy as np

import coremap as cm


def cnd(d):
    """Cumulative normal distribution."""
    return 0.5 * (1.0 + math.erf(d / math.sqrt(2.0)))


def call_price(s, k, t, r, v):
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    return s * cnd(d1) - k * math.exp(-r * t) * cnd(d1 - sq)


def prices(s, k, t, r, v):
    """Call and put from one evaluation of d1, d2 and the discount factor."""
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    disc = k * math.exp(-r * t)
    return s * cnd(d1) - disc * cnd(d1 - sq), disc * cnd(sq - d1) - s * cnd(-d1)


def put_price(s, k, t, r, v):
    sq = v * math.sqrt(t)
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / sq
    return k * math.exp(-r * t) * cnd(sq - d1) - s * cnd(-d1)


if __name__ == "__main__":
    n = 1_000_000
    rng = np.random.default_rng(0)
    spot = rng.uniform(50.0, 150.0, n)
    strike = rng.uniform(50.0, 150.0, n)
    years = rng.uniform(0.1, 2.0, n)
    rate, vol = 0.02, 0.3  # scalars broadcast like NumPy's
    book = (spot, strike, years, rate, vol)
    call, put = cm.parallel_map(book, prices)  # two outputs, one pass
    same = np.allclose(put, cm.parallel_map(book, put_price), rtol=1e-12, atol=1e-12)
    print(f"same put prices as the single-output function: {same}")
    print(f"first call prices: {np.round(call[:3], 4).tolist()}")
    print(f"first put prices: {np.round(put[:3], 4).tolist()}")
    parity = np.abs(call - put - (spot - strike * np.exp(-rate * years))).max()
    print(f"put-call parity holds: {parity < 1e-8}")
    total = cm.parallel_reduce(book, call_price, op="sum")  # no array of prices made
    print(f"value of the calls: {total:,.2f}")
    print(f"matches the sum of the prices: {math.isclose(total, call.sum(), rel_tol=1e-12)}")
