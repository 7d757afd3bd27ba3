"""Compiled kernels cached on disk: a fresh process loads machine code instead of compiling.

    _numba._Compiled(f)  ──> attach(dispatcher, f): key(f), or None (then nothing changes)
    _numba._build, _reducers._build, _multi._kernel_address
                         ──> cfunc(sig, kernel, f's dispatcher, parts): the chunk kernel,
                              keyed by key(f), the generated source, dtypes, stride classes
    Numba's own cache machinery then loads or saves each compile result
    (``numba.core.caching``: an index file and one data file per signature), with
    a locator of ours: every file lives in ``<cache dir>/kernels/``, named by the key.

What the key covers (SHA-256), so that no stale kernel is ever reused:
* coremap's version and a hash of the sources that generate kernels (this
  package's ``_kernels/*.py``), Numba's, llvmlite's, NumPy's and Python's versions
  (Numba adds the CPU name and features);
* the function's code (bytecode, constants, names, nested code, defaults), not
  its file name or line numbers, so a re-run notebook cell (a new file name
  each time) or a function moved in its file finds its kernel again;
* every global and closure value the code reads, recursively: numbers, strings
  and tuples of them by value, functions (plain or ``@njit``) by their own code
  and globals, modules and classes of the standard library, NumPy and Numba by
  name; and the dtypes (Numba's signature).

Numba's own key hashes the bytecode only (its documentation: changes to globals
are not seen), so it is replaced here. Not cached (compiled in memory, as
before): a function that reads a global or closure ndarray (``_rebuild.py``
compiles its address into the machine code), a module or object of the user's
(whose code could change unseen), an ``@njit`` function of the user's (their
``cache=`` applies). A cache file that cannot be read or written is a miss,
never an error.

The directory follows the platform (``_config.cache_dir``), is moved with
``COREMAP_CACHE_DIR`` (``off`` disables the cache), shown by ``coremap info``
and emptied by ``coremap.clear_cache()``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import types
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numba.core.typing.templates import Signature

_KEY_ATTR = "__coremap_cache_key__"
_SAFE_MODULES = frozenset(("math", "cmath", "numpy", "numba", "operator", "builtins",
                           "_operator"))
_BY_VALUE = (bool, int, float, complex, str, bytes, np.generic, type(None))
# dispatcher -> key of the user's function it compiles (for the kernel's key)
_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def directory() -> str | None:
    """The kernel cache directory, or None when the cache is off."""
    from coremap import _config  # read lazily: the variable may change at run time

    root = _config.cache_dir()
    return None if root is None else os.path.join(root, "kernels")


@functools.cache
def _base() -> bytes:
    """What every key starts with: versions, and coremap's kernel-generating sources."""
    import importlib.metadata

    import llvmlite
    import numba

    h = hashlib.sha256()
    try:
        version = importlib.metadata.version("coremap")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        version = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + f.read())
    parts = (version, numba.__version__, llvmlite.__version__, np.__version__,
             sys.version, sys.platform)
    h.update(repr(parts).encode())
    return h.digest()


# -- the key -----------------------------------------------------------------------------

class _Uncachable(Exception):
    """A value the key cannot describe: the function is compiled in memory only."""


def key_of_function(func: types.FunctionType) -> str | None:
    """The key of ``func`` as compiled by ``_numba`` (see the docstring), or None."""
    h = hashlib.sha256(_base())
    try:
        _function(h, func, {})
    except (_Uncachable, RecursionError):
        return None
    return h.hexdigest()


def _function(h, func, seen: dict) -> None:
    if id(func) in seen:  # recursion between helpers: the name is enough the second time
        h.update(b"seen" + func.__qualname__.encode())
        return
    seen[id(func)] = func
    h.update(b"fn" + func.__qualname__.encode())
    _code(h, func.__code__)
    g = func.__globals__
    from coremap._kernels._rebuild import global_names

    for name in sorted(global_names(func.__code__)):
        h.update(b"g" + name.encode())
        if name in g:
            _value(h, g[name], seen)
        else:
            builtin = getattr(__builtins__, name, None) if not isinstance(
                __builtins__, dict) else __builtins__.get(name)
            h.update(repr(builtin).encode())
    for cell in func.__closure__ or ():
        try:
            _value(h, cell.cell_contents, seen)
        except ValueError:  # an empty cell: Numba will say so
            h.update(b"empty")
    _value(h, func.__defaults__, seen)
    _value(h, func.__kwdefaults__ and tuple(sorted(func.__kwdefaults__.items())), seen)


def _code(h, code: types.CodeType) -> None:
    # Not co_filename, co_firstlineno nor the line table: see the module docstring.
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                   code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(h, const)
        else:
            h.update(repr((type(const).__name__, const)).encode())


def _value(h, value, seen: dict) -> None:
    if isinstance(value, _BY_VALUE):
        h.update(repr((type(value).__name__, value)).encode())
    elif isinstance(value, tuple):
        h.update(b"(")
        for v in value:
            _value(h, v, seen)
        h.update(b")")
    elif isinstance(value, types.FunctionType):
        _function(h, value, seen)
    elif hasattr(value, "py_func") and type(value).__module__.startswith("numba"):
        h.update(repr(sorted(getattr(value, "targetoptions", {}).items())).encode())
        _function(h, value.py_func, seen)  # an @njit helper
    elif isinstance(value, types.ModuleType):
        _safe(h, value.__name__, value)
    elif isinstance(value, (type, types.BuiltinFunctionType, np.ufunc)):
        _safe(h, getattr(value, "__module__", None) or "builtins", value)
    elif isinstance(value, np.dtype):
        h.update(repr(value).encode())
    else:  # ndarrays (compiled by address), the user's objects: not described
        raise _Uncachable(type(value).__name__)


def _safe(h, module: str, value) -> None:
    if module.partition(".")[0] not in _SAFE_MODULES:
        raise _Uncachable(module)
    h.update(f"{module}:{getattr(value, '__qualname__', getattr(value, '__name__', ''))}"
             .encode())


# -- Numba's cache, with our locator and key ---------------------------------------------

@functools.cache
def _classes():
    """Numba's Cache classes, specialised (built on first use: Numba is imported lazily)."""
    from numba.core import caching

    class Locator(caching._CacheLocator):
        # path: directory(), or None if the cache was turned off since the caller
        # looked (Numba's Cache then fails to open and _enable compiles in memory)
        def __init__(self, path: str | None, key: str) -> None:
            self._path = path
            self._key = key

        def get_cache_path(self):
            return self._path

        def get_source_stamp(self):
            return self._key  # the key: any change is a new file anyway

        def get_disambiguator(self):
            return self._key[:32]

        @classmethod
        def from_function(cls, py_func, py_file):  # pragma: no cover - not used
            return None

    class Impl(caching.CompileResultCacheImpl):
        def __init__(self, py_func) -> None:  # Numba's looks for a locator; ours is given
            key = getattr(py_func, _KEY_ATTR)
            self._lineno = py_func.__code__.co_firstlineno
            self._locator = Locator(directory(), key)
            name = "".join(c if c.isalnum() or c in "._" else "_"
                           for c in py_func.__qualname__)[:60]
            abiflags = getattr(sys, "abiflags", "")
            self._filename_base = (f"{name}-{key[:32]}.py{sys.version_info[0]}"
                                   f"{sys.version_info[1]}{abiflags}")

        def check_cachable(self, cres):
            # Numba warns for what it cannot cache; here that is a silent miss.
            return not cres.library.has_dynamic_globals and all(
                x.can_cache for x in cres.lifted)

    class KeyedCache(caching.Cache):
        _impl_class = Impl

        def _index_key(self, sig, codegen):
            return (sig, codegen.magic_tuple(), getattr(self._py_func, _KEY_ATTR))

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception:  # noqa: BLE001 - unreadable, foreign or truncated: a miss
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception:  # noqa: BLE001 - read-only or full disk: compiled anyway
                pass

    return KeyedCache


def _enable(target, py_func, key: str, module: str | None = None) -> bool:
    try:
        setattr(py_func, _KEY_ATTR, key)
        if module is not None:
            # Numba's cached environment of a cfunc names the module of its globals
            # and imports it on load; a generated kernel's namespace has none. (Not
            # for the user's rebuilt functions: they travel to workers and cluster
            # engines, which may not be able to import the user's module.)
            py_func.__globals__.setdefault("__name__", module)
        target._cache = _classes()(py_func)
    except Exception:  # noqa: BLE001 - an unusable directory: compile in memory
        return False
    return True


def attach(dispatcher: Any, func: types.FunctionType) -> None:
    """Cache ``dispatcher`` (the rebuilt, jitted copy of ``func``) on disk, if ``func``
    can be keyed; otherwise leave it as it is."""
    if directory() is None:
        return
    key = key_of_function(func)
    if key is not None and _enable(dispatcher, dispatcher.py_func, key):
        _keys[dispatcher] = key


def cfunc(sig: Signature, kernel: types.FunctionType, jitted: object,
          parts: tuple[object, ...], **options: Any) -> Any:
    """``numba.cfunc(sig, **options)(kernel)``, loaded from or saved to the disk cache
    when the function ``jitted`` compiles has a key, or when there is no user
    function (``jitted=None``); ``parts``: everything else that shapes the kernel
    (its generated source and dtypes). Returns the compiled ``CFunc`` (typed Any:
    Numba infers its ``address`` as possibly None, which it is only before compiling)."""
    from numba import cfunc as numba_cfunc
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    if directory() is None:
        key = None
    elif jitted is None:  # no user function (a reduction of the inputs themselves)
        key = _base().hex()
    else:
        key = _keys.get(jitted)
    if key is None:
        return numba_cfunc(sig, **options)(kernel)
    h = hashlib.sha256(key.encode())
    h.update(repr((parts, sorted(options.items()))).encode())
    res = CFunc(kernel, sigutils.normalize_signature(sig), locals={}, options=options)
    _enable(res, kernel, h.hexdigest(), __name__)
    res.compile()
    return res


# -- size and clearing ---------------------------------------------------------------------

def usage() -> tuple[str | None, int, int]:
    """``(directory, files, bytes)`` of the kernel cache."""
    path = directory()
    files = size = 0
    if path is not None and os.path.isdir(path):
        for entry in os.scandir(path):
            if entry.is_file():
                files += 1
                size += entry.stat().st_size
    return path, files, size


def describe() -> str:
    """``"<directory> (N files, size)"`` for ``coremap info`` and ``coremap cache``."""
    path, files, size = usage()
    if path is None:
        return "off (COREMAP_CACHE_DIR=off)"
    amount = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    return f"{path} ({files} files, {amount})"


def clear_cache() -> int:
    """Delete coremap's compiled kernels from the disk cache.

    Kernels compiled in this process stay in memory; the next process compiles
    again (and caches again). The cache is at ``coremap info``'s "kernel cache"
    (``COREMAP_CACHE_DIR`` moves it, ``COREMAP_CACHE_DIR=off`` turns it off).

    Returns
    -------
    int
        The bytes freed.

    Examples
    --------
    >>> import coremap as cm
    >>> freed = cm.clear_cache()
    """
    path, _, size = usage()
    if path is not None and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    return size
