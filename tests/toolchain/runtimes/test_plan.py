"""The executor core (``toolchain.runtimes.plan``) on hand-made steps: the scheduler's
ownership and release rules, blocks of images, float16 rounding and the errors of a step.

Both formats run on this core; their own tests show it on real layers and ops. Here every rule
is checked on its own, with steps that record what they were allowed to do.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.errors import ModelError
from toolchain.runtimes import plan
from toolchain.runtimes.plan import Plan, Step, to_float16, writable
from toolchain.runtimes.registry import Registry

OPS = Registry("op")


def _step(name, inputs, outputs=None, fn=None, view=False, **fields):
    def negate(args, owned):  # in place when allowed, as activations do
        return np.negative(args[0], out=writable(args[:1], owned))
    return Step("neg", name, fn or negate, tuple(inputs), tuple(outputs or (name,)), OPS,
                view=view, **fields)


def _by_name(steps):
    return {step.name: step for step in steps}


def test_a_step_owns_an_input_that_nothing_reads_later():
    steps = [_step("a", ["x"]), _step("b", ["a"]), _step("c", ["a"]), _step("d", ["c"])]
    Plan(steps, ["d"], feeds_owned=True)
    owned = {step.name: step.owned for step in steps}
    # "a" is read by b and c: only c, its last reader, may overwrite it.
    assert owned == {"a": (True,), "b": (False,), "c": (True,), "d": (True,)}
    assert [step.release for step in steps] == [("x",), ("b",), ("a",), ("c",)]


def test_outputs_constants_and_caller_feeds_are_never_overwritten():
    steps = [_step("a", ["x"]), _step("b", ["a"]), _step("c", ["k"]), _step("d", ["c"])]
    Plan(steps, ["a", "d"], consts={"k": np.ones(2)})
    owned = _by_name(steps)
    assert owned["a"].owned == (False,)  # x: the caller's array (feeds_owned=False)
    assert owned["b"].owned == (False,)  # a: an output
    assert owned["c"].owned == (False,)  # k: a constant
    assert owned["d"].owned == (True,)


def test_views_keep_their_source_alive():
    """v is a view of a: overwriting v (or a) while the other is still read would corrupt it."""
    steps = [_step("a", ["x"]), _step("v", ["a"], view=True), _step("b", ["v"]),
             _step("c", ["a"]), _step("w", ["c"], view=True), _step("d", ["w"])]
    Plan(steps, ["b", "d"], feeds_owned=True)
    owned = {step.name: step.owned for step in _by_name(steps).values()}
    assert owned["b"] == (False,)  # a is read after b, through c
    assert owned["c"] == (True,)  # a's last reader (v is dead by then)
    assert owned["d"] == (True,)  # w views c, which nothing else reads
    views_of_an_output = [_step("a", ["x"]), _step("v", ["a"], view=True), _step("b", ["v"])]
    Plan(views_of_an_output, ["a", "b"], feeds_owned=True)
    assert views_of_an_output[2].owned == (False,)  # v shows the output a


def test_an_input_read_twice_by_one_step_is_not_owned():
    add = _step("s", ["a", "a"], fn=lambda args, owned: args[0] + args[1])
    steps = [_step("a", ["x"]), add]
    Plan(steps, ["s"], feeds_owned=True)
    assert add.owned == (False, False)


def test_in_place_results_equal_fresh_ones_and_spare_what_is_read_later():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    steps = [_step("a", ["x"]), _step("b", ["a"]), _step("c", ["a"])]
    outputs = Plan(steps, ["b", "c"], feeds_owned=True).run({"x": x.copy()})
    np.testing.assert_array_equal(outputs["b"], x)
    np.testing.assert_array_equal(outputs["c"], x)


def test_blocks_are_sized_from_the_first_image_and_keep_results(monkeypatch):
    seen = []

    def double(args, owned):
        seen.append(len(args[0]))
        return args[0] * 2

    monkeypatch.setattr(plan, "BLOCK_BYTES", 3 * 4 * 8)  # 3 images of 8 float32 values
    executor = Plan([_step("y", ["x"], fn=double)], ["y"])
    x = np.arange(10 * 8, dtype=np.float32).reshape(10, 8)
    np.testing.assert_array_equal(executor.run({"x": x})["y"], x * 2)
    assert executor.image_bytes == 32 and executor.block == 3
    assert seen == [1, 3, 3, 3]  # the measuring image, then blocks of 3
    empty = Plan([_step("y", ["x"], fn=double)], ["y"])
    assert empty.run({"x": x[:0]})["y"].shape == (0, 8) and empty.block is None  # no measure
    declared = Plan([_step("y", ["x"], fn=double)], ["y"], image_bytes=4 * 4)  # as if 4 values
    seen.clear()
    declared.run({"x": x})
    assert seen == [6, 4]  # blocks of 6 from the declared size; groups of a fixed size:
    seen.clear()
    stacked = declared.run({"x": x}, group=5, stacked={"y"})
    assert seen == [5, 5] and stacked["y"].shape == (2, 5, 8)


def test_inputs_of_different_batch_sizes_are_refused():
    steps = [_step("s", ["a", "b"], fn=lambda args, owned: args[0] + args[1])]
    with pytest.raises(ModelError, match=r"batch sizes differ: \[2, 3\]"):
        Plan(steps, ["s"]).run({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})


def test_float16_rounding_of_outputs():
    steps = [_step("y", ["x"], fn=lambda args, owned: args[0] / 3, round16=(True,))]
    y = Plan(steps, ["y"]).run({"x": np.ones((2, 2), np.float32)})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.float32(np.float16(1 / 3)))
    assert to_float16(np.int32(7)) == 7 and to_float16(np.arange(3)).dtype.kind == "i"
    assert to_float16(np.float64(0.1)) == np.float64(0.1)  # a scalar, not an array


def test_a_failing_step_is_a_model_error_with_its_cause():
    def broken(args, owned):
        return args[0] @ np.ones((5, 5))

    steps = [_step("mm", ["x"], fn=broken)]
    with pytest.raises(ModelError, match=r"^op 'mm' \(neg\) failed: ValueError: ") as error:
        Plan(steps, ["mm"]).run({"x": np.ones((2, 3))})
    assert isinstance(error.value.__cause__, ValueError)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match=r"op 'mm' \(neg\) reads 'x', which no input"):
        Plan(steps, ["mm"]).run({"z": np.ones((2, 3))})


def test_results_are_checked_against_declared_shapes():
    executor = Plan([_step("y", ["x"], declared=((1, 3),))], ["y"], image_bytes=12)
    assert executor.run({"x": np.ones((4, 3))})["y"].shape == (4, 3)  # for any batch
    with pytest.raises(ModelError, match=r"op 'y' \(neg\) computed shape \(4, 2\), the program "
                                         r"declares \(1, 3\)"):
        executor.run({"x": np.ones((4, 2))})


def test_executed_steps_are_traced_only_when_asked():
    registry = Registry("layer")
    steps = [Step("relu", "r", lambda args, owned: args[0], ("x",), ("r",), registry)]
    Plan(steps, ["r"]).run({"x": np.ones(2)})
    assert registry.executed is None
    registry.executed = set()
    Plan(steps, ["r"]).run({"x": np.ones(2)})
    assert registry.executed == {"relu"}
