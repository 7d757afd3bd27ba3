"""Functions sent to other processes: one name (a digest) and one cache of them.

    parent:  func ──cloudpickle──> bytes ──digest()──> key      (once per call)
    worker:  FunctionCache.load(bytes, key) ──> the same function object per key

A function is pickled once by the parent and named by a digest of its bytes
(the process engine's calls, the Pool's jobs, the cluster engines' chunks); the
receiving side (a process worker, a cluster engine) unpickles it once per name
and hands out the same object afterwards. That matters beyond the unpickling
cost: Numba's caches are keyed by the function object, so a fresh object per
chunk would compile again.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

__all__ = ["digest", "FunctionCache", "CACHE_BYTES"]


def func_name(func: object) -> str:
    """The name messages use for a function: its qualified name, else its repr."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


def digest(func_bytes: bytes) -> str:
    """The name of a pickled function: 128 bits of BLAKE2b over its bytes."""
    return hashlib.blake2b(func_bytes, digest_size=16).hexdigest()


# A bound on memory, not a tuned speed: a function pickled by value carries its
# globals and closure (arrays included), so its pickled size is about what the
# unpickled object holds. Small functions (a few KiB, the usual case) stay by the
# dozen; one that drags a large array along is kept alone, as the newest.
CACHE_BYTES = 64 << 20


class FunctionCache:
    """Unpickled functions by digest: the ``size`` most recently used, and fewer when
    their pickled bytes pass ``max_bytes`` (the newest is always kept)."""

    def __init__(self, size: int = 64, max_bytes: int = CACHE_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._funcs: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def load(self, func_bytes: bytes, key: str | None = None):
        """The function pickled in ``func_bytes`` (named ``key``), unpickled once."""
        key = key or digest(func_bytes)
        with self._lock:
            entry = self._funcs.get(key)
            if entry is not None:
                self._funcs.move_to_end(key)
                return entry[0]
        import cloudpickle

        func = cloudpickle.loads(func_bytes)
        with self._lock:
            entry = self._funcs.get(key)
            if entry is not None:  # another thread loaded it meanwhile: one object per key
                self._funcs.move_to_end(key)
                return entry[0]
            self._funcs[key] = (func, len(func_bytes))
            self._bytes += len(func_bytes)
            while len(self._funcs) > 1 and (len(self._funcs) > self.size
                                            or self._bytes > self.max_bytes):
                self._bytes -= self._funcs.popitem(last=False)[1][1]
        return func

    def __len__(self) -> int:
        return len(self._funcs)
