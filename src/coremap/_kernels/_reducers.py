"""Numba: fused map-reduce block kernels for ``parallel_reduce``.

A reduction over ``M`` rows of ``N`` elements (``_reduce.py`` puts the kept axes
in the rows and the reduced axes in the columns) is cut into fixed *blocks* of at
most ``B`` columns: block ``b`` is row ``b // nb``, columns ``(b % nb) * B`` up to
``B`` further, with ``nb = ceil(N / B)``. The kernel built here reduces blocks
``[lo, hi)`` and stores one partial per block::

    runner claims [lo, hi) of the M * nb blocks ──> kernel(ptrs, meta, lo, hi)
        for each block: v = f(a0[m, n], a1[m, n], ...) for its columns, folded
        into one accumulator ──> P[b]  (and PI[b], the column, for argmin/argmax)

The map ``f`` is called inside the loop, so no array of ``f(x)`` is ever made.
The kernel follows the chunk runner's calling convention (``_runner.pxd``: a
``numba.cfunc`` taking ``ptrs, meta, lo, hi``), so the thread engine runs it
without the GIL exactly like a ``parallel_map`` kernel; here ``lo``/``hi`` count
blocks, not elements.

Determinism: a block's partial depends only on its elements; nothing depends on
which thread ran it or how the blocks were claimed.

Accuracy (``sum``, ``prod``, ``mean``): a block is summed as NumPy's pairwise
summation does: runs of up to ``SUB`` = 128 elements go into eight interleaved
accumulators, and the run sums are combined in a pairwise tree. The partials of
the blocks are then combined in a pairwise tree too (``_reduce.py``), so the
error grows like ``log2(n)``, as NumPy's does.

Layout (``meta``): ``N, nb, B``, then per operand (inputs, in order) its offset,
row stride and column stride in elements from the lowest address it touches
(``ptrs[k]``), as in ``_layout.Space``. After the inputs, ``ptrs`` holds the
partials ``P`` (accumulator dtype) and, for argmin/argmax, ``PI`` (int64).
Operand stride classes specialise the loop as in ``_numba.py``: ``"c"`` unit
column stride, ``"g"`` any stride, ``"s"`` a scalar read once.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

# Length of the runs summed with eight accumulators: NumPy's PW_BLOCKSIZE
# (numpy/_core/src/umath/loops_utils.h.src), so a block is summed as NumPy would.
SUB = 128

# op -> how the kernel folds a block
OPS = ("sum", "prod", "min", "max", "any", "all", "argmin", "argmax")

_BIG = 1 << 62  # nominal carray length: indices are unchecked, the caller bounds them

_lock = threading.RLock()
# compiled state of the map function (_numba.compiled; _identity for func=None) ->
# {signature: cfunc}; weak, so a discarded function frees its machine code with it
_kernels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(v):
    return v


def _element_source(nin: int, classes: str, index: str) -> str:
    """Python source of ``f(inputs at column index)``, for the current row."""
    args = []
    for k in range(nin):
        if classes[k] == "s":
            args.append(f"v{k}")
        elif classes[k] == "c":
            args.append(f"a{k}[b{k} + {index}]")
        else:
            args.append(f"a{k}[b{k} + ({index}) * cs{k}]")
    return f"fn({', '.join(args)})"


def _pairwise_body(nin: int, classes: str, sym: str) -> list[str]:
    """Fold a block with ``sym`` (+ or *): runs of SUB into 8 accumulators, then a tree."""

    def e(index: str) -> str:
        return f"acc({_element_source(nin, classes, index)})"

    lanes = range(8)
    first = "; ".join(f"r{q} = {e(f's + {q}')}" for q in lanes)
    step = "; ".join(f"r{q} {sym}= {e(f'i + {q}')}" for q in lanes)
    return [
        "t = 0",
        "s = n0",
        "while s < n1:",
        "    e = min(n1, s + SUB)",
        "    if e - s < 8:",
        f"        r = {e('s')}",
        "        for i in range(s + 1, e):",
        f"            r {sym}= {e('i')}",
        "    else:",
        f"        {first}",
        "        i = s + 8",
        "        while i + 8 <= e:",
        f"            {step}",
        "            i += 8",
        f"        r = ((r0 {sym} r1) {sym} (r2 {sym} r3)) {sym} "
        f"((r4 {sym} r5) {sym} (r6 {sym} r7))",
        "        while i < e:",
        f"            r {sym}= {e('i')}",
        "            i += 1",
        "    tmp[t] = r",
        "    t += 1",
        "    s = e",
        # the run sums, combined in a pairwise tree (odd one carried up)
        "while t > 1:",
        "    h = t // 2",
        "    for k in range(h):",
        f"        tmp[k] = tmp[2 * k] {sym} tmp[2 * k + 1]",
        "    if t % 2:",
        "        tmp[h] = tmp[t - 1]",
        "        t = h + 1",
        "    else:",
        "        t = h",
        "P[blk] = tmp[0]",
    ]


def _body(op: str, nin: int, classes: str) -> list[str]:
    """The statements that reduce columns ``[n0, n1)`` of the row into ``P[blk]``."""
    if op in ("sum", "prod"):
        return _pairwise_body(nin, classes, "+" if op == "sum" else "*")
    val = _element_source(nin, classes, "i")
    if op in ("any", "all"):
        hit, start = ("!= 0", "False") if op == "any" else ("== 0", "True")
        return [
            f"r = {start}",
            "for i in range(n0, n1):",
            f"    if {val} {hit}:",  # short-circuits, as np.any does
            f"        r = not {start}",
            "        break",
            "P[blk] = r",
        ]
    cmp = "<" if op in ("min", "argmin") else ">"
    first = _element_source(nin, classes, "n0")
    if op in ("min", "max"):
        return [
            f"r = acc({first})",
            "for i in range(n0 + 1, n1):",
            f"    v = acc({val})",
            f"    if v {cmp} r or v != v:",  # a NaN replaces r and then stays: NumPy's rule
            "        r = v",
            "P[blk] = r",
        ]
    return [  # argmin / argmax: the first extreme, or the first NaN
        f"r = acc({first})",
        "ri = n0",
        "if r == r:",
        "    for i in range(n0 + 1, n1):",
        f"        v = acc({val})",
        f"        if v {cmp} r:",
        "            r = v",
        "            ri = i",
        "        elif v != v:",
        "            r = v",
        "            ri = i",
        "            break",
        "P[blk] = r",
        "PI[blk] = ri",
    ]


def source(op: str, nin: int, classes: str) -> str:
    """Python source of the block kernel for ``op`` over ``nin`` inputs."""
    lines = ["def kernel(ptrs, meta, lo, hi):", "    N = meta[0]; nb = meta[1]; B = meta[2]"]
    for k in range(nin):
        lines.append(f"    a{k} = carray(ptrs[{k}], (BIG,), dt{k})")
        lines.append(f"    off{k} = meta[{3 + 3 * k}]; rs{k} = meta[{4 + 3 * k}]; "
                     f"cs{k} = meta[{5 + 3 * k}]")
        if classes[k] == "s":
            lines.append(f"    v{k} = a{k}[off{k}]")
    lines.append(f"    P = carray(ptrs[{nin}], (BIG,), acc)")
    if op in ("argmin", "argmax"):
        lines.append(f"    PI = carray(ptrs[{nin + 1}], (BIG,), np.int64)")
    if op in ("sum", "prod"):
        lines.append("    tmp = np.empty(B // SUB + 1, acc)")  # once per claimed range
    lines += [
        "    for blk in range(lo, hi):",
        "        m = blk // nb",
        "        n0 = (blk - m * nb) * B",
        "        n1 = min(N, n0 + B)",
    ]
    lines += [f"        b{k} = off{k} + m * rs{k}" for k in range(nin) if classes[k] != "s"]
    lines += ["        " + s for s in _body(op, nin, classes)]
    lines.append("    return 1")
    return "\n".join(lines) + "\n"


def block_kernel(func: object, op: str, in_dtypes: tuple[np.dtype, ...], acc_dtype: np.dtype,
                 classes: str) -> int:
    """Address of the block kernel of ``op`` over ``func`` (``None``: the inputs themselves).

    Compiled once per (function, op, input dtypes, accumulator dtype, stride classes).
    """
    key = (op, tuple(in_dtypes), np.dtype(acc_dtype), classes)
    owner: object  # the key of _kernels: _identity or the function's _numba._Compiled
    if func is None:
        owner = _identity
    else:  # the function's compiled state: replaced when a global it read changes
        from coremap._kernels import _numba

        owner = _numba.compiled(func, len(in_dtypes))
    with _lock:
        per_func = _kernels.setdefault(owner, {})
        cf = per_func.get(key)
        if cf is None:
            cf = _build(func, op, in_dtypes, np.dtype(acc_dtype), classes)
            per_func[key] = cf
        return cf.address


def _build(func, op, in_dtypes, acc_dtype, classes):
    import numba
    from numba import types

    from coremap._kernels import _numba

    if func is None:
        fn = numba.njit(nogil=True, inline="always")(_identity)
    else:
        _numba._install_hook()  # a failing element: reported once, by the engine
        fn, _ = _numba.resolve(func, tuple(in_dtypes))
    ns = {"carray": numba.carray, "BIG": _BIG, "fn": fn, "np": np, "SUB": SUB,
          "acc": acc_dtype.type}
    for k, dt in enumerate(in_dtypes):
        ns[f"dt{k}"] = np.dtype(dt)
    text = source(op, len(in_dtypes), classes)
    exec(text, ns)  # generated source: see source()
    sig = types.int64(types.CPointer(types.voidptr), types.CPointer(types.int64),
                      types.int64, types.int64)
    try:
        from coremap._kernels import _diskcache  # loaded from disk when it can be keyed

        return _diskcache.cfunc(sig, ns["kernel"], None if func is None else fn,
                                (text, op, tuple(in_dtypes), acc_dtype),
                                nopython=True, nogil=True, error_model="numpy")
    except Exception as exc:  # e.g. a result that does not fit the accumulator's kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = getattr(func, "__name__", repr(func)) if func is not None else "the inputs"
        raise TypeError(f"cannot reduce {name} with op {op!r} in dtype {acc_dtype}: "
                        f"{first}") from exc
