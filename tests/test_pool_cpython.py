"""CPython's own Pool tests, run against coremap.Pool.

``test._test_multiprocessing`` wires a pool into its test classes through a
mixin's ``Pool`` attribute (``ProcessesMixin.Pool = multiprocessing.Pool``) and
installs ``WithProcessesTestPool`` etc. into a module; here the same classes get
a mixin whose ``Pool`` is ``coremap.Pool``. ``_TestPoolWorkerErrors`` and
``_TestPoolWorkerLifetime`` call ``multiprocessing.Pool`` by name, so it is
patched to ``coremap.Pool`` while they run. The module is skipped where the
stdlib ``test`` package is not installed (many distributions split it out).
"""
from __future__ import annotations

import unittest
from unittest import mock

import pytest

import coremap as cm

mp_tests = pytest.importorskip("test._test_multiprocessing",
                               reason="the stdlib test package is not installed")

pytestmark = pytest.mark.timeout(180)


class _CoremapMixin(mp_tests.BaseMixin):
    TYPE = "processes"
    Pool = staticmethod(cm.Pool)


class TestPool(mp_tests._TestPool, _CoremapMixin, unittest.TestCase):
    pass


@mock.patch("multiprocessing.Pool", cm.Pool)
class TestPoolWorkerErrors(mp_tests._TestPoolWorkerErrors, _CoremapMixin, unittest.TestCase):
    pass


_USE_COREMAP = "import multiprocessing, coremap\nmultiprocessing.Pool = coremap.Pool\n"


def _assert_python_ok_with_coremap(real):
    def run(*args, **kwargs):
        if len(args) == 2 and args[0] == "-c":  # the script runs coremap.Pool too
            args = ("-c", _USE_COREMAP + args[1])
        return real(*args, **kwargs)

    return run


@mock.patch("multiprocessing.Pool", cm.Pool)
class TestPoolWorkerLifetime(mp_tests._TestPoolWorkerLifetime, _CoremapMixin,
                             unittest.TestCase):
    def test_worker_finalization_via_atexit_handler_of_multiprocessing(self):
        # the original runs a script in a fresh interpreter, where the patch above
        # does not reach: run the same script with multiprocessing.Pool = coremap.Pool
        helper = mp_tests.test.support.script_helper
        with mock.patch.object(helper, "assert_python_ok",
                               _assert_python_ok_with_coremap(helper.assert_python_ok)):
            super().test_worker_finalization_via_atexit_handler_of_multiprocessing()
