# Stub for the compiled chunk runner (_runner.pyx). C types in comments.
from collections.abc import Callable
from threading import Event

SCHEDULES: dict[str, int]
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
    def run_native(self, check_signals: bool = ...) -> None: ...

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
