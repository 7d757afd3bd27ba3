"""Sphinx configuration of the coremap documentation.

Build: ``pip install ".[docs]" && sphinx-build -W -b html docs docs/_build/html``;
the examples: ``sphinx-build -W -b doctest docs docs/_build/doctest``.
"""
from __future__ import annotations

import coremap

project = "coremap"
author = "The coremap developers"
copyright = "2026, The coremap developers"  # noqa: A001 (Sphinx's name for it)
version = release = coremap.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# numpydoc-style docstrings, read by napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_type_aliases = {
    "ArrayLike": "numpy.typing.ArrayLike",
    "DTypeLike": "numpy.typing.DTypeLike",
    "Backend": "coremap._typing.Backend",
    "Schedule": "coremap._typing.Schedule",
    "KernelFunc": "coremap._typing.KernelFunc",
}
# type names from NumPy and the standard library are not cross-referenced here
# (no network access for intersphinx at build time), so unresolved references
# are not warnings
nitpicky = False

# the examples on these pages run under `sphinx-build -b doctest`
doctest_global_setup = """
import numpy as np
import coremap as cm
"""

html_theme = "furo"
html_title = f"coremap {release}"
html_static_path: list[str] = []
