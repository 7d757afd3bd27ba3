"""Cluster engines: ``parallel_map`` on an existing ipyparallel or dask.distributed cluster.

The adapters are registered in ``engines/__init__.py`` (``CLUSTER_ADAPTERS``), by
the client's module. Every adapter is an engine with the one method
(``_base.py``) and shares it::

    _Adapter.execute(call, hooks) ──> run_call
      ├─ the function cloudpickled once; the flat range cut into chunks
      ├─ each chunk's inputs sliced out in iteration order (_input_slicer)
      ├─ adapter.submit(hooks.run_chunk, chunk) on the cluster's scheduler
      │    (the first chunk alone first when its result tells the dtype)
      └─ results written into the output in order (_layout.prepare_operands),
         hooks.on_progress after each; out returned

coremap builds no cluster of its own. The flat index range is cut into chunks;
each chunk's inputs travel as contiguous NumPy buffers (both engines serialize
them without pickling elements), the engine's scheduler balances the chunks
(ipyparallel's load-balanced view, dask's scheduler), and each chunk runs
``parallel_map(..., backend="serial")`` on its engine: the same kernels as
locally (Numba functions compiled once per engine and cached there, built-in
Cython kernels, ufuncs, vectorized and plain Python functions). Results are
written into ``out`` in order.

Functions travel with cloudpickle, by value when their module cannot be
imported on the engines (``__main__``, a test module, a script's helper module),
so nothing but coremap needs installing there. Scalars travel inside each
task; an array input is sliced per chunk (a broadcast array is materialised per
chunk: not sent once per engine yet).

Loaded only when a cluster client is passed: ``import coremap`` imports
neither ipyparallel nor dask.
"""
from __future__ import annotations

import functools
import ipaddress
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from coremap._errors import CoremapWarning, WorkerCrashedError
from coremap._functions import digest
from coremap.engines._base import NO_HOOKS, Engine, Hooks, no_elements

CHUNKS_PER_ENGINE = 4

@functools.lru_cache(maxsize=1)
def _installed_packages() -> frozenset:
    import importlib.metadata

    return frozenset(importlib.metadata.packages_distributions())


def _importable_elsewhere(module) -> bool:
    """True for the standard library and installed distributions (coremap included,
    which the engines need anyway); False for scripts, notebooks and test modules."""
    if module is None or module.__name__ == "__main__":
        return False
    top = module.__name__.split(".")[0]
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return True
    return top in _installed_packages()


def pickle_function(func: object) -> bytes:
    """cloudpickle ``func``, by value when its module is not installed everywhere."""
    import cloudpickle

    module = sys.modules.get(getattr(func, "__module__", None) or "")
    by_value = module is not None and not _importable_elsewhere(module) \
        and module.__name__ != "__main__"
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(func)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


# -- adapters --------------------------------------------------------------------------

class _Adapter(Engine):
    """A cluster client as an engine: ``execute`` is the same for every cluster
    (``run_call``); an adapter says how many engine slots there are, how to submit a
    chunk and how to wait for its result."""

    name = "cluster"

    def execute(self, call: Any, hooks: Hooks = NO_HOOKS) -> np.ndarray:
        """Run ``call`` on the cluster (see ``run_call``)."""
        if not call.size:
            return no_elements(call)
        return run_call(self, call, hooks)

    def engines(self) -> int:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], args: tuple, retries: int) -> Any:
        """Send ``fn(*args)`` to the cluster (retried ``retries`` times): its future."""
        raise NotImplementedError

    def result(self, fut: Any, timeout: float | None) -> Any:
        """Wait for ``fut`` (``submit``'s) at most ``timeout`` seconds: its result."""
        raise NotImplementedError


class _IPyParallel(_Adapter):
    name = "ipyparallel"

    def __init__(self, backend: Any) -> None:
        import ipyparallel as ipp

        if isinstance(backend, ipp.Client):
            client, targets = backend, None
        else:  # a DirectView or LoadBalancedView
            client, targets = backend.client, backend.targets
        self.client = client
        # chunks always go through a load-balanced view over the same engines:
        # it balances them and re-runs failed ones (retries)
        self.view = client.load_balanced_view(targets=targets)

    def engines(self) -> int:
        targets = self.view.targets
        if targets is None:
            return max(1, len(self.client.ids))
        return max(1, len(targets) if isinstance(targets, (list, tuple)) else 1)

    def submit(self, fn: Callable[..., Any], args: tuple, retries: int) -> Any:
        with self.view.temp_flags(retries=retries):
            return self.view.apply_async(fn, *args)

    def result(self, fut: Any, timeout: float | None) -> Any:
        import time

        import ipyparallel as ipp

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # wait in slices: a cluster with no engine left would never answer
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                try:
                    return fut.get(timeout=max(left, 0.0))
                except ipp.error.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"a chunk did not finish within {timeout} s") from None
                    if not self.client.ids:
                        raise WorkerCrashedError(
                            "every ipyparallel engine has gone: the chunk cannot run") from None
        except ipp.error.EngineError as exc:
            raise WorkerCrashedError(f"an ipyparallel engine died while running a chunk: "
                                     f"{exc}") from exc
        except ipp.error.RemoteError as exc:
            if exc.ename == "EngineError":  # the hub reports a dead engine this way
                raise WorkerCrashedError(f"an ipyparallel engine died while running a "
                                         f"chunk: {exc.evalue}") from exc
            raise _reraise_remote(exc.ename, exc.evalue, exc.traceback, exc) from None


class _Dask(_Adapter):
    name = "dask.distributed"

    def __init__(self, client: Any) -> None:
        self.client = client
        _check_dask_security(client)

    def engines(self) -> int:
        info = self.client.scheduler_info()
        return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))

    def submit(self, fn: Callable[..., Any], args: tuple, retries: int) -> Any:
        return self.client.submit(fn, *args, retries=retries, pure=False)

    def result(self, fut: Any, timeout: float | None) -> Any:
        from distributed import KilledWorker

        try:
            return fut.result(timeout=timeout)
        except KilledWorker as exc:
            raise WorkerCrashedError(f"a dask worker died while running a chunk: {exc}") \
                from exc
        except TimeoutError:
            raise TimeoutError(f"a chunk did not finish within {timeout} s") from None


def _reraise_remote(ename, evalue, tb, original):
    """The remote exception as its own builtin type where possible, traceback as cause."""
    import builtins

    from coremap._errors import RemoteError

    cls = getattr(builtins, ename or "", None)
    try:
        exc = cls(evalue) if isinstance(cls, type) and issubclass(cls, Exception) else None
    except Exception:
        exc = None
    if exc is None:
        exc = RemoteError(ename, evalue, "\n".join(tb) if isinstance(tb, list) else str(tb))
    exc.__cause__ = original
    return exc


def _check_dask_security(client) -> None:
    address = getattr(client.scheduler, "address", "") or ""
    if address.startswith("tls://") or address.startswith("inproc://"):
        return
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        warnings.warn(
            f"the dask scheduler at {address} is neither on loopback nor TLS: functions and "
            "data travel unencrypted and unauthenticated; use a tls:// scheduler",
            CoremapWarning, stacklevel=4,
        )


# -- running a call ------------------------------------------------------------------------

def _chunks(n: int, engines: int) -> list[tuple[int, int]]:
    count = max(1, min(n, engines * CHUNKS_PER_ENGINE))
    bounds = np.linspace(0, n, count + 1).astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _input_slicer(call):
    """``chunk_args(lo, hi)``: each input's elements ``[lo, hi)`` in iteration order, as
    contiguous buffers (scalars as given)."""
    from coremap import _layout

    # inputs as (R x C) grids: a chunk's elements are a few row blocks
    def it(a):
        return _layout.iteration_view(a, call.shape, call.order)

    views = [it(_layout.native(i.array)) for i in call.inputs]
    dummy = it(np.empty(call.shape, np.int8, order=call.order))
    space, _ = _layout.space_copying([*views, dummy])

    def chunk_args(lo, hi):
        args = []
        for k, inp in enumerate(call.inputs):
            if inp.is_scalar:
                args.append(inp.value)
                continue
            g = space.grid(k)
            parts = [g[r0:r1, c0:c1].reshape(-1) for r0, r1, c0, c1 in space.segments(lo, hi)]
            args.append(np.ascontiguousarray(parts[0] if len(parts) == 1
                                             else np.concatenate(parts)))
        return args

    return chunk_args


def run_call(adapter: _Adapter, call: Any, hooks: Hooks) -> np.ndarray:
    """Run ``call`` on a cluster: chunks out, results into ``out`` in order.

    ``hooks.run_chunk(func_bytes, key, kind, args, out_dtype)`` is what each engine runs
    on a chunk (the planner passes its own: an engine never imports the front end).
    """
    from coremap import _layout

    run_chunk = hooks.run_chunk
    if run_chunk is None:
        raise TypeError("a cluster engine needs hooks.run_chunk, the function its chunks run")
    func_bytes = pickle_function(call.func)
    key = digest(func_bytes)  # engines unpickle each function once per key
    chunks = _chunks(call.size, adapter.engines())
    chunk_args = _input_slicer(call)

    def submit(lo: int, hi: int, dtype: np.dtype | None) -> Any:
        return adapter.submit(run_chunk, (func_bytes, key, call.kind,
                                                chunk_args(lo, hi), dtype), call.retries)

    first = None
    if call.out_dtype is None:  # learn the dtype from the first chunk's result
        first = np.asarray(adapter.result(submit(*chunks[0], None), call.timeout))
        call.out_dtype = first.dtype
    futures = [submit(lo, hi, call.out_dtype)
               for lo, hi in (chunks[1:] if first is not None else chunks)]
    ops = _layout.prepare_operands(call, inputs=False)
    grid = ops.space.grid(0)
    results = ([first] if first is not None else []) + futures
    done = 0
    try:
        for (lo, hi), item in zip(chunks, results):
            res = item if isinstance(item, np.ndarray) else adapter.result(item, call.timeout)
            res = np.asarray(res).reshape(-1)
            pos = 0
            for r0, r1, c0, c1 in ops.space.segments(lo, hi):
                block = grid[r0:r1, c0:c1]
                np.copyto(block, res[pos:pos + block.size].reshape(block.shape),
                          casting="same_kind")
                pos += block.size
            done += hi - lo
            if hooks.on_progress is not None:
                hooks.on_progress(done)
    except BaseException:
        for item in results:
            cancel = getattr(item, "cancel", None)
            if cancel is not None:
                try:
                    cancel()
                except Exception:
                    pass
        raise
    return ops.result()
