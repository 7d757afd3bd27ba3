# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Built-in element-wise kernels, compiled at install.

Each kernel follows the calling convention of ``_runner.pxd`` and is handed to
the runner as a C function pointer, so it runs with no GIL and no Python call
per chunk. Operands are read by name (an ``enum`` per kernel, in the order the
planner passes them: inputs, then the kernel's scalar parameters as stride-0
operands, then the output), through ``operand()``, never by a raw ``meta``
index. A kernel is compiled for every numeric dtype NumPy computes in natively
(fused types); ``kernels.py`` describes each kernel to the planner (its inputs,
result dtype, these addresses, and a scalar fallback for worker processes).
"""
from libc.stdint cimport (int8_t, int16_t, int32_t, int64_t, intptr_t, uint8_t, uint16_t,
                          uint32_t, uint64_t)

from coremap._kernels._runner cimport kernel_t

ctypedef fused number_t:
    int8_t
    int16_t
    int32_t
    int64_t
    uint8_t
    uint16_t
    uint32_t
    uint64_t
    float
    double
    float complex
    double complex


cdef struct operand_t:
    char *base       # the operand's data
    int64_t offset   # its first element, in elements from base
    int64_t row      # row stride, in elements
    int64_t col      # column stride, in elements (0 for a scalar)


cdef inline operand_t operand(void **ptrs, int64_t *meta, int k) noexcept nogil:
    """Operand ``k``: meta holds the column count, then (offset, row, col) per operand."""
    cdef operand_t o
    o.base = <char *>ptrs[k]
    o.offset = meta[1 + 3 * k]
    o.row = meta[2 + 3 * k]
    o.col = meta[3 + 3 * k]
    return o


cdef enum:  # affine's operands
    AFFINE_X = 0
    AFFINE_A = 1
    AFFINE_B = 2
    AFFINE_OUT = 3


cdef int64_t affine(number_t *kind, void **ptrs, int64_t *meta, int64_t lo,
                    int64_t hi) noexcept nogil:
    # out = a * x + b, a and b read once (scalar operands)
    cdef operand_t x = operand(ptrs, meta, AFFINE_X)
    cdef operand_t ao = operand(ptrs, meta, AFFINE_A)
    cdef operand_t bo = operand(ptrs, meta, AFFINE_B)
    cdef operand_t o = operand(ptrs, meta, AFFINE_OUT)
    cdef number_t a = (<number_t *>ao.base)[ao.offset]
    cdef number_t b = (<number_t *>bo.base)[bo.offset]
    cdef number_t *xp = <number_t *>x.base
    cdef number_t *op = <number_t *>o.base
    cdef int64_t C = meta[0]
    cdef int64_t r = lo // C
    cdef int64_t c0 = lo - r * C
    cdef int64_t i = lo, c, cend
    cdef number_t *xb
    cdef number_t *ob
    while i < hi:
        cend = C if C < c0 + (hi - i) else c0 + (hi - i)
        xb = xp + x.offset + r * x.row
        ob = op + o.offset + r * o.row
        if x.col == 1 and o.col == 1:
            for c in range(c0, cend):      # contiguous: the C compiler vectorizes this
                ob[c] = a * xb[c] + b
        else:
            for c in range(c0, cend):
                ob[c * o.col] = a * xb[c * x.col] + b
        i += cend - c0
        r += 1
        c0 = 0
    return 1


cdef int64_t affine_i8(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int8_t *>NULL, p, m, lo, hi)

cdef int64_t affine_i16(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int16_t *>NULL, p, m, lo, hi)

cdef int64_t affine_i32(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int32_t *>NULL, p, m, lo, hi)

cdef int64_t affine_i64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<int64_t *>NULL, p, m, lo, hi)

cdef int64_t affine_u8(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<uint8_t *>NULL, p, m, lo, hi)

cdef int64_t affine_u16(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<uint16_t *>NULL, p, m, lo, hi)

cdef int64_t affine_u32(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<uint32_t *>NULL, p, m, lo, hi)

cdef int64_t affine_u64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<uint64_t *>NULL, p, m, lo, hi)

cdef int64_t affine_f32(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<float *>NULL, p, m, lo, hi)

cdef int64_t affine_f64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<double *>NULL, p, m, lo, hi)

cdef int64_t affine_c64(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<float complex *>NULL, p, m, lo, hi)

cdef int64_t affine_c128(void **p, int64_t *m, int64_t lo, int64_t hi) noexcept nogil:
    return affine(<double complex *>NULL, p, m, lo, hi)


cdef dict _AFFINE = {}


cdef _fill():
    _AFFINE['b'] = <intptr_t>affine_i8
    _AFFINE['h'] = <intptr_t>affine_i16
    _AFFINE['i'] = <intptr_t>affine_i32
    _AFFINE['l'] = <intptr_t>affine_i64
    _AFFINE['q'] = <intptr_t>affine_i64
    _AFFINE['B'] = <intptr_t>affine_u8
    _AFFINE['H'] = <intptr_t>affine_u16
    _AFFINE['I'] = <intptr_t>affine_u32
    _AFFINE['L'] = <intptr_t>affine_u64
    _AFFINE['Q'] = <intptr_t>affine_u64
    _AFFINE['f'] = <intptr_t>affine_f32
    _AFFINE['d'] = <intptr_t>affine_f64
    _AFFINE['F'] = <intptr_t>affine_c64
    _AFFINE['D'] = <intptr_t>affine_c128


_fill()


def affine_address(str dtype_char):
    """Address of the ``a * x + b`` kernel for one dtype (``numpy.dtype.char``)."""
    try:
        return _AFFINE[dtype_char]
    except KeyError:
        raise TypeError(f"no built-in affine kernel for dtype char {dtype_char!r}") from None


AFFINE_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float32", "float64", "complex64", "complex128")
