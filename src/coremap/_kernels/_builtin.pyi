# Stub for the compiled built-in kernels (_builtin.pyx).
# Every kernel is a kernel_t: int64_t (*)(void **ptrs, int64_t *meta, int64_t lo, int64_t hi)
# Operands are read by name through operand(ptrs, meta, k) (an enum per kernel).

# the dtypes with a compiled a * x + b: every numeric dtype but bool and float16
AFFINE_DTYPES: tuple[str, ...]

# returns the kernel_t address (intptr_t) of a * x + b for one dtype char
def affine_address(dtype_char: str) -> int: ...
