# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Built-in element-wise kernels, compiled at install.

Each kernel follows the calling convention of ``_runner.pxd`` and is handed to
the runner as a C function pointer, so it runs with no GIL and no Python call
per chunk. Operands: ``x``, then the scalars (stride 0), then the output.
"""
from libc.stdint cimport int32_t, int64_t, intptr_t

from coremap._kernels._runner cimport kernel_t

ctypedef fused real_t:
    float
    double
    int32_t
    int64_t


cdef int64_t affine(real_t *x, void **ptrs, int64_t *meta, int64_t lo, int64_t hi) noexcept nogil:
    # out = a * x + b, a and b read once (operands 1 and 2 are scalars)
    cdef real_t *xp = <real_t *>ptrs[0]
    cdef real_t a = (<real_t *>ptrs[1])[meta[4]]
    cdef real_t b = (<real_t *>ptrs[2])[meta[7]]
    cdef real_t *op = <real_t *>ptrs[3]
    cdef int64_t C = meta[0]
    cdef int64_t xo = meta[1], xr = meta[2], xc = meta[3]
    cdef int64_t oo = meta[10], orow = meta[11], oc = meta[12]
    cdef int64_t r = lo // C
    cdef int64_t c0 = lo - r * C
    cdef int64_t i = lo, c, cend
    cdef real_t *xb
    cdef real_t *ob
    while i < hi:
        cend = C if C < c0 + (hi - i) else c0 + (hi - i)
        xb = xp + xo + r * xr
        ob = op + oo + r * orow
        if xc == 1 and oc == 1:
            for c in range(c0, cend):      # contiguous: the C compiler vectorizes this
                ob[c] = a * xb[c] + b
        else:
            for c in range(c0, cend):
                ob[c * oc] = a * xb[c * xc] + b
        i += cend - c0
        r += 1
        c0 = 0
    return 1


cdef int64_t affine_f32(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<float *>NULL, p, m, lo, hi)

cdef int64_t affine_f64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<double *>NULL, p, m, lo, hi)

cdef int64_t affine_i32(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int32_t *>NULL, p, m, lo, hi)

cdef int64_t affine_i64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int64_t *>NULL, p, m, lo, hi)


def affine_address(str dtype_char):
    """Address of the ``a * x + b`` kernel for one dtype (``numpy.dtype.char``)."""
    cdef kernel_t k
    if dtype_char == "f":
        k = affine_f32
    elif dtype_char == "d":
        k = affine_f64
    elif dtype_char == "i":
        k = affine_i32
    elif dtype_char == "l" or dtype_char == "q":
        k = affine_i64
    else:
        raise TypeError(f"no built-in affine kernel for dtype char {dtype_char!r}")
    return <intptr_t>k


AFFINE_DTYPES = ("float32", "float64", "int32", "int64")
