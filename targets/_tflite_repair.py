"""Int8 that passes: find the layers that break a full-integer TFLite model, keep just those in
float, and re-measure (the TFLite target's repair stage; docs/ARCHITECTURE.md, "Quantization").

Full-integer int8 of a real model can lose agreement with its original (a TF for Poets MobileNet
agreed on 0.94 of real photos, a random-weight MobileNet v3 small on 0.50 of its tuning images):
a few layers often carry most of the error. TensorFlow's own tools find and fix them, by hand;
this module closes the loop:

1. **Calibrate once.** The converter calibrates on the training images (as the int8 artifact
   is) and stops there (``_experimental_calibrate_only``); every candidate below is one cheap
   ``mlir_quantize`` pass over that calibrated model with some layers denylisted (the
   ``denylisted_nodes`` of TFLite's ``QuantizationDebugger``), then the same uint8 interface.
2. **Diagnose.** ``tf.lite.experimental.QuantizationDebugger`` gives each quantized layer's error
   relative to its quantization step (RMSE / scale); and each layer's harm is measured
   directly: the model with only that layer quantized, its mean total-variation distance from
   the original's probabilities on the first :data:`RANKING_IMAGES` tuning images.
3. **Repair.** Layers go back to float one at a time, most harmful first, each re-measured
   and kept only when it makes the model agree better (:func:`_repair`), until the model
   agrees with the original on the tuning set; a layer that would exceed the size budget (a
   fraction of the float32 model) is passed over. The outcome, repaired or not, says
   exactly where it stopped and why.

The tuning set is the validation split (:func:`tuning_set`), never the testing split the
verifier judges on, so its judgement of the repaired artifact stays honest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from targets import Source
from toolchain import patches
from toolchain.errors import ConversionError, UnreadableImage, first_line
from toolchain.images import load_rgb

#: Fewer tuning images than this cannot show much (one disagreement in 20 is 0.95): a smaller
#: validation split is topped up to it with training images.
MIN_TUNING = 20
#: Tuning images each layer's harm alone is measured on: one quantization and one run per layer,
#: so this bounds the diagnosis' cost; the ranking needs no more (the repair steps use them all).
RANKING_IMAGES = 16


@dataclass(frozen=True)
class Layer:
    """One quantized layer, by the name of its output tensor (what ``denylisted_nodes`` takes)."""

    name: str
    op: str
    rmse_per_step: float  # the debugger's sqrt(mean squared error) / quantization scale
    harm: float  # mean total-variation distance from the original with only this layer int8

    def record(self) -> dict:
        return {"name": self.name, "op": self.op, "rmse_per_step": round(self.rmse_per_step, 5),
                "harm": round(self.harm, 5)}


@dataclass(frozen=True)
class Step:
    """One measured candidate: how many layers were float, and what that gave on tuning."""

    float_layers: int
    agreement: float
    max_abs_diff: float
    size: int
    layer: str = ""  # the layer this step tried in float ("" for pure int8)
    distance: float = 0.0  # mean total-variation distance from the original's probabilities
    kept: bool = False  # whether the layer stayed in float (it made the model agree better)

    def better_than(self, other: Step) -> bool:
        """More top-1 agreement; at equal agreement, probabilities closer to the original's."""
        return (self.agreement, -self.distance) > (other.agreement, -other.distance)

    def record(self) -> dict:
        return {"float_layers": self.float_layers, "layer": self.layer, "kept": self.kept,
                "top1_agreement": round(self.agreement, 5),
                "mean_distance": round(self.distance, 5),
                "max_abs_diff": round(self.max_abs_diff, 5), "bytes": self.size}


@dataclass(frozen=True)
class Repair:
    """What the repair stage measured and decided; ``model`` is the repaired TFLite model (no
    metadata yet) when one met ``target`` within ``budget`` bytes, else None and ``reason``."""

    tuning: tuple[Path, ...]
    tuning_from: dict[str, int]
    target: float
    float32_size: int
    budget: int
    pure: Step
    layers: tuple[Layer, ...] = ()
    steps: tuple[Step, ...] = ()
    model: bytes | None = field(default=None, repr=False)
    float_layers: tuple[str, ...] = ()
    reason: str = ""

    @property
    def kept(self) -> Step | None:
        """The step whose model was kept (the repaired one), if any."""
        return self.steps[-1] if self.model is not None else None

    @property
    def needed(self) -> bool:
        return self.pure.agreement < self.target

    def record(self) -> dict:
        """JSON for ``model_int8.quantization.json`` and the reports."""
        return {"tuning_images": len(self.tuning),
                "tuning": [str(path) for path in self.tuning],
                "tuning_from": self.tuning_from,
                "target_top1_agreement": self.target,
                "float32_bytes": self.float32_size, "budget_bytes": self.budget,
                "int8": self.pure.record(), "needed": self.needed,
                "repaired": self.model is not None,
                "float_layers": list(self.float_layers), "reason": self.reason,
                "layers": [layer.record() for layer in self.layers],
                "steps": [step.record() for step in self.steps]}


def origin_text(counts: dict[str, int]) -> str:
    """``29 validation`` or ``12 validation, 8 training``: where the tuning images came from
    (a record's ``tuning_from``)."""
    return ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)


def _readable(paths, size: int, limit: int) -> list[tuple[Path, np.ndarray]]:
    found = []
    for path in paths:
        if len(found) == limit:
            break
        try:
            found.append((path, load_rgb(path, size)))
        except UnreadableImage:
            continue
    return found


def tuning_set(source: Source, calibration_images: int,
               count: int) -> tuple[list[Path], np.ndarray, dict[str, int]]:
    """Up to ``count`` readable tuning images, their uint8 pixels, and how many came from where.

    The validation split (``source.tuning``) first: images the retrained head was not fit on.
    Training images are the wrong yardstick: the head fits them with wide margins, so int8
    rarely flips them (measured on a trained MobileNet v2: int8 agreed on 1.0 of 186 training
    images, 0.931 of 29 validation and 0.92 of 25 testing images). When fewer than
    :data:`MIN_TUNING` validation images exist, training images after the calibrating ones top
    the set up to that, then the calibrating ones. Never a testing image: those are the
    verifier's."""
    size = source.input_size
    chosen = _readable(source.tuning, size, count)
    counts = {"validation": len(chosen), "training": 0, "calibration": 0}
    if len(chosen) < min(count, MIN_TUNING):
        training = _readable(source.calibration, size, calibration_images + MIN_TUNING)
        after, calibrating = training[calibration_images:], training[:calibration_images]
        for kind, extra in (("training", after), ("calibration", calibrating)):
            take = extra[:max(0, min(count, MIN_TUNING) - len(chosen))]
            chosen += take
            counts[kind] = len(take)
    if not chosen:
        raise ConversionError("no readable validation or training image to tune int8 on")
    return [path for path, _ in chosen], np.stack([pixels for _, pixels in chosen]), counts


class _Quantizer:
    """One calibration, many quantizations: the model calibrated on the training images, then
    quantized with any set of layers kept float, always with the int8 artifact's uint8 input and
    output."""

    def __init__(self, function, representative) -> None:
        import tensorflow as tf

        self._tf = tf
        self._representative = representative  # () -> a fresh representative dataset
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative()
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
        converter._experimental_calibrate_only = True  # the switch the debugger itself sets
        with patches.quantized_input_warning_off():
            self.calibrated = bytes(converter.convert())

    def quantize(self, float_layers, *, numeric_verify: bool = False) -> bytes:
        """The calibrated model quantized with ``float_layers`` kept float: uint8 in and out,
        or, with ``numeric_verify``, the debugger's instrumented model (float in and out)."""
        from tensorflow.lite.python import convert

        io_type = self._tf.float32 if numeric_verify else self._tf.uint8
        with patches.quantized_input_warning_off():
            return bytes(convert.mlir_quantize(
                self.calibrated, input_data_type=io_type, output_data_type=io_type,
                enable_numeric_verify=numeric_verify, denylisted_nodes=list(float_layers)))

    def layer_errors(self) -> list[tuple[str, str, float]]:
        """(output tensor, op, RMSE / scale) of every quantized layer, from TFLite's
        QuantizationDebugger run on the calibration images, over the model already calibrated
        (the debugger given a converter would calibrate it again)."""
        tf = self._tf
        with patches.quantized_input_warning_off():
            debugger = tf.lite.experimental.QuantizationDebugger(
                quant_debug_model_content=self.quantize((), numeric_verify=True),
                debug_dataset=self._representative())
            debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
        dump.seek(0)
        rows = []
        for row in csv.DictReader(dump):
            scale = float(row["scale"])
            error = np.sqrt(float(row["mean_squared_error"])) / scale if scale > 0 else 0.0
            rows.append((row["tensor_name"], row["op_name"], float(error)))
        return rows


def _probabilities(model: bytes, pixels: np.ndarray) -> np.ndarray:
    """The model's probabilities for uint8 ``pixels`` (its uint8 input and output)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model, num_threads=2)
    interpreter.allocate_tensors()
    given = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    scale, zero = output["quantization"]
    rows = []
    for image in pixels:
        interpreter.set_tensor(given["index"], image[None].astype(given["dtype"]))
        interpreter.invoke()
        rows.append((interpreter.get_tensor(output["index"])[0].astype(np.float32) - zero)
                    * np.float32(scale))
    return np.stack(rows)


def _distance(got: np.ndarray, reference: np.ndarray) -> float:
    """Mean total-variation distance between two sets of probability rows."""
    return float(np.abs(got - reference).sum(axis=1).mean() / 2)


def _measure(model: bytes, pixels: np.ndarray, reference: np.ndarray, float_layers: int,
             layer: str = "") -> Step:
    got = _probabilities(model, pixels)
    agreement = float(np.mean(got.argmax(1) == reference.argmax(1)))
    return Step(float_layers, agreement, float(np.abs(got - reference).max()), len(model), layer,
                _distance(got, reference))


def _original(source: Source, function, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return np.concatenate([
        np.asarray(function(tf.constant(source.preprocessing.apply(image[None]),
                                        dtype=tf.float32)))
        for image in pixels])


def _float32_size(function) -> int:
    import tensorflow as tf

    return len(tf.lite.TFLiteConverter.from_concrete_functions([function]).convert())


def repair(source: Source, representative: Callable, *, calibration_images: int, tuning_images: int,
           target: float, max_size_ratio: float, diagnose_always: bool = False,
           repair_allowed: bool = True) -> Repair:
    """``representative()`` gives a fresh calibration dataset (the int8 artifact's).

    Measure pure int8 on the tuning set; when it misses ``target`` (or ``diagnose_always``),
    diagnose every layer; when it misses ``target`` and ``repair_allowed``, repair
    (:func:`_repair`) within the budget of ``max_size_ratio`` of the float32 model's size."""
    try:
        paths, pixels, origin = tuning_set(source, calibration_images, tuning_images)
        function = source.concrete_function()  # one (a frozen graph's is rebuilt per call)
        quantizer = _Quantizer(function, representative)
        reference = _original(source, function, pixels)
        float32 = _float32_size(function)
        budget = int(max_size_ratio * float32)
        pure = _measure(quantizer.quantize(()), pixels, reference, 0)
        outcome = Repair(tuple(paths), origin, target, float32, budget, pure)
        if not (outcome.needed or diagnose_always):
            return outcome
        layers = _diagnose(quantizer, pixels, reference)
        outcome = Repair(tuple(paths), origin, target, float32, budget, pure, layers)
        if not (outcome.needed and repair_allowed):
            return outcome
        return _repair(outcome, quantizer, pixels, reference)
    except ConversionError:
        raise
    except (ValueError, RuntimeError) as error:  # the converter's and interpreter's errors
        raise ConversionError(f"int8 repair failed: {type(error).__name__}: "
                              f"{first_line(error)}") from error


def _diagnose(quantizer: _Quantizer, pixels, reference) -> tuple[Layer, ...]:
    """Every quantized layer with its step-relative error and its measured harm alone, most
    harmful first (ties: larger step-relative error first)."""
    errors = quantizer.layer_errors()
    names = [name for name, _, _ in errors]
    pixels, reference = pixels[:RANKING_IMAGES], reference[:RANKING_IMAGES]
    layers = []
    for name, op, error in errors:
        alone = _probabilities(quantizer.quantize([other for other in names if other != name]),
                               pixels)
        layers.append(Layer(name, op, error, _distance(alone, reference)))
    return tuple(sorted(layers, key=lambda layer: (-layer.harm, -layer.rmse_per_step)))


def _repair(outcome: Repair, quantizer: _Quantizer, pixels, reference) -> Repair:
    """Layers go back to float one at a time, most harmful first, each re-measured on every
    tuning image and kept only when it makes the model agree better (errors do not add up: on a
    trained MobileNet v2, 8 layers in float gave 0.966 and 16 gave 0.897), until the target is
    met. A layer that would take the model over the budget is passed over; smaller ones may
    still fit."""
    kept: list[str] = []
    steps: list[Step] = []
    best, model, over = outcome.pure, None, 0
    for layer in outcome.layers:
        candidate = quantizer.quantize([*kept, layer.name])
        if len(candidate) > outcome.budget:
            over += 1
            continue
        step = _measure(candidate, pixels, reference, len(kept) + 1, layer.name)
        if step.better_than(best):
            step = replace(step, kept=True)
            kept.append(layer.name)
            best, model = step, candidate
        steps.append(step)
        if best.agreement >= outcome.target:
            return _replace(outcome, steps, tuple(kept), model, "")
    tried = (f"{len(outcome.layers)} layer(s) tried in float one at a time, {len(kept)} kept "
             f"(each made it agree better)")
    if over:
        tried += (f", {over} passed over: each would have taken the model over the budget of "
                  f"{outcome.budget / outcome.float32_size:.2f} of float32's size")
    return _replace(outcome, steps, (), None,
                    f"{tried}; the best agreed on {best.agreement:.4f} of {len(pixels)} tuning "
                    f"images (< {outcome.target})")


def _replace(outcome: Repair, steps, float_layers, model, reason) -> Repair:
    return replace(outcome, steps=tuple(steps), float_layers=tuple(float_layers), model=model,
                   reason=reason)
