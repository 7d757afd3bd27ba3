"""Type aliases of the public API (for annotations only; nothing here runs work).

``parallel_map``, ``explain`` and ``config`` take a backend name or a cluster
client. The client types are described structurally (``Protocol``), so
annotating them needs neither ipyparallel nor dask installed, and a misspelt
backend name is still a type error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, TypedDict

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["BackendName", "Backend", "ClusterClient", "Schedule", "MapOptions", "ReduceOp"]

BackendName = Literal["auto", "threads", "processes", "serial"]
Schedule = Literal["guided", "dynamic", "static"]
ReduceOpName = Literal["sum", "prod", "min", "max", "any", "all", "mean", "argmin", "argmax"]


class _IPyParallelClient(Protocol):
    """An ``ipyparallel.Client``."""

    def load_balanced_view(self, *args: Any, **kwargs: Any) -> Any: ...


class _IPyParallelView(Protocol):
    """An ipyparallel ``DirectView`` or ``LoadBalancedView``."""

    def apply_async(self, *args: Any, **kwargs: Any) -> Any: ...


class _DaskClient(Protocol):
    """A ``dask.distributed.Client``."""

    def submit(self, *args: Any, **kwargs: Any) -> Any: ...

    def scheduler_info(self, *args: Any, **kwargs: Any) -> Any: ...


ClusterClient = _IPyParallelClient | _IPyParallelView | _DaskClient
Backend = BackendName | ClusterClient
KernelFunc = Callable[..., Any]
ReduceOp = ReduceOpName | np.ufunc


class MapOptions(TypedDict, total=False):
    """The keyword arguments ``explain`` takes (those of ``parallel_map``)."""

    out: Any
    dtype: DTypeLike | None
    vectorized: bool
    backend: Backend | None
    workers: int | None
    chunk_size: int | None
    schedule: Schedule
    progress: bool
    timeout: float | None
    retries: int
