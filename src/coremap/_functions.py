"""Functions sent to other processes: one name (a digest) and one cache of them.

    parent:  func ──cloudpickle──> bytes ──digest()──> key      (once per call)
    worker:  FunctionCache.load(bytes, key) ──> the same function object per key

A function is pickled once by the parent and named by a digest of its bytes; the
receiving side (a cluster engine today; the process engine's and the Pool's
workers keep their own dicts for now) unpickles it once per name and hands out
the same object afterwards. That matters beyond the unpickling cost: Numba's
caches are keyed by the function object, so a fresh object per chunk would
compile again.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

__all__ = ["digest", "FunctionCache"]


def digest(func_bytes: bytes) -> str:
    """The name of a pickled function: 128 bits of BLAKE2b over its bytes."""
    return hashlib.blake2b(func_bytes, digest_size=16).hexdigest()


class FunctionCache:
    """Unpickled functions by digest; the ``size`` most recently used are kept."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._funcs: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, func_bytes: bytes, key: str | None = None):
        """The function pickled in ``func_bytes`` (named ``key``), unpickled once."""
        key = key or digest(func_bytes)
        with self._lock:
            func = self._funcs.get(key)
            if func is not None:
                self._funcs.move_to_end(key)
                return func
        import cloudpickle

        func = cloudpickle.loads(func_bytes)
        with self._lock:
            func = self._funcs.setdefault(key, func)
            while len(self._funcs) > self.size:
                self._funcs.popitem(last=False)
        return func

    def __len__(self) -> int:
        return len(self._funcs)
