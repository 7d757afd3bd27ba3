"""Built-in element-wise kernels, compiled with Cython at install.

A built-in kernel runs with no GIL and no JIT compile, so it is ready on the
first call. Pass one as the function of :func:`coremap.parallel_map`.

Each kernel is a :class:`BuiltinKernel`: the planner asks it for its result
dtype (or a clear error, before any work), the engines for its extra operands
and the address of its compiled loop for that dtype (``_kernels/_builtin.pyx``),
and worker processes for a scalar version of it (compiled there by Numba).
Adding one: a fused-type loop in ``_builtin.pyx`` plus a subclass here.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["BuiltinKernel", "Affine", "affine"]


class BuiltinKernel:
    """The interface of a built-in kernel (see :class:`Affine`)."""

    __slots__ = ()
    #: the number of array inputs
    nin = 1

    def result_dtype(self, in_dtypes: tuple[np.dtype, ...]) -> np.dtype:
        """The result dtype for inputs of these dtypes; TypeError if unsupported."""
        raise NotImplementedError

    def operands(self, dtype: np.dtype) -> tuple[np.ndarray, ...]:
        """The kernel's parameters as 0-d arrays of ``dtype``, passed after the inputs."""
        return ()

    def address(self, dtype: np.dtype) -> int:
        """The address of the compiled chunk loop (a ``kernel_t``) for ``dtype``."""
        raise NotImplementedError

    def scalar(self, dtype: np.dtype):
        """The same map on one element, in ``dtype`` arithmetic (worker processes)."""
        raise NotImplementedError


# the result dtypes with a compiled a * x + b (_builtin.AFFINE_DTYPES): NumPy computes
# float16 through float32 with a rounding after each operation, which C cannot express
_AFFINE_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                            "uint64", "float32", "float64", "complex64", "complex128"})


class Affine(BuiltinKernel):
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

    def result_dtype(self, in_dtypes):
        """NumPy's promotion of the input dtype with Python scalars ``a`` and ``b``."""
        if len(in_dtypes) != 1:
            raise TypeError(f"affine takes one input, got {len(in_dtypes)}")
        dt = np.result_type(in_dtypes[0], self.a, self.b)
        if dt.name not in _AFFINE_DTYPES:
            raise TypeError(
                f"no built-in affine kernel for {dt} results (from {in_dtypes[0]} inputs); "
                "convert the input first, e.g. x.astype(np.float32)")
        for name, value in (("a", self.a), ("b", self.b)):
            if isinstance(value, numbers.Integral) and dt.kind in "iu":
                info = np.iinfo(dt)
                if not info.min <= value <= info.max:  # NumPy raises this for a * x too
                    raise OverflowError(f"affine coefficient {name}={value} is out of "
                                        f"bounds for the {dt} result")
        return dt

    def operands(self, dtype):
        return np.asarray(self.a, dtype), np.asarray(self.b, dtype)

    def address(self, dtype):
        from coremap._kernels import _builtin

        return _builtin.affine_address(np.dtype(dtype).char)

    def scalar(self, dtype):
        a, b = np.dtype(dtype).type(self.a), np.dtype(dtype).type(self.b)

        def affine(v):
            return a * v + b

        return affine


def affine(a: float = 1.0, b: float = 0.0) -> Affine:
    """Return the built-in kernel ``a * x + b`` (see :class:`Affine`)."""
    return Affine(a, b)
