"""The semantic guard: does the compiled kernel give what Python gives, on this call's elements?

    call's inputs ──sample_indices──> first, last and evenly spaced elements
        ├─ the Python function on them as Python numbers (what the process engine runs)
        └─ the jitted function on them as the call's dtypes, cast to the output dtype
    ──agree?──> None, or a sentence naming the element, Python's value and the compiled one

It runs once per (function, dtypes), before the kernel is first trusted; the
verdict is cached with the compiled function (``_numba.guard``).

"Agree": integers and bools bit for bit; both raising the same exception type;
floats equal, both NaN, or within a few units in the last place of the
narrowest float dtype of the call (compiled float32 arithmetic and Python's
float64 may round differently; NumPy's own vectorized math may differ from the
C library's by an ulp). Semantic differences are far larger: ``round(2.675, 2)``
(2.67 against 2.68), ``len(str(v))``, integers that wrap at 64 bits, ``int(nan)``.

What it cannot see: an element it does not sample. Division by zero, math
domain errors and ``int(nan)`` raise anyway (Python's error model and
``_checked.py``); integer wrap-around on unsampled elements stays Numba's.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

# Elements compared: first, last and evenly spaced ones between. Each costs one
# Python call and one compiled call (about 2 us for W2's function), once per
# (function, dtypes).
GUARD_SAMPLES = 8
# A function slow in Python (a long loop per element, fast once compiled) must not
# make the first call slow: after the first and the last element, sampling stops
# once it has taken this long (a tenth of the 0.5 s first-call budget).
GUARD_BUDGET_S = 0.05
# Tolerance, in units in the last place of the narrowest float of the call:
# float64 only (same arithmetic, libm against NumPy's SIMD math: measured <= 1 ulp);
# float32/float16 (Python computes in float64: rounding differs, cancellation grows it).
ULPS_SAME_PRECISION = 4
ULPS_MIXED_PRECISION = 16


def sample_indices(size: int, count: int = GUARD_SAMPLES) -> list[int]:
    """Flat indices to compare: the first, the last, then evenly spaced ones."""
    if size <= count:
        picked = list(range(size))
    else:
        picked = sorted({round(k * (size - 1) / (count - 1)) for k in range(count)})
    return picked[:1] + picked[-1:] + picked[1:-1] if len(picked) > 1 else picked


def _run(fn, args):
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - compared with the other side's outcome
        return False, exc


def _describe(ok: bool, value) -> str:
    if ok:
        return f"gives {(value.item() if isinstance(value, np.generic) else value)!r}"
    return f"raises {type(value).__name__}: {value}"


def _tolerance(in_dtypes, out_dtype) -> float:
    floats = [np.dtype(d) for d in (*in_dtypes, out_dtype) if np.dtype(d).kind in "fc"]
    if not floats:
        return ULPS_SAME_PRECISION * np.finfo(np.float64).eps
    narrow = max(np.finfo(d).eps for d in floats)  # the coarsest one rounds the most
    if narrow <= np.finfo(np.float64).eps:
        return ULPS_SAME_PRECISION * narrow
    return ULPS_MIXED_PRECISION * narrow


def _close(a: float, b: float, tol: float, scale: float) -> bool:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= tol * max(abs(a), abs(b), scale)


def _agree(py, cc, tol: float, scale: float) -> bool:
    """Python's outcome ``py`` and the compiled one ``cc``: (ok, value or exception)."""
    (pok, pv), (cok, cv) = py, cc
    if not pok or not cok:
        return not pok and not cok and type(pv) is type(cv)
    if isinstance(pv, np.generic):
        pv = pv.item()
    if isinstance(cv, np.generic):
        cv = cv.item()
    if not isinstance(pv, (int, float, complex)):  # bool is an int
        return False
    if isinstance(pv, int) and isinstance(cv, int):
        return pv == cv
    try:
        pc, cc_ = complex(pv), complex(cv)
    except (OverflowError, TypeError):
        return False
    return _close(pc.real, cc_.real, tol, scale) and _close(pc.imag, cc_.imag, tol, scale)


def _stored(cc, out_dtype: np.dtype):
    """The compiled result as the kernel stores it into ``out_dtype``."""
    ok, value = cc
    if not ok:
        return cc
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, np.asarray(value).astype(out_dtype)[()]
    except (OverflowError, TypeError, ValueError) as exc:
        return False, exc


def check(func, jitted, name: str, in_dtypes, out_dtype, inputs, shape,
          compute_dtype) -> str | None:
    """Compare ``func`` and ``jitted`` on sampled elements; None, or the first mismatch."""
    size = math.prod(shape)
    tol = _tolerance(in_dtypes, out_dtype)
    arrays = [None if inp.is_scalar else np.broadcast_to(inp.array, shape) for inp in inputs]
    start = time.perf_counter()
    for n, i in enumerate(sample_indices(size)):
        if n >= 2 and time.perf_counter() - start > GUARD_BUDGET_S:
            break
        idx = np.unravel_index(i, shape) if shape else ()
        elems = [inp.value if a is None else a[idx] for inp, a in zip(inputs, arrays)]
        py_args = [e.item() if isinstance(e, np.generic) else e for e in elems]
        c_args = [compute_dtype(dt).type(e) for dt, e in zip(in_dtypes, elems)]
        scale = max((abs(v) for v in py_args
                     if isinstance(v, float) and math.isfinite(v)), default=0.0)
        py = _run(func, py_args)
        cc = _stored(_run(jitted, c_args), out_dtype)
        if not _agree(py, cc, tol, scale):
            where = tuple(int(k) for k in idx)
            args = ", ".join(repr(v) for v in py_args)
            return (f"the compiled {name} disagrees with Python at element {where} "
                    f"({name}({args})): Python {_describe(*py)}, the compiled kernel "
                    f"{_describe(*cc)}")
    return None
