# Stub for the compiled chunk runner (_runner.pyx). C types in comments.
from collections.abc import Callable
from threading import Event

import numpy as np

SCHEDULES: dict[str, int]
POOL_MAX: int  # most native pool workers (CM_POOL_MAX)
STATE_BYTES: int  # sizeof(JobState): the shared part of a Job

class Job:
    n: int  # int64_t
    workers: int  # int64_t
    schedule: int  # int: 0 static, 1 dynamic, 2 guided
    chunk: int  # int64_t
    max_chunk: int  # int64_t
    target_ns: int  # int64_t
    escalate_ns: int  # int64_t
    floor_ns: int  # int64_t
    event: Event | None
    on_escalate: Callable[[], None] | None
    monitor: Callable[[], None] | None  # called by the caller between pieces/chunks
    def __init__(
        self,
        n: int,
        workers: int,
        schedule: str = ...,
        chunk: int = ...,
        max_chunk: int = ...,
        target_ns: int = ...,
        first_chunk: int = ...,
        escalate_ns: int = ...,
        state: int = ...,  # JobState* in shared memory, or 0 for the Job's own
        init: bool = ...,
        state_owner: object = ...,
        floor_ns: int = ...,
    ) -> None: ...
    def set_slot(self, address: int) -> None: ...  # int64_t[2]
    def arm_escalation(self, callback: Callable[[], None] | None) -> None: ...
    @property
    def ns_per_element(self) -> float: ...  # double
    @property
    def helped(self) -> int: ...  # elements computed by native pool workers
    # address: kernel_t; ptrs: void*[]; meta: int64_t[]
    def set_kernel(
        self, address: int, ptrs: list[int], meta: list[int], keepalive: object
    ) -> None: ...
    def enter(self) -> bool: ...
    def leave(self) -> None: ...
    def claim(self) -> tuple[int, int] | None: ...
    def complete(self, lo: int, hi: int, ns: int = ...) -> None: ...
    def fail(self, lo: int, hi: int) -> None: ...
    def cancel(self) -> None: ...
    @property
    def done(self) -> int: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def active(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def failed_chunk(self) -> tuple[int, int] | None: ...
    def run_native(
        self, check_signals: bool = ..., helpers: int = ..., poll_ns: int = ...,
        home_blocks: bool = ...,
    ) -> None: ...

class Prepared:
    # address: kernel_t; meta: int64_t[]; operands: inputs, parameters and output
    def __init__(
        self, template: Job, address: int, meta: list[int], operands: int,
        dtype: np.dtype, shape: tuple[int, ...],
    ) -> None: ...
    # 1 ok, 0 the element function raised, None: out or an array does not fit
    def run_inline(self, arrays: tuple, out: object) -> int | None: ...
    def run(
        self, arrays: tuple, out: object, check_signals: bool = ..., helpers: int = ...,
        poll_ns: int = ..., home_blocks: bool = ...,
    ) -> Job | None: ...

# the native pool (_pool.h)
def pool_size() -> int: ...
def pool_wake_ns(last: bool = ...) -> int: ...  # post -> first helper inside
def pool_ensure(n: int) -> int: ...
def pool_shutdown() -> None: ...
def in_kernel() -> bool: ...  # this thread runs a kernel through the runner
def escalate_threshold_ns() -> int: ...  # work left above which helpers are posted

# returns the kernel's int64_t status: 1 ok, 0 the element function raised
def run_inline(address: int, ptrs: list[int], meta: list[int], lo: int, hi: int) -> int: ...

# data addresses (intptr_t) of C-contiguous ndarrays; None if one is unaligned
def data_pointers(arrays: tuple) -> list[int] | None: ...

# a process-shared lock on the int64_t word at `address` (SharedArray.lock)
def lock_acquire(
    address: int, token: int, timeout: float = ..., check_signals: bool = ...
) -> bool: ...
def lock_release(address: int, token: int) -> None: ...
def lock_holder(address: int) -> int: ...
