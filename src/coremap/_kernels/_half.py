"""float16 in compiled kernels: Numba has no float16, so kernels read and write its bits.

    float16 bits (uint16) ──h2f──> float32 (exact) ──f──> float32/64 ──f2h──> float16 bits

``h2f`` is exact (every float16 is a float32). ``f2h`` rounds to nearest, ties to
even, with subnormals, infinities and NaN, as NumPy's ``astype(np.float16)``
does (``tests/test_semantics.py`` compares all 65,536 values and random floats).
Both are plain arithmetic (``frexp``, ``rint``): Numba cannot reinterpret bits
of a scalar, and an array view per element would allocate.
"""
from __future__ import annotations

import functools
import math

import numpy as np

# 2 ** (e - 25) for each float16 exponent field e: (1024 + mantissa) * that
_SCALE = np.array([2.0 ** (e - 25) for e in range(32)])
_SUBNORMAL = 2.0 ** -24  # value of one unit of a subnormal float16 mantissa
_MIN_NORMAL = 2.0 ** -14
_OVERFLOW = 65520.0  # rounds to infinity: 65504 (the largest float16) + half a unit


def _h2f(bits):
    h = np.int64(bits)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * _SUBNORMAL
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = (1024 + m) * _SCALE[e]
    return np.float32(-v if h & 0x8000 else v)


def _f2h(x):
    v = np.float64(x)
    if math.isnan(v):
        return np.uint16(0x7E00)
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a >= _OVERFLOW:
        return np.uint16(sign | 0x7C00)
    if a < _MIN_NORMAL:  # subnormal (1024 units round up to the smallest normal: bits 0x400)
        return np.uint16(sign | np.int64(np.rint(a / _SUBNORMAL)))
    f, e = math.frexp(a)  # a = f * 2**e, 0.5 <= f < 1
    m = np.int64(np.rint((2.0 * f - 1.0) * 1024.0))
    e = e - 1 + 15
    if m == 1024:
        m = 0
        e += 1
    return np.uint16(sign | (e << 10) | m)


@functools.cache
def h2f():
    """The jitted float16-bits -> float32 conversion."""
    import numba

    return numba.njit(nogil=True)(_h2f)


@functools.cache
def f2h():
    """The jitted float -> float16-bits conversion (round to nearest even)."""
    import numba

    return numba.njit(nogil=True)(_f2h)
