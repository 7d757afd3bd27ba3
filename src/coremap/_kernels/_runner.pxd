from libc.stdint cimport int64_t

# The one calling convention of every element-wise kernel, compiled (Cython)
# or JIT-compiled (a Numba cfunc):
#   ptrs[k]  lowest address touched by operand k (inputs first, output last)
#   meta[0]  length of a row of the collapsed 2-D iteration space
#   meta[1 + 3k : 4 + 3k]  operand k's offset, row stride, column stride (elements)
#   [lo, hi) flat element range to compute
# Returns 1 on success and 0 when the element function raised.
ctypedef int64_t (*kernel_t)(void **ptrs, int64_t *meta, int64_t lo, int64_t hi) noexcept nogil
