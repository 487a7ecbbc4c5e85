"""The repair's options, one class for every target that repairs a quantized model (TFLite's
int8, Core ML's int8 and float16 weights; docs/ARCHITECTURE.md, "Quantization: diagnosis and
repair").

The five options (what the repair aims at, its size budget, its tuning set, and the two
switches) mean the same for each target, so they are written once here; each target's flags
take its prefix (``--tflite-max-size-ratio``, ``--coreml-max-size-ratio``) and its one-line
errors name them. A target's options class lists its own choices first and then these::

    class TFLiteOptions(RepairOptions, _TFLiteChoice): ...

(a dataclass orders fields from the last base to the first, so ``--tflite-variant`` leads its
``--help`` section). Which precision is being repaired is the target's business
(:attr:`RepairOptions.QUANTIZED`: the field that names it); from it come the default target,
the verifier's threshold for that precision, and the default size budget.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from toolchain.errors import UsageError
from toolchain.options import Options, option
from toolchain.statistics import AGREEMENT

#: The default size budget per precision, as a fraction of the float32 model's size (float16
#: weights are already half of it).
MAX_SIZE_RATIO = {"int8": 0.5, "dynamic": 0.5, "float16": 0.75}
#: What the repaired model is called, in the help every target shares.
REPAIRED = "the repaired model (model_<precision>_mixed)"


@dataclass(frozen=True, kw_only=True)
class RepairOptions(Options):
    """Aim, budget, tuning set and switches of a quantized model's repair, for any target."""

    #: The field of the target's options that names the precision being repaired.
    QUANTIZED: typing.ClassVar[str] = "precision"

    repair_agreement: float | None = option(
        None, "least top-1 agreement with the original that the quantized model must reach on "
              "the tuning set (validation images, never testing ones); below it its layers are "
              f"diagnosed, and the most harmful are kept in float in {REPAIRED}",
        metavar="FRACTION", shown_default="the verifier's threshold for the precision: 0.98 "
                                          "int8 and dynamic, 0.995 float16; in a build, its "
                                          "own --int8-agreement or --float16-agreement")
    max_size_ratio: float | None = option(
        None, f"largest size of {REPAIRED}, as a fraction of the float32 model's",
        metavar="FRACTION", shown_default="0.5 int8, 0.75 float16")
    tuning_images: int = option(100, "validation images (topped up with training images when "
                                     "there are fewer than 20) that the quantized model is "
                                     "measured and repaired on; never testing ones")
    no_repair: bool = option(False, f"never write {REPAIRED}")
    explain: bool = option(False, "measure every quantized layer's error even when none needs "
                                  "help (the artifact's .quantization.json)")

    @property
    def quantized(self) -> str:
        """The precision being repaired (``int8``, ``dynamic``, ``float16``)."""
        return getattr(self, self.QUANTIZED)

    @property
    def target_agreement(self) -> float:
        """``repair_agreement``, or the verifier's default threshold for the precision."""
        if self.repair_agreement is not None:
            return self.repair_agreement
        return AGREEMENT[self.quantized]

    @property
    def size_ratio(self) -> float:
        """``max_size_ratio``, or the default budget for the precision."""
        if self.max_size_ratio is not None:
            return self.max_size_ratio
        return MAX_SIZE_RATIO.get(self.quantized, MAX_SIZE_RATIO["int8"])

    def aimed_at(self, thresholds) -> RepairOptions:
        """A build's repair aims at the agreement its verifier will demand of the precision
        (``--int8-agreement 0.99`` raises it too), unless ``repair_agreement`` is given."""
        if self.repair_agreement is not None:
            return self
        aim = thresholds.of(self.quantized).top1_agreement
        return dataclasses.replace(self, repair_agreement=aim)

    def validate(self) -> None:
        flag = "--" + type(self).FLAG_PREFIX.replace("_", "-")
        if self.tuning_images < 1:
            raise UsageError(f"{flag}tuning-images must be at least 1")
        if self.repair_agreement is not None and not 0.0 < self.repair_agreement <= 1.0:
            raise UsageError(f"{flag}repair-agreement {self.repair_agreement} is not in (0, 1]")
        if self.max_size_ratio is not None and not 0.0 < self.max_size_ratio <= 1.0:
            raise UsageError(f"{flag}max-size-ratio {self.max_size_ratio} is not in (0, 1]")
