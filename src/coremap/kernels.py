"""Built-in element-wise kernels, compiled with Cython at install.

A built-in kernel runs with no GIL and no JIT compile, so it is ready on the
first call. Pass one as the function of :func:`coremap.parallel_map`.
"""
from __future__ import annotations

import numbers

__all__ = ["Affine", "affine"]


class Affine:
    """The affine map ``a * x + b``, element by element.

    Parameters
    ----------
    a, b : int or float
        The coefficients. The result dtype follows NumPy's promotion of
        ``x.dtype`` with Python scalars ``a`` and ``b`` (float32 stays float32).

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> cm.parallel_map(np.arange(3.0), cm.kernels.affine(2.0, 1.0))
    array([1., 3., 5.])
    """

    __slots__ = ("a", "b")

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        for name, value in (("a", a), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
                raise TypeError(f"affine coefficient {name} must be a real number, got {value!r}")
        self.a = a
        self.b = b

    def __call__(self, x):
        """The same map on a scalar or an array, in the calling thread (the reference)."""
        return self.a * x + self.b

    def __repr__(self) -> str:
        return f"affine({self.a!r}, {self.b!r})"


def affine(a: float = 1.0, b: float = 0.0) -> Affine:
    """Return the built-in kernel ``a * x + b`` (see :class:`Affine`)."""
    return Affine(a, b)
