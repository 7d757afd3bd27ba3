"""coremap: element-wise work over NumPy arrays on every core.

>>> import numpy as np, coremap as cm
>>> y = cm.parallel_map(np.arange(4.0), lambda v: v * v)

See :func:`parallel_map`, :func:`parallel_reduce`, :func:`explain` and :func:`config`.
"""
# The one place the version is written; the build reads it from here.
__version__ = "0.1.0"

import os as _os

if _os.name != "posix":  # before anything else: the engines need POSIX shared memory
    raise ImportError(
        f"coremap supports POSIX systems (Linux; macOS untested), not os.name={_os.name!r}: "
        "its worker processes and shared arrays use POSIX shared memory (shm_open). "
        "On Windows, run it under WSL."
    )

from coremap import kernels
from coremap._api import CoremapWarning, explain, parallel_map
from coremap._config import config
from coremap._errors import RemoteError, WorkerCrashedError
from coremap._insights import Insights
from coremap._kernels._diskcache import clear_cache
from coremap._plan import Plan
from coremap._reduce import parallel_reduce
from coremap.pool import Pool
from coremap.shared import SharedArray, SharedLock, cleanup_stale


def __getattr__(name):
    # coremap.cluster is imported on first use: `import coremap` stays light and
    # never imports ipyparallel or dask
    if name == "cluster":
        import importlib

        return importlib.import_module("coremap.cluster")
    raise AttributeError(f"module 'coremap' has no attribute {name!r}")

__all__ = [
    "parallel_map",
    "parallel_reduce",
    "explain",
    "config",
    "kernels",
    "Plan",
    "Insights",
    "CoremapWarning",
    "WorkerCrashedError",
    "RemoteError",
    "Pool",
    "SharedArray",
    "SharedLock",
    "cleanup_stale",
    "clear_cache",
    "__version__",
]
