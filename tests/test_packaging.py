"""Packaging: one version, the metadata, ``coremap --version``, the platform check, and
what the sdist and the wheel carry.

The build test runs ``python -m build`` on the source tree (skipped where the
``build`` package or the source tree is absent); ``.ci/run`` also installs the
sdist in a fresh virtual environment and runs a call from it.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import coremap
from coremap import _cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
needs_source = pytest.mark.skipif(not PYPROJECT.exists(), reason="needs the source tree")


def test_version_matches_installed_metadata():
    assert coremap.__version__ == importlib.metadata.version("coremap")


@needs_source
def test_version_is_written_once():
    text = PYPROJECT.read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \["version"\]', project, re.M)
    assert not re.search(r"^version\s*=", project, re.M)
    assert 'version = { attr = "coremap.__version__" }' in text


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        _cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"coremap {coremap.__version__}"


def test_metadata_license_classifiers_urls():
    meta = importlib.metadata.metadata("coremap")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    classifiers = meta.get_all("Classifier") or []
    for expected in ("Operating System :: POSIX :: Linux", "Typing :: Typed",
                     "Topic :: Scientific/Engineering",
                     f"Programming Language :: Python :: {sys.version_info[0]}."
                     f"{sys.version_info[1]}"):
        assert expected in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(urls)


@needs_source
def test_license_file_is_bsd3():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "The coremap developers" in text
    assert "Neither the name of the copyright holder" in text


@pytest.mark.timeout(120)
def test_unsupported_platform_fails_import_with_a_clear_error():
    code = "import os; os.name = 'nt'; import coremap"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=100)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: coremap supports POSIX systems"), res.stderr
    assert "'nt'" in last


def test_stubs_and_marker_installed():
    pkg = Path(coremap.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_kernels" / "_runner.pyi").exists()


SDIST_MUST = [
    "LICENSE", "README.md", "pyproject.toml", "setup.py",
    "src/coremap/__init__.py", "src/coremap/py.typed",
    "src/coremap/_kernels/_runner.pyx", "src/coremap/_kernels/_runner.pxd",
    "src/coremap/_kernels/_builtin.pyx", "src/coremap/_kernels/_atomics.h",
    "src/coremap/_kernels/_runner.pyi",
    "tests/conftest.py", "tests/helpers.py", "tests/test_packaging.py",
    "examples/parallel_map.py", "docs/conf.py", "docs/index.rst",
]
WHEEL_MUST = [
    "coremap/__init__.py", "coremap/py.typed", "coremap/_kernels/_runner.pyi",
    "coremap/_kernels/_builtin.pyi", "coremap/_kernels/_runner.pxd",
    "coremap/_kernels/_atomics.h",
]


@needs_source
@pytest.mark.timeout(900)
def test_build_sdist_and_wheel(tmp_path):
    """``python -m build``: the sdist has the sources, tests and examples; the wheel has the
    compiled modules, stubs and py.typed, and no generated C."""
    pytest.importorskip("build")
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=880)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    version = coremap.__version__
    (sdist,) = tmp_path.glob(f"coremap-{version}.tar.gz")
    (wheel,) = tmp_path.glob(f"coremap-{version}-*.whl")
    with tarfile.open(sdist) as tar:
        sdist_names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(SDIST_MUST) <= sdist_names, set(SDIST_MUST) - sdist_names
    assert not [n for n in sdist_names if n.endswith((".c", ".so"))]
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = set(whl.namelist())
    assert set(WHEEL_MUST) <= wheel_names, set(WHEEL_MUST) - wheel_names
    assert len([n for n in wheel_names if n.endswith(".so")]) >= 2
    assert not [n for n in wheel_names if n.endswith((".c", ".pyx"))]
    assert f"coremap-{version}.dist-info/licenses/LICENSE" in wheel_names
    twine = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                            str(sdist), str(wheel)], capture_output=True, text=True,
                           timeout=120)
    if "No module named twine" not in twine.stderr:
        assert twine.returncode == 0, twine.stdout + twine.stderr
