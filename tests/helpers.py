"""Reference implementations the tests compare against."""
from __future__ import annotations

import numpy as np


def serial_reference(func, arrays, dtype=None):
    """``func`` applied element by element in a plain Python loop (the definition)."""
    items = arrays if isinstance(arrays, tuple) else (arrays,)
    arrs = [np.asarray(a) for a in items]
    shape = np.broadcast_shapes(*(a.shape for a in arrs))
    cols = [np.broadcast_to(a, shape).ravel() for a in arrs]
    values = [func(*args) for args in zip(*cols)]
    return np.array(values, dtype=dtype).reshape(shape)


def jitted(func, arrays):
    """The Numba-compiled scalar function coremap uses for these inputs' dtypes."""
    from coremap._kernels import _numba

    items = arrays if isinstance(arrays, tuple) else (arrays,)
    dtypes = tuple(np.asarray(a).dtype.newbyteorder("=") for a in items)
    return _numba.resolve(func, dtypes)


def same_bits(a, b) -> bool:
    """Equal shape, dtype and bytes (NaN payloads and -0.0 included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
