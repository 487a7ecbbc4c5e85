"""The repair's options, written once for every target that repairs (targets/_repair_options.py):
the same checks and defaults under each target's own flags."""

from __future__ import annotations

import pytest

from targets._repair_options import RepairOptions
from targets.coreml import CoreMLOptions
from targets.tflite import TFLiteOptions
from toolchain.errors import UsageError
from toolchain.options import leaves
from toolchain.statistics import Thresholds

BOTH = [pytest.param(TFLiteOptions, "tflite", id="tflite"),
        pytest.param(CoreMLOptions, "coreml", id="coreml")]


@pytest.mark.parametrize("options, flag", BOTH)
@pytest.mark.parametrize("field, value, message", [
    ("repair_agreement", 0.0, "--{}-repair-agreement 0.0 is not in (0, 1]"),
    ("max_size_ratio", 1.5, "--{}-max-size-ratio 1.5 is not in (0, 1]"),
    ("tuning_images", 0, "--{}-tuning-images must be at least 1"),
])
def test_bad_repair_options_are_one_line_errors_naming_the_targets_flag(options, flag, field,
                                                                       value, message):
    with pytest.raises(UsageError) as raised:
        options(**{field: value}).validate()
    assert raised.value.message == message.format(flag)


def test_each_target_repairs_its_own_precision_with_the_same_defaults():
    """The target is the verifier's threshold for the precision, the budget its default."""
    cases = [(TFLiteOptions(), "int8", 0.98, 0.5),
             (TFLiteOptions(variant="dynamic"), "dynamic", 0.98, 0.5),
             (TFLiteOptions(variant="float16"), "float16", 0.995, 0.75),
             (CoreMLOptions(precision="int8"), "int8", 0.98, 0.5),
             (CoreMLOptions(precision="float16"), "float16", 0.995, 0.75)]
    for options, quantized, target, budget in cases:
        assert isinstance(options, RepairOptions)
        assert (options.quantized, options.target_agreement, options.size_ratio) == (
            quantized, target, budget), options
    given = CoreMLOptions(precision="int8", repair_agreement=0.9, max_size_ratio=0.3)
    assert (given.target_agreement, given.size_ratio) == (0.9, 0.3)


@pytest.mark.parametrize("options", [TFLiteOptions(), CoreMLOptions(precision="int8")],
                         ids=["tflite", "coreml"])
def test_a_build_aims_each_repair_at_its_own_verifiers_threshold(options):
    thresholds = Thresholds()
    raised = Thresholds(int8=type(thresholds.int8)(top1_agreement=0.99))
    assert options.aimed_at(thresholds).target_agreement == 0.98
    assert options.aimed_at(raised).target_agreement == 0.99
    given = type(options)(repair_agreement=0.95, **{options.QUANTIZED: "int8"})
    assert given.aimed_at(raised) is given


@pytest.mark.parametrize("options, first", [(TFLiteOptions, ["variant", "calibration_images"]),
                                            (CoreMLOptions, ["format", "precision"])],
                         ids=["tflite", "coreml"])
def test_a_targets_own_choices_lead_its_options(options, first):
    names = [leaf.name for leaf in leaves(options)]
    assert names == [*first, "repair_agreement", "max_size_ratio", "tuning_images",
                     "no_repair", "explain"]
