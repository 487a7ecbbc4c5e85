"""The meta-test: every registered layer kind and op type has a test that runs it.

The conftest of this folder records, during each fast test, the kinds of the plan steps that
ran; this test runs after all of them. A name registered but never executed is an op nobody
has checked against a reference: add a test for it (or, if it truly cannot be tested, take it
out of the registry so that models using it get an UnsupportedLayer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import op_coverage as op_coverage_plugin
from toolchain.runtimes.registry import Registry


def test_every_registered_layer_and_op_is_executed_by_a_test(op_coverage):
    registries, executed, incomplete = op_coverage
    if incomplete:
        pytest.skip(f"op coverage needs every fast test of this folder ({incomplete})")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("each pytest-xdist process has its own record: the run's controller judges "
                    "their union when all are done, and fails the run (tests/op_coverage.py)")
    untested = op_coverage_plugin.untested(registries, executed)
    assert untested == {registry.noun: [] for registry in registries}, (
        f"registered but run by no test: {untested}")


@pytest.mark.slow
def test_under_make_test_the_run_fails_for_an_op_no_test_ran(tmp_path):
    """The fast tests of this folder in two pytest-xdist processes, as ``make test`` runs
    them, with one more op registered that no test runs: the run fails and names it."""
    (tmp_path / "one_more_op.py").write_text(textwrap.dedent("""
        def pytest_configure(config):
            from toolchain.runtimes import mlprogram  # noqa: F401
            from toolchain.runtimes.mil_ops import OPS
            OPS.register("an_op_no_test_runs")(lambda op: None)
    """), encoding="utf-8")
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "one_more_op",
         "--numprocesses", "2", "-m", "not slow", str(Path(__file__).parent)],
        cwd=root, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "registered but run by no test: {'op': ['an_op_no_test_runs']}" in out, out


def test_a_name_registered_twice_is_an_error_at_once():
    registry = Registry("op")

    @registry.register("relu", "relu6")
    def build(op):
        return None

    with pytest.raises(ValueError, match="op type 'relu6' is registered twice"):
        registry.register("tanh", "relu6")(lambda op: None)
    with pytest.raises(ValueError, match="op type 'tanh' is registered twice"):
        registry.register("tanh", "tanh")(lambda op: None)
    assert registry.names() == {"relu", "relu6"}  # nothing of a refused registration stays
    assert registry.entry("relu", "r1").build is build


def test_an_unregistered_name_is_unsupported_and_named():
    from toolchain.errors import UnsupportedLayer

    registry = Registry("layer")
    with pytest.raises(UnsupportedLayer) as error:
        registry.entry("lrn", "norm1")
    assert str(error.value) == ("the NumPy Core ML executor does not implement layer type "
                                "'lrn' (layer 'norm1')")
    assert str(registry.unsupported("pooling", "p", "L2 pooling")).endswith(
        "layer type 'pooling' (L2 pooling) (layer 'p')")


def test_a_builder_that_fails_on_a_malformed_layer_is_a_model_error_with_the_cause():
    from toolchain.errors import ModelError

    registry = Registry("op")
    registry.register("conv")(lambda op: {}["weight"])
    with pytest.raises(ModelError, match=r"^op 'c1' \(conv\) cannot be read: KeyError: 'weight'$"
                       ) as error:
        registry.build("conv", "c1", None)
    assert isinstance(error.value.__cause__, KeyError)
