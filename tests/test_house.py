"""The house rules: a frozen public plan, one table of option defaults, checks that
happen before any work, and imports that point down (front ends -> planning ->
engines -> transport and kernels) with no circle."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import multiprocessing
import threading
import warnings

import numpy as np
import pytest

import coremap as cm
from coremap import _config, _plan
from coremap.engines import InProcessEngine

# -- the plan that explain returns ------------------------------------------------------


def test_explain_returns_a_frozen_public_plan():
    x = np.arange(10.0)
    plan = cm.explain(x, np.sqrt)
    assert isinstance(plan, cm.Plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.engine = "threads"
    # only the description: no function, inputs, out or engine adapter inside
    names = {f.name for f in dataclasses.fields(cm.Plan)}
    assert names.isdisjoint({"func", "inputs", "out", "adapter", "auto", "timeout"})
    assert isinstance(plan.reasons, tuple)


def test_running_a_call_leaves_its_plan_alone():
    # the dtype of a vectorized function is learnt while running: on the call, not the plan
    x = np.arange(100.0)
    call = _plan.plan_call(x, lambda c: c * 2, vectorized=True, workers=1)
    before = dataclasses.asdict(call.plan)
    from coremap._execute import execute

    np.testing.assert_array_equal(execute(call), x * 2)
    assert call.out_dtype == np.float64
    assert dataclasses.asdict(call.plan) == before and call.plan.out_dtype is None


def test_a_call_carries_every_field_of_its_plan():
    x = np.arange(12.0).reshape(3, 4)
    call = _plan.plan_call((x, 2.0), np.power, workers=2, schedule="dynamic")
    for field in dataclasses.fields(cm.Plan):
        if field.name != "reasons":
            assert getattr(call, field.name) == getattr(call.plan, field.name), field.name


# -- the fast path's condition comes from one table -----------------------------------------


def test_option_table_matches_parallel_map_signature():
    params = inspect.signature(cm.parallel_map).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == _plan.OPTION_DEFAULTS


@pytest.mark.parametrize("name,value", [
    ("out", np.empty(3)), ("dtype", "f4"), ("vectorized", True), ("vectorized", 0),
    ("backend", "serial"), ("workers", 1), ("chunk_size", 8), ("schedule", "static"),
    ("progress", True), ("timeout", 5.0), ("retries", 1), ("retries", 0.0),
])
def test_any_option_off_its_default_is_keyed_or_skips_the_fast_path(name, value):
    plain = _plan.fast_key(**_plan.OPTION_DEFAULTS)
    assert plain is _plan.PLAIN_KEY
    key = _plan.fast_key(**{**_plan.OPTION_DEFAULTS, name: value})
    if name in _plan.KEYED_OPTIONS:
        assert key not in (None, plain) and value in key  # planned once per value
    elif name == "out":
        assert key is _plan.PLAIN_OUT_KEY  # the array itself is checked on every call
    else:
        assert key is None  # never cached


def test_keyed_options_are_keyed_with_their_type():
    base = _plan.OPTION_DEFAULTS
    assert _plan.fast_key(**{**base, "workers": 2}) != _plan.fast_key(**{**base, "workers": 2.0})
    assert _plan.fast_key(**{**base, "workers": 1}) != _plan.fast_key(**{**base, "workers": True})


def test_the_fast_path_check_takes_exactly_the_table():
    with pytest.raises(TypeError):
        _plan.fast_key(**{**_plan.OPTION_DEFAULTS, "new_option": 1})
    options = dict(_plan.OPTION_DEFAULTS)
    options.popitem()
    with pytest.raises(TypeError):
        _plan.fast_key(**options)


@pytest.mark.parametrize("good,bad,error", [
    ({"workers": 2}, {"workers": 0}, ValueError),
    ({"workers": 2}, {"workers": 2.0}, TypeError),
    ({"schedule": "static"}, {"schedule": "statics"}, ValueError),
    ({"chunk_size": 64}, {"chunk_size": -1}, ValueError),
    ({"backend": "serial"}, {"backend": "serials"}, ValueError),
])
def test_a_keyed_option_is_validated_for_each_new_value(good, bad, error):
    x = np.arange(2000.0)
    f = lambda v: v * 3.0  # noqa: E731
    for _ in range(3):  # planned, then cached
        np.testing.assert_array_equal(cm.parallel_map(x, f, **good), x * 3.0)
    with pytest.raises(error):
        cm.parallel_map(x, f, **bad)


def test_a_non_default_option_is_validated_after_a_fast_call():
    x = np.arange(2000.0)
    cm.parallel_map(x, np.sqrt)
    cm.parallel_map(x, np.sqrt)  # cached: the fast path
    with pytest.raises(TypeError, match="vectorized must be True or False"):
        cm.parallel_map(x, np.sqrt, vectorized=0)


# -- bad input: a clear error before any work (hardening items 12 and 20) --------------------


def _nothing_started():
    return threading.active_count(), len(multiprocessing.active_children())


@pytest.mark.parametrize("workers", [10**9, 2**63, _config.max_workers() + 1])
def test_workers_is_bounded(workers):
    before = _nothing_started()
    with pytest.raises(ValueError, match="per usable core"):
        cm.parallel_map(np.arange(10.0), lambda v: v + 1, workers=workers)
    with pytest.raises(ValueError, match="per usable core"):
        cm.explain(np.arange(10.0), np.sqrt, workers=workers, backend="processes")
    with pytest.raises(ValueError, match="per usable core"), cm.config(workers=workers):
        pass
    assert _nothing_started() == before


def test_workers_bound_from_the_environment(monkeypatch):
    monkeypatch.setenv("COREMAP_WORKERS", str(10**9))
    with pytest.raises(ValueError, match="COREMAP_WORKERS"):
        cm.parallel_map(np.arange(10.0), np.sqrt)


def test_the_bound_allows_many_workers():
    plan = cm.explain(np.arange(10.0), np.sqrt, workers=_config.max_workers(),
                      backend="threads")
    assert plan.workers == _config.max_workers()


@pytest.mark.parametrize("chunk_size", [10**30, 2**63])
def test_huge_chunk_size_is_a_value_error(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be at most"):
        cm.parallel_map(np.arange(10.0), np.sqrt, chunk_size=chunk_size)


def test_a_broadcast_too_large_says_its_size_overflows():
    a = np.broadcast_to(np.zeros(1), (2**40, 1))
    b = np.broadcast_to(np.zeros(1), (1, 2**40))
    with pytest.raises(ValueError, match="overflow") as info:
        cm.parallel_map((a, b), np.add)
    assert "do not broadcast" not in str(info.value)
    with pytest.raises(ValueError, match="do not broadcast"):
        cm.parallel_map((np.zeros(3), np.zeros(4)), np.add)


def _two_args(a, b):
    return a + b


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("backend", [None, "processes", "threads"])
def test_wrong_arity_is_a_type_error_before_any_worker(backend, vectorized):
    before = _nothing_started()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Numba could not compile" warning first
        with pytest.raises(TypeError, match="cannot be called with 1 "):
            cm.parallel_map(np.arange(5000.0), _two_args, backend=backend,
                            vectorized=vectorized)
    assert _nothing_started() == before


def test_right_arity_with_defaults_and_varargs_still_runs():
    def f(a, b=2.0):
        return a * b

    def g(*args):
        return sum(args)

    x = np.arange(10.0)
    np.testing.assert_array_equal(cm.parallel_map(x, f, backend="serial"), x * 2)
    np.testing.assert_array_equal(cm.parallel_map((x, x, 1.0), g, backend="serial"),
                                  2 * x + 1)


# -- imports point down, with no circle -------------------------------------------------------
#
# Layers, top down: front ends (3) -> planning (2) -> engines (1) -> transport and
# kernels (0). A module may import its own layer or lower ones, never a higher one,
# and no chain of imports (lazy ones inside functions included) may lead back to
# where it started. A new module under _kernels/ or engines/ takes its package's
# layer; any other new module is planning until it is listed here.

FRONT, PLANNING, ENGINES, BOTTOM = 3, 2, 1, 0
LAYERS = {
    "coremap": FRONT, "coremap.__main__": FRONT, "coremap._api": FRONT,
    "coremap.pool": FRONT, "coremap.shared": FRONT, "coremap.cluster": FRONT,
    "coremap._cli": FRONT, "coremap._demo": FRONT, "coremap._bench": FRONT,
    "coremap._info": FRONT, "coremap._reduce": FRONT, "coremap._containers": FRONT,
    "coremap._plan": PLANNING, "coremap._multi": PLANNING, "coremap._execute": PLANNING,
    "coremap._fastpath": PLANNING, "coremap._insights": PLANNING,
    "coremap._tasks": BOTTOM, "coremap._layout": BOTTOM, "coremap._shm": BOTTOM,
    "coremap._config": BOTTOM, "coremap._errors": BOTTOM, "coremap.kernels": BOTTOM,
    "coremap._workloads": BOTTOM, "coremap._typing": BOTTOM, "coremap._functions": BOTTOM,
}
LAYER_NAMES = {FRONT: "front end", PLANNING: "planning", ENGINES: "engines",
               BOTTOM: "transport/kernels"}

# Upward imports that exist today in code being reworked elsewhere, each with why it is
# still there. Each is a strict expected failure below: once the edge is gone, that
# test fails and says to remove the entry. The circle check leaves these edges out
# (each circle that exists today goes through one of them).
KNOWN_UPWARD: dict = {}


# Same-layer imports that close a circle today, left out of the circle check like the
# upward ones above (and each a strict expected failure too).
KNOWN_CIRCLE: dict = {}
KNOWN = {**KNOWN_UPWARD, **KNOWN_CIRCLE}


def _layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    if module.startswith("coremap._kernels"):
        return BOTTOM
    if module.startswith("coremap.engines"):
        return ENGINES
    return PLANNING


def _source_modules() -> dict:
    import pathlib

    root = pathlib.Path(cm.__file__).parent.parent
    found = {}
    for path in (root / "coremap").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for path in (root / "coremap").rglob("*.pyx"):  # compiled modules import nothing up
        found.setdefault(".".join(path.relative_to(root).with_suffix("").parts), None)
    return found


def _import_graph() -> dict:
    """module -> the coremap modules it imports anywhere in its source (ast, not runtime)."""
    import ast

    modules = _source_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        if path is not None:
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        up = package.split(".")[:len(package.split(".")) - node.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t.startswith("coremap") and t != name
                       and (t in modules or t.rpartition(".")[0] in modules)}
    return graph


def _upward_edges(graph) -> dict:
    return {(a, b): f"{a} ({LAYER_NAMES[_layer(a)]}) imports {b} ({LAYER_NAMES[_layer(b)]})"
            for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)}


def _cycles(graph) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_from_the_source():
    graph = _import_graph()
    assert "coremap._plan" in graph["coremap._api"]
    assert "coremap._kernels._numba" in graph["coremap._plan"]  # a lazy import counts
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_src():
    graph = {a: {b for b in targets if (a, b) not in KNOWN}
             for a, targets in _import_graph().items()}
    assert _cycles(graph) == []


def test_imports_point_down():
    upward = {edge: text for edge, text in _upward_edges(_import_graph()).items()
              if edge not in KNOWN_UPWARD}
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward.values()))


@pytest.mark.parametrize("edge", sorted(KNOWN), ids="->".join)
def test_known_bad_import_is_gone(edge, request):
    request.applymarker(pytest.mark.xfail(
        strict=True, reason=f"known: {KNOWN[edge]} (remove it from KNOWN_UPWARD or "
                            "KNOWN_CIRCLE once this passes)"))
    importer, imported = edge
    assert imported not in _import_graph()[importer]


# -- one registry of engines -------------------------------------------------------------------


class _InlineEngine(InProcessEngine):
    """A whole engine: it runs the call's task in the calling thread (like serial).

    ``InProcessEngine.execute`` has prepared the operands, the job (its chunk counter)
    and the task; an engine only decides where ``task(job, caller)`` runs.
    """

    name = "inline-example"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, job, task, workers=1, on_progress=None, timeout=None):
        self.calls += 1
        job.event = threading.Event()
        task(job, True)
        if on_progress is not None:
            on_progress(job.done)


@pytest.fixture
def inline_engine():
    from coremap import engines

    # the one registry line (_config.ENGINES holds the built-in ones the same way):
    # imported by "module:attribute" on first use
    engines.register("inline-example", f"{__name__}:_InlineEngine")
    try:
        yield engines
    finally:
        engines.unregister("inline-example")


def _poly(v):
    return v * v - 2.0 * v


def test_an_engine_is_one_class_and_one_registry_line(inline_engine):
    x = np.linspace(-1.0, 1.0, 5000)
    assert "inline-example" in _config.BACKENDS
    plan = cm.explain(x, _poly, backend="inline-example")
    assert plan.engine == "inline-example"
    for func, kw in [(_poly, {}), (np.sin, {}), (lambda c: c * 3, {"vectorized": True}),
                     (cm.kernels.affine(2.0, 1.0), {})]:
        y = cm.parallel_map(x, func, backend="inline-example", **kw)
        np.testing.assert_allclose(y, func(x))
    assert inline_engine.get_engine("inline-example").calls == 4
    with cm.config(backend="inline-example"):
        np.testing.assert_allclose(cm.parallel_map(x, np.cos), np.cos(x))
    from coremap import _info

    assert "inline-example" in _info.collect()["engines"]


def test_unknown_engine_names_list_the_registry(inline_engine):
    with pytest.raises(ValueError, match="'inline-example'"):
        cm.parallel_map(np.arange(3.0), np.sin, backend="nope")
    with pytest.raises(TypeError, match="'inline-example'"):
        cm.parallel_map(np.arange(3.0), np.sin, backend=object())


class _Forwarding(cm.engines.Engine):
    """An engine that writes ``execute`` itself: it records what it is given and lets
    the serial engine run it."""

    name = "forward-example"

    def __init__(self) -> None:
        self.given = []

    def execute(self, call, hooks):
        self.given.append((call, hooks))
        return cm.engines.get_engine("serial").execute(call, hooks)


def test_a_registered_engine_is_given_the_prepared_call():
    from coremap import engines

    engines.register("forward-example", _Forwarding)
    try:
        x = np.arange(3000.0).reshape(60, 50)
        out = np.empty_like(x)
        y = cm.parallel_map(x, _poly, out=out, backend="forward-example", progress=True)
        assert y is out
        np.testing.assert_allclose(y, _poly(x))
        (call, hooks), = engines.get_engine("forward-example").given
        assert isinstance(call.plan, cm.Plan) and call.plan.engine == "forward-example"
        assert call.func is _poly and call.out is out and call.inputs[0].array is x
        assert (call.shape, call.size, call.out_dtype) == ((60, 50), 3000, np.float64)
        assert isinstance(hooks, engines.Hooks) and hooks.on_progress is not None
        assert hooks.observe(len, None) is len  # no run insights recorded: the task itself
        # a call with no elements runs on no engine
        assert cm.parallel_map(np.empty(0), _poly, backend="forward-example").shape == (0,)
        assert len(engines.get_engine("forward-example").given) == 1
    finally:
        engines.unregister("forward-example")


class _OldStyle:
    def run(self, job, task, workers=1, on_progress=None, timeout=None):
        task(job, True)


def test_an_engine_without_the_one_method_is_refused_by_name():
    from coremap import engines

    engines.register("old-style", _OldStyle)
    try:
        with pytest.raises(TypeError, match="'old-style'.*subclass coremap.engines"):
            cm.parallel_map(np.arange(10.0), np.sin, backend="old-style")
    finally:
        engines.unregister("old-style")


def test_every_engine_has_the_one_method():
    from coremap import engines
    from coremap.engines import _cluster

    for name in ("serial", "threads", "processes"):
        assert isinstance(engines.get_engine(name), engines.Engine), name
    for adapter in (_cluster._IPyParallel, _cluster._Dask):
        assert issubclass(adapter, engines.Engine)
        assert adapter.execute is _cluster._Adapter.execute
    for name in ("serial", "threads"):  # in-process: only run is their own
        assert type(engines.get_engine(name)).execute is engines.InProcessEngine.execute


def test_optional_engines_load_on_first_use():
    import subprocess
    import sys

    code = ("import sys, coremap as cm, numpy as np; cm.parallel_map(np.arange(9.0), np.sin);"
            "print(sorted(m for m in ('coremap.engines._processes', 'coremap.engines._cluster')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# -- each element runs exactly once (hardening item 3) -----------------------------------------


class _Counter:
    """A function Numba cannot compile (it keeps Python state), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def scalar(self, v):
        with self.lock:
            self.calls += 1
        return v * 2.0

    def chunk(self, c):
        with self.lock:
            self.calls += len(c)
        return c * 2.0


@pytest.mark.parametrize("n", [1, 100, 256, 257, 5000, 70_000])
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("backend,schedule", [("serial", "guided"), ("threads", "guided"),
                                              ("threads", "dynamic"), ("threads", "static"),
                                              ("serial", "static")])
def test_each_element_runs_exactly_once(n, vectorized, backend, schedule):
    counter = _Counter()
    x = np.arange(n, dtype=np.float64).reshape(-1, 10) if n % 10 == 0 else np.arange(n, 0, -1.0)
    func = counter.chunk if vectorized else counter.scalar
    y = cm.parallel_map(x, func, vectorized=vectorized, backend=backend, workers=2,
                        schedule=schedule)
    np.testing.assert_array_equal(y, x * 2.0)
    assert counter.calls == x.size


def _count_in_file(path, v):
    # The process engine's workers are other processes: count calls in a file they append to.
    with open(path, "a") as f:
        f.write("x")
    return v * 2.0


def _count_chunk_in_file(path, c):
    with open(path, "a") as f:
        f.write("x" * len(c))
    return c * 2.0


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("n", [100, 5000])
def test_each_element_runs_exactly_once_on_processes(tmp_path, n, vectorized):
    path = str(tmp_path / "calls")
    body = _count_chunk_in_file if vectorized else _count_in_file
    func = functools.partial(body, path)  # a new function each test: the dtype is probed
    x = np.arange(n, dtype=np.float64)
    y = cm.parallel_map(x, func, vectorized=vectorized, backend="processes", workers=2)
    np.testing.assert_array_equal(y, x * 2.0)
    with open(path) as f:
        assert len(f.read()) == n


def test_an_error_past_the_kept_elements_is_still_raised_with_its_element():
    def f(v):
        if v == 300:
            raise ZeroDivisionError("at 300")
        return v

    with pytest.raises(ZeroDivisionError, match="at 300"):
        cm.parallel_map(np.arange(1000.0), f, backend="threads", workers=2)


# -- built-in kernels on every numeric dtype (hardening item 19) -------------------------------

NUMERIC = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]


def _layouts(dtype):
    rng = np.random.default_rng(7)
    base = (rng.random((64, 50)) * 100).astype(dtype)
    if np.dtype(dtype).kind == "c":
        base = base + 1j * base[::-1]
    return {"C": base, "F": np.asfortranarray(base), "strided": base[::2, ::-3],
            "negative": base[::-1], "1-D": base.ravel()[:3001]}


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("a,b", [(2, 1), (3.0, -0.5)])
def test_affine_on_every_numeric_dtype(dtype, a, b):
    from helpers import same_bits

    aff = cm.kernels.affine(a, b)
    for name, x in _layouts(dtype).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # int overflow wraps, as NumPy's
            expected = aff(x)
        if expected.dtype == np.float16:  # NumPy rounds after each operation: no C kernel
            for call in (cm.explain, cm.parallel_map):
                with pytest.raises(TypeError, match="no built-in affine kernel for float16"):
                    call(x, aff)
            continue
        assert cm.explain(x, aff).kind == "builtin"
        for backend in ("serial", "threads"):
            got = cm.parallel_map(x, aff, backend=backend, workers=2)
            assert same_bits(got, expected), (name, backend)


def test_affine_coefficient_out_of_bounds_is_refused_in_planning():
    x = np.arange(10, dtype=np.uint8)
    with pytest.raises(OverflowError):
        cm.kernels.affine(-1, 0)(x)  # NumPy's own answer
    with pytest.raises(OverflowError, match="out of bounds for the uint8"):
        cm.explain(x, cm.kernels.affine(-1, 0))


# -- one digest and one cache for shipped functions ------------------------------------------


def test_function_cache_unpickles_each_function_once_and_stays_bounded():
    import cloudpickle

    from coremap._functions import FunctionCache, digest

    cache = FunctionCache(size=3)
    blobs = [cloudpickle.dumps(lambda v, k=k: v + k) for k in range(5)]
    first = cache.load(blobs[0])
    assert cache.load(blobs[0], digest(blobs[0])) is first  # the same object: Numba's key
    for blob in blobs[1:]:
        cache.load(blob)
    assert len(cache) == 3
    assert cache.load(blobs[0]) is not first  # evicted, least recently used first
    assert digest(blobs[1]) == digest(bytes(blobs[1])) != digest(blobs[2])


# -- no function over 100 lines ----------------------------------------------------------------

KNOWN_LONG: dict = {}


def _long_functions(limit: int = 100) -> dict:
    import ast

    found = {}
    for name, path in _source_modules().items():
        if path is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found[f"{name}.{node.name}"] = length
    return found


def test_no_function_over_100_lines():
    long = {k: v for k, v in _long_functions().items() if k not in KNOWN_LONG}
    assert not long, f"functions over 100 lines: {long}"


@pytest.mark.parametrize("name", sorted(KNOWN_LONG))
def test_known_long_function_is_split(name, request):
    request.applymarker(pytest.mark.xfail(
        strict=True, reason=f"known: {KNOWN_LONG[name]} (remove it from KNOWN_LONG once "
                            "this passes)"))
    assert name not in _long_functions()


def test_warnings_point_at_the_callers_line():
    import decimal

    def dec(v):
        return float(decimal.Decimal(v))

    with pytest.warns(cm.CoremapWarning) as record:
        cm.parallel_map(np.arange(3.0), dec, workers=1)
    assert record[0].filename == __file__


def test_operands_that_need_a_third_dimension_are_copied_once_for_every_engine():
    from coremap import _layout

    base = np.arange(6 * 7 * 8, dtype=np.float64).reshape(6, 7, 8)
    x = base[::2, :, ::3]  # strided in two dimensions: no 2-D form
    views = [_layout.iteration_view(x, x.shape, "C"), np.empty(x.shape)]
    assert _layout.build_space(views) is None
    space, copied = _layout.space_copying(views)
    assert space is not None and copied[0].flags.c_contiguous and copied[1] is views[1]
    for backend in ("serial", "threads"):
        for func in (np.sqrt, cm.kernels.affine(2.0, 1.0), lambda v: v * 0.5):
            np.testing.assert_allclose(cm.parallel_map(x, func, backend=backend), func(x))


# -- logic written once: where a function raised, how a worker ended, a function's name ------


def _raises_at_3(v):
    if v == 3:
        raise ValueError("three")
    return v


def _raises_with_its_own_note(v):
    exc = ValueError("refused by the validator")
    if hasattr(exc, "add_note"):
        exc.add_note("raised by the validator, not by coremap")
    raise exc


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="notes: Python 3.11+")
def test_the_raised_by_note_is_added_once_across_worker_and_parent():
    x = np.arange(8.0)
    for backend in ("serial", "processes"):  # processes: noted in the worker, not again
        with pytest.raises(ValueError, match="three") as info:
            cm.parallel_map(x, _raises_at_3, backend=backend, workers=2, dtype=np.float64)
        notes = [n for n in info.value.__notes__ if n.startswith("raised by")]
        assert len(notes) == 1 and notes[0].endswith("at element index (3,)"), notes
    # the parent reads the worker's mark, not the notes' text: a note of the function's
    # own that happens to say "raised by" does not stand for coremap's
    with pytest.raises(ValueError, match="validator") as info:
        cm.parallel_map(x, _raises_with_its_own_note, vectorized=True, backend="processes",
                        workers=2, dtype=np.float64)
    own, ours = info.value.__notes__
    assert own == "raised by the validator, not by coremap"
    assert "in a worker process, on the chunk of elements (0,)" in ours


def test_the_raised_by_mark_travels_with_a_pickled_exception():
    import pickle

    from coremap._errors import note_raised_by, raised_by_noted

    exc = KeyError("k")
    assert not raised_by_noted(exc)
    note_raised_by(exc, "f", "at element index (2,)")
    back = pickle.loads(pickle.dumps(exc))
    assert raised_by_noted(back)
    assert getattr(back, "__notes__", ["raised by f at element index (2,)"]) == \
        ["raised by f at element index (2,)"]


def test_exit_text_names_the_signal_or_the_exit_code():
    from coremap._errors import exit_text

    assert exit_text(-9) == "died (signal SIGKILL)"
    assert exit_text(-11) == "died (signal SIGSEGV)"
    assert exit_text(-200) == "died (signal 200)"  # no signal of that number
    assert exit_text(3) == "died (exit code 3)"
    assert exit_text(None) == "died (exit code None)"
    assert exit_text(-9, stopped_for=3.0) == (
        "was stopped (SIGSTOP or similar) for 3.0 s without progress and was killed")


def test_the_pool_names_its_functions_by_the_one_digest():
    import pickle

    from coremap import pool
    from coremap._functions import digest

    blob = pickle.dumps(abs)
    assert pool._Job(blob, "map", None).key == digest(blob)


def test_function_cache_keeps_the_newest_function_however_large():
    import cloudpickle

    from coremap._functions import FunctionCache

    small = [cloudpickle.dumps(lambda v, k=k: v + k) for k in range(3)]
    zeros = np.zeros(2000)
    big = cloudpickle.dumps(lambda v: v + zeros[0])  # the array travels in the closure
    assert max(map(len, small)) * 3 < 4000 < len(big)
    cache = FunctionCache(size=8, max_bytes=4000)
    for blob in small:
        cache.load(blob)
    assert len(cache) == 3
    f = cache.load(big)
    assert len(cache) == 1 and cache.load(big) is f  # alone, but kept
    cache.load(small[0])
    assert len(cache) == 1  # the large one made room


def _counter(offset):
    calls = [0]

    def count(v):
        calls[0] += 1
        return float(offset + calls[0])

    return count


def test_a_process_worker_unpickles_each_function_once():
    # Each function object lives on in the worker between calls (Numba keys its compiled
    # code on it), so the state a function keeps there carries from one call to the next,
    # even when calls alternate between two functions.
    f, g = _counter(0), _counter(10)
    x = np.zeros(1)

    def run(h):
        return cm.parallel_map(x, h, backend="processes", workers=1, dtype=np.float64)[0]

    assert [run(f), run(g), run(f), run(g)] == [1.0, 11.0, 2.0, 12.0]


def test_one_operand_preparation_for_every_engine():
    from coremap import _layout

    x = np.arange(24.0).reshape(4, 6)
    # an out= with no 2-D form: kernels write a temporary, result() copies it into out
    holder = np.zeros((8, 6, 4))
    out = holder[::2, :, ::2].transpose(0, 2, 1)[:, :, :6]
    assert out.shape == (4, 2, 6) and _layout.build_space([out]) is None
    x3 = np.broadcast_to(x[:, None, :], (4, 2, 6))
    call = _plan.plan_call(x3, np.sqrt, out=out, backend="serial")
    ops = _layout.prepare_operands(call)
    assert ops.target is not out and ops.out is out
    ops.space.grid(1)[...] = 7.0
    assert ops.result() is out and (out == 7.0).all()
    # private: the caller's out= is not a target until the call succeeded
    simple = np.empty_like(x)
    call = _plan.plan_call(x, np.sqrt, out=simple, backend="serial")
    assert _layout.prepare_operands(call).target is simple
    assert _layout.prepare_operands(call, private=True).target is not simple
    # the engine's own target (the process engine's segment), and no inputs
    mine = np.empty_like(x)
    ops = _layout.prepare_operands(call, target=mine, inputs=False)
    assert ops.target is mine and len(ops.space.views) == 1 and ops.out is simple


@pytest.mark.parametrize("schedule", ["guided", "dynamic", "static"])
@pytest.mark.parametrize("vectorized", [False, True])
def test_several_outputs_chunk_and_time_as_parallel_map(schedule, vectorized):
    # one place decides a job's settings (engines/_base.job_params), whatever the path
    from coremap import _multi
    from coremap.engines._base import new_job

    x = np.arange(50_000.0)
    f = (lambda c: c * 2.0) if vectorized else (lambda v: v * 2.0)
    call = _plan.plan_call(x, f, workers=2, schedule=schedule, vectorized=vectorized)
    single = new_job(call)
    several = _multi._job(call.size, call.kind, 2, schedule, None)
    for name in ("chunk", "max_chunk", "target_ns", "floor_ns", "escalate_ns"):
        assert getattr(several, name) == getattr(single, name), name


def test_a_worker_probes_and_runs_one_function_object():
    # the probe (first elements, to learn the dtype) and the later calls run on the
    # same unpickled function in the worker, as they would in this process
    f = _counter(100)  # (pickled unlike the other tests' counters)
    x = np.zeros(1)

    def run():
        return cm.parallel_map(x, f, backend="processes", workers=1)[0]  # dtype probed

    assert [run(), run(), run()] == [101.0, 102.0, 103.0]
