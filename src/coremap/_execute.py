"""Run a planned call: choose its engine, show progress, hand it the call.

    Call (_plan.plan_call)
      ├─ no elements: its dtype learnt if needed, an empty output, no engine
      ├─ engine: the call's cluster adapter, or the registry's (engines.get_engine)
      ├─ progress bar (tqdm), fed by hooks.on_progress
      └─ engine.execute(call, Hooks(on_progress, observed, run_cluster_chunk))
           ──> the output array, or the call's first error (engines/_base.py)

Every engine prepares its operands with ``_layout.prepare_operands`` and reports
errors the same way: a native kernel's failed chunk is re-run element by element
through the jitted function to raise the real exception with the element's
index; a Python chunk function's exception is kept with its chunk; the other
chunks are cancelled and the first error is raised with its own type.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import DTypeLike

from coremap._functions import FunctionCache
from coremap._insights import observed
from coremap.engines import get_engine
from coremap.engines._base import Engine, Hooks, no_elements

if TYPE_CHECKING:
    from coremap._plan import Call

__all__ = ["execute", "run_cluster_chunk"]


def execute(call: Call, progress: bool = False) -> np.ndarray:
    """Run a call (a ``_plan.Call``, from ``plan_call``) and return the output array."""
    if not call.size:
        return no_elements(call)
    # Call.adapter is a cluster adapter (an Engine) or None; _plan types it loosely
    engine = get_engine(call.engine) if call.adapter is None else cast(Engine, call.adapter)
    on_progress, bar = _progress_bar(call, progress)
    try:
        return engine.execute(call, Hooks(on_progress, observed, run_cluster_chunk))
    finally:
        if bar is not None:
            bar.close()


# On a cluster engine: the functions its chunks run, unpickled once per digest.
_CLUSTER_FUNCS = FunctionCache()


def run_cluster_chunk(func_bytes: bytes, key: str, kind: str, args: list,
                      out_dtype: DTypeLike) -> np.ndarray:
    """Runs on a cluster engine: one chunk through the serial engine."""
    from coremap._plan import plan_call

    func = _CLUSTER_FUNCS.load(func_bytes, key)
    arrays = tuple(args) if len(args) > 1 else args[0]
    return execute(plan_call(arrays, func, vectorized=kind == "vectorized", dtype=out_dtype,
                             backend="serial"))


def _progress_bar(
    call: Call, progress: bool
) -> tuple[Callable[[int], None] | None, Any]:
    """``(on_progress, bar)``: a tqdm bar fed with ``job.done``, or ``(None, None)``."""
    bar = None
    on_progress = None
    if progress:
        from tqdm.auto import tqdm

        class _Bar(tqdm):
            monitor_interval = 0  # the engine updates the bar itself: no monitor thread

        bar = _Bar(total=call.size, unit="el", unit_scale=True, file=sys.stderr,
                   desc=call.func_name)

        def on_progress(done: int) -> None:
            bar.update(done - bar.n)

    return on_progress, bar
