# Stub for the compiled built-in kernels (_builtin.pyx).
# Every kernel is a kernel_t: int64_t (*)(void **ptrs, int64_t *meta, int64_t lo, int64_t hi)

AFFINE_DTYPES: tuple[str, ...]

# returns the kernel_t address (intptr_t) of a * x + b for float32/float64/int32/int64
def affine_address(dtype_char: str) -> int: ...
