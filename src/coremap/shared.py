"""``SharedArray``: a NumPy array whose buffer lives in shared memory.

It pickles by *name*, never by content: a process that unpickles one (a
``multiprocessing.Process`` argument, a ``Pool`` task, a process-engine worker)
maps the same segment, zero copy, and its writes are seen by everyone. Slices
and views pickle as views of the same segment (offset, shape, strides). An
array that does not live in a segment (a ufunc result, a copy) is a plain
``ndarray`` and pickles by content as usual.

Lifetime: the creating process owns the segment. Its name is removed at
``unlink()``, when the last array using it in the creator is garbage, or at
exit; mappings stay valid until their last array goes. See ``_shm.py``.

    _shm.Segment ──> _shm.SegmentArray (views keep the segment while inside it)
                       └─ SharedArray: + empty/zeros/from_array, lock, unlink,
                          pickling by name (_rebuild attaches the segment)

The engines work with ``_shm.SegmentArray`` (their pooled operands, and the
SharedArray operands they attach by name) and never import this front end.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from coremap import _shm
from coremap._kernels import _runner

__all__ = ["SharedArray", "SharedLock", "cleanup_stale"]

cleanup_stale = _shm.cleanup_stale


def _token() -> int:
    # Distinct for each thread of each process (a lock is not re-entrant).
    return (os.getpid() << 22) ^ (threading.get_ident() & 0x3FFFFF) or 1


class SharedLock:
    """A lock that lives in a segment's header: any process mapping it can take it.

    Behaves like ``multiprocessing.Lock`` (``acquire(block, timeout)``,
    ``release()``, a context manager) and pickles by the segment's name, so it
    travels with its array. Not re-entrant.
    """

    __slots__ = ("_segment",)

    def __init__(self, segment: _shm.Segment) -> None:
        self._segment = segment

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if not block:
            timeout = 0.0
        main = threading.current_thread() is threading.main_thread()
        return _runner.lock_acquire(self._segment.address, _token(),
                                    -1.0 if timeout is None else max(0.0, timeout), main)

    def release(self) -> None:
        _runner.lock_release(self._segment.address, _token())

    def locked(self) -> bool:
        return _runner.lock_holder(self._segment.address) != 0

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self):
        return _attach_lock, (self._segment.name,)

    def __repr__(self) -> str:
        return f"<SharedLock of {self._segment.name} {'locked' if self.locked() else 'unlocked'}>"


def _attach_lock(name: str) -> SharedLock:
    return SharedLock(_shm.Segment.attach(name))




def _rebuild(name, offset, shape, strides, dtype):
    seg = _shm.Segment.attach(name)
    arr = np.ndarray(shape, dtype, buffer=seg.mmap, offset=offset, strides=strides)
    out = arr.view(SharedArray)
    out._segment = seg
    return out


class SharedArray(_shm.SegmentArray):
    """An ndarray in shared memory, pickled by name (zero copy between processes).

    Create one with :meth:`empty`, :meth:`zeros` or :meth:`from_array`.

    Examples
    --------
    >>> import numpy as np, coremap as cm
    >>> a = cm.SharedArray.zeros((2, 3))
    >>> a[0] = 1.0
    >>> with a.lock:
    ...     a[1] += 2.0
    >>> float(a.sum())
    9.0
    >>> a.unlink()
    """

    _segment: _shm.Segment | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        shape: int | np.integer | Sequence[int],
        dtype: DTypeLike = float,
        order: _shm.Order = "C",
    ) -> SharedArray:
        """A new shared array (its memory is reserved and zero-filled by the OS)."""
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError("a SharedArray cannot hold Python objects (object dtype)")
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if any(int(s) < 0 for s in dims):
            raise ValueError(f"negative dimensions are not allowed: {dims}")
        seg = _shm.Segment.create(math.prod(dims) * dtype.itemsize)
        return _shm.array_in(seg, dims, dtype, order, cls)

    @classmethod
    def zeros(
        cls,
        shape: int | np.integer | Sequence[int],
        dtype: DTypeLike = float,
        order: _shm.Order = "C",
    ) -> SharedArray:
        """A new shared array of zeros (fresh segments are zero-filled: no write needed)."""
        return cls.empty(shape, dtype, order)

    @classmethod
    def from_array(cls, x: ArrayLike) -> SharedArray:
        """A shared copy of ``x`` (same shape and dtype; Fortran order kept)."""
        arr = np.asarray(x)
        order: _shm.Order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        out = cls.empty(arr.shape, arr.dtype, order)
        np.copyto(out, arr)
        return out

    # -- numpy subclass protocol ------------------------------------------------------
    # (__array_finalize__, which keeps the segment in views inside it: _shm.SegmentArray)
    def __array_wrap__(self, arr, context=None, return_scalar=False):
        if isinstance(arr, SharedArray) and arr._segment is None:
            arr = arr.view(np.ndarray)  # a result in private memory is a plain array
        if return_scalar:
            return arr[()]
        return arr

    def __reduce__(self):
        seg = self._segment
        if seg is None:
            return self.view(np.ndarray).__reduce__()
        offset = self.__array_interface__["data"][0] - seg.address
        return _rebuild, (seg.name, offset, self.shape, self.strides, self.dtype)

    # -- shared-memory API ----------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The segment's name (what a pickle carries), or None for a private copy."""
        return None if self._segment is None else self._segment.name

    @property
    def lock(self) -> SharedLock:
        """A process-safe lock that travels with the array (one per segment)."""
        if self._segment is None:
            raise ValueError("this array is not in shared memory (it has no lock)")
        return SharedLock(self._segment)

    def unlink(self) -> None:
        """Remove the segment's name (creator only; mappings stay valid)."""
        if self._segment is not None and self._segment.owner:
            self._segment.unlink()

    def close(self) -> None:
        """Stop using the segment from this array (its memory goes with the last view)."""
        seg, self._segment = self._segment, None
        if seg is not None:
            seg.close()

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlink()

