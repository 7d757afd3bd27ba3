"""Why Numba refused a function: its own line naming the cause, where it is, and a fix.

Numba's exceptions open with the pipeline stage ("Failed in nopython mode
pipeline (step: nopython frontend)"), which names no cause. The cause is the
first line after such headers (e.g. "Untyped global name 'cnd': Cannot
determine Numba type of <class 'dict'>"), and the source line follows a
``File "...", line N:`` marker. :func:`explain` quotes both and adds a fix.
"""
from __future__ import annotations

import os
import re

_HEADERS = ("Failed in ", "During:", "Internal error at", "Enable logging", "- Resolution",
            "- Of which", "Rejected as", "Overload", "No match", "^", ">>>",
            "This error may have been caused", "All templates rejected", "Unsupported "
            "use of", "Note that")
_FILE = re.compile(r'File "([^"]+)", line (\d+)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FIXES = (
    ("Untyped global name", "give that name a number, an array, a plain function or an "
     "@numba.njit function, or pass the value as an input"),
    ("Cannot determine Numba type", "Numba compiles numbers, arrays and functions of them; "
     "move the other objects out of the function"),
    ("Unknown attribute", "that attribute is not among the ones Numba supports; compute it "
     "with math or NumPy functions"),
    ("No implementation of function", "that call is not among the ones Numba supports for "
     "these types; use math or NumPy functions on numbers"),
    ("Use of unsupported opcode", "that statement (try, with, yield, ...) is not one Numba "
     "compiles; move it out of the function"),
)


def cause(text: str) -> str:
    """Numba's line naming the cause, from the text of its exception."""
    lines = [_ANSI.sub("", ln).strip() for ln in text.splitlines()]
    for ln in lines:
        if ln and not ln.startswith(_HEADERS) and not _FILE.search(ln):
            return ln
    return lines[0] if lines else ""


def where(text: str) -> str:
    """``file.py, line N: source`` of the first place Numba names ('' if none)."""
    lines = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines()]
    for k, ln in enumerate(lines):
        m = _FILE.search(ln)
        if m and f"{os.sep}numba{os.sep}" not in m.group(1):  # the user's code, not Numba's
            # the def line, maybe "<source elided>", the line, a caret under it
            src = ""
            for s in lines[k + 1:k + 8]:
                if s.strip().startswith("^") or not s.strip():
                    break
                src = s.strip()
            return f"{os.path.basename(m.group(1))}, line {m.group(2)}: {src}"
    return ""


def explain(exc: BaseException, name: str) -> str:
    """One paragraph: ``Numba could not compile <name>: <cause> (<where>); <fix>``."""
    text = str(exc)
    why = cause(text) or type(exc).__name__
    at = where(text)
    fix = next((f for key, f in _FIXES if key in text), None)
    out = f"Numba could not compile {name}: {type(exc).__name__}: {why}"
    if at:
        out += f" ({at})"
    if fix:
        out += f"; to compile it, {fix}"
    return out
