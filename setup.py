"""Builds the Cython extensions; all other metadata lives in pyproject.toml."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
}

extensions = [
    Extension(
        f"coremap._kernels.{name}",
        [f"src/coremap/_kernels/{name}.pyx"],
        include_dirs=["src/coremap/_kernels", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
    for name in ("_runner", "_builtin")
]

setup(
    ext_modules=cythonize(
        extensions, include_path=["src"], compiler_directives=DIRECTIVES
    ),
)
