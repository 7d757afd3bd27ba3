"""``coremap info``: what a user (or a bug report) needs to know about this install."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys

from coremap import _config


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict:
    """The facts as a dict (``coremap info`` prints them)."""
    import coremap

    facts: dict = {
        "coremap": coremap.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "usable cores": _config.usable_cores(),
        "machine cores": os.cpu_count(),
        "default workers": _config.default_workers(),
        "default backend": _config.default_backend(),
    }
    try:
        from coremap._kernels import _builtin, _runner  # noqa: F401

        facts["compiled extension"] = "loaded"
    except ImportError as exc:  # pragma: no cover - a broken install
        facts["compiled extension"] = f"NOT loaded: {exc}"
    facts["numpy"] = _version("numpy")
    facts["numba"] = _version("numba")
    try:
        import numba

        layer = getattr(numba.config, "THREADING_LAYER", "unknown")
        facts["numba threading layer"] = (
            f"{layer} (not used: coremap kernels are parallel=False)"
        )
    except ImportError:
        facts["numba threading layer"] = "numba not installed"
    from coremap import engines as registry

    engines = list(registry.names())  # every registered engine, and the installed clusters
    engines += [f"{'dask.distributed' if module == 'distributed' else module} (cluster)"
                for module in registry.CLUSTER_ADAPTERS if _version(module)]
    facts["engines"] = ", ".join(engines)
    facts["worker processes"] = "fresh interpreters (subprocess), never forked"
    if os.path.isdir("/dev/shm"):
        usage = shutil.disk_usage("/dev/shm")
        facts["/dev/shm"] = f"{usage.total / 2**30:.1f} GiB, {usage.free / 2**30:.1f} GiB free"
    else:
        facts["/dev/shm"] = "absent"
    from coremap._kernels import _diskcache

    facts["kernel cache"] = _diskcache.describe()
    for name in ("ipyparallel", "dask", "distributed"):
        facts[name] = _version(name) or "not installed"
    for name in ("numexpr", "joblib", "threadpoolctl", "tqdm", "cloudpickle"):
        facts[name] = _version(name) or "not installed"
    return facts


def show(file=None) -> None:
    file = file or sys.stdout
    facts = collect()
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key:<{width}} : {value}", file=file)
    if importlib.util.find_spec("coremap._kernels._runner") is None:  # pragma: no cover
        print("the compiled extension is missing: reinstall with `pip install .`", file=file)
