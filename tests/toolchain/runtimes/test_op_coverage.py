"""The meta-test: every registered layer kind and op type has a test that runs it.

The conftest of this folder records, during each fast test, the kinds of the plan steps that
ran; this test runs after all of them. A name registered but never executed is an op nobody
has checked against a reference: add a test for it (or, if it truly cannot be tested, take it
out of the registry so that models using it get an UnsupportedLayer).
"""

from __future__ import annotations

import pytest

from toolchain.runtimes.registry import Registry


def test_every_registered_layer_and_op_is_executed_by_a_test(op_coverage):
    registries, executed, incomplete = op_coverage
    if incomplete:
        pytest.skip(f"op coverage needs every fast test of this folder ({incomplete})")
    untested = {registry.noun: sorted(registry.names() - executed[registry.noun])
                for registry in registries}
    assert untested == {registry.noun: [] for registry in registries}, (
        f"registered but run by no test: {untested}")


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
