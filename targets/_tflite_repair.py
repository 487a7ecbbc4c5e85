"""Int8 that passes: find the layers that break a full-integer TFLite model, keep just those in
float, and re-measure (the TFLite target's repair stage; docs/ARCHITECTURE.md,
"Quantization: diagnosis and repair").

Full-integer int8 of a real model can lose agreement with its original (a TF for Poets MobileNet
agreed on 0.94 of real photos, a random-weight MobileNet v3 small on 0.50 of its tuning images):
a few layers often carry most of the error. TensorFlow's own tools find and fix them, by hand;
this module closes the loop for full-integer TFLite (the search itself, shared with Core ML, is
:mod:`targets._repair`):

1. **Calibrate once.** The converter calibrates on the training images (as the int8 artifact
   is) and stops there (``_experimental_calibrate_only``); every candidate below is one cheap
   ``mlir_quantize`` pass over that calibrated model with some layers denylisted (the
   ``denylisted_nodes`` of TFLite's ``QuantizationDebugger``), then the same uint8 interface,
   or a float input where the uint8 one cannot carry the preprocessing (:data:`FLOAT_INPUT`).
2. **Diagnose.** ``tf.lite.experimental.QuantizationDebugger`` gives each quantized layer's error
   relative to its quantization step (RMSE / scale); and each layer's harm is measured
   directly: the model with only that layer quantized, its mean total-variation distance from
   the original's probabilities on the first ``RANKING_IMAGES`` tuning images.
3. **Repair.** First a run of float layers from the input (the model's first layers, in
   lengths growing by half, then the gap before the first that agrees): activations are int8
   here, and only inside a run of float layers do they stay float, at almost no size (the
   first layers hold few weights). Then layers go back to float one at a time on top of the
   best run, most harmful first, each re-measured and kept only when it makes the model agree
   better, until the model agrees with the original on the tuning set; a candidate that would
   exceed the size budget (a fraction of the float32 model) is passed over. The outcome,
   repaired or not, says exactly where it stopped and why; when not, also whether a larger
   budget could help (every layer but the last in float, measured whatever its size) and what
   the uint8 input alone costs (:func:`input_clause`).

The tuning set is the validation split (:func:`tuning_set`), never the testing split the
verifier judges on, so its judgement of the repaired artifact stays honest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from targets import Source
from targets._repair import Repair, origin_text, search
from targets._tuning import MIN_TUNING, original, tuning_set
from toolchain import patches
from toolchain.errors import ConversionError, first_line

__all__ = ["FLOAT_INPUT", "MIN_TUNING", "Repair", "origin_text", "repair", "tuning_set"]

#: The name a repair gives the model's input among its float layers. An app feeds raw 0..255
#: pixels to a uint8 input, which reach the model as (pixel - zero point) × scale; with a
#: preprocessing mean of 127.5 the zero point is no whole number, so every pixel arrives half a
#: step off, and no float layer removes that. A repaired model may take a float input instead
#: (normalized per its metadata, as the ``dynamic`` variant's is; still uint8 out and
#: full-integer wherever its layers are quantized). On a MobileNet v2 0.35/96 trained here, the
#: offset alone changed the original's decision on 25 of 600 photos; the repair with a uint8
#: input agreed on 0.9517 of them, with a float input on 0.9767, and on 0.9821 of 2400 photos
#: drawn after this was designed.
FLOAT_INPUT = "float input"
#: Below this many steps of error (see :func:`input_steps`) a uint8 input counts as exact.
INEXACT_INPUT = 0.01


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
        """The calibrated model quantized with ``float_layers`` kept float: uint8 in and out
        (float in when :data:`FLOAT_INPUT` is one of them), or, with ``numeric_verify``, the
        debugger's instrumented model (float in and out)."""
        from tensorflow.lite.python import convert

        tf = self._tf
        given = tf.float32 if numeric_verify or FLOAT_INPUT in float_layers else tf.uint8
        with patches.quantized_input_warning_off(), patches.quantizer_chatter_off():
            return bytes(convert.mlir_quantize(
                self.calibrated, input_data_type=given,
                output_data_type=tf.float32 if numeric_verify else tf.uint8,
                enable_numeric_verify=numeric_verify,
                denylisted_nodes=[name for name in float_layers if name != FLOAT_INPUT]))

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


def probabilities(model: bytes, pixels: np.ndarray, preprocessing) -> np.ndarray:
    """A TFLite model's probabilities for uint8 ``pixels``, fed as an app feeds it: the raw
    pixels to a uint8 input, ``preprocessing`` applied for a float one; a quantized output is
    expanded with its scale and zero point."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model, num_threads=2)
    interpreter.allocate_tensors()
    given = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    scale, zero = output["quantization"]
    raw = np.dtype(given["dtype"]) == np.uint8
    rows = []
    for image in pixels:
        fed = image[None] if raw else preprocessing.apply(image[None])
        interpreter.set_tensor(given["index"], fed.astype(given["dtype"]))
        interpreter.invoke()
        row = interpreter.get_tensor(output["index"])[0].astype(np.float32)
        rows.append((row - zero) * np.float32(scale) if scale else row)
    return np.stack(rows)


class _Candidates:
    """Full-integer candidates over one calibration (:class:`_Quantizer`): a layer in float is
    a ``denylisted_nodes`` entry, named as the debugger names it. Activations are quantized too,
    so the repair tries runs of float layers from the input first. When the uint8 input cannot
    carry the preprocessing exactly (``input_steps``, :func:`input_steps`), the input itself is
    the first layer (:data:`FLOAT_INPUT`), so every run from the input takes a float input."""

    quantizes_activations = True

    def __init__(self, quantizer: _Quantizer, preprocessing, input_steps: float = 0.0) -> None:
        self.quantizer, self.preprocessing = quantizer, preprocessing
        self.input_steps = input_steps
        self._errors = None

    def layer_errors(self) -> list[tuple[str, str, float]]:
        if self._errors is None:
            found = self.quantizer.layer_errors()
            if self.input_steps > INEXACT_INPUT:
                found = [(FLOAT_INPUT, "QUANTIZE", self.input_steps), *found]
            self._errors = found
        return self._errors

    def build(self, float_layers: Sequence[str]) -> tuple[bytes, int]:
        model = self.quantizer.quantize(float_layers)
        return model, len(model)

    def alone(self, name: str) -> bytes:
        return self.quantizer.quantize([other for other, _, _ in self.layer_errors()
                                        if other != name])

    def probabilities(self, model: bytes, pixels: np.ndarray) -> np.ndarray:
        return probabilities(model, pixels, self.preprocessing)


def _as_fed(preprocessing, scale: float, zero: int):
    """The preprocessing a uint8 input of ``scale`` and ``zero`` point applies to raw pixels."""
    return replace(preprocessing, scale=float(scale), offset=(-float(zero) * float(scale),) * 3)


def input_steps(preprocessing, scale: float, zero: int) -> float:
    """How far, in input quantization steps, a raw pixel fed to a uint8 input of ``scale`` and
    ``zero`` point lands from its ``preprocessing`` at worst (0.5 for a mean of 127.5, whose zero
    point is no whole number; 0 for an exact one)."""
    seen = _as_fed(preprocessing, scale, zero)
    ends = np.array([[0] * 3, [255] * 3], np.uint8)  # the offset is affine: largest at an end
    return float(np.abs(seen.apply(ends) - preprocessing.apply(ends)).max()) / float(scale)


def input_clause(source: Source, function, pixels: np.ndarray, reference: np.ndarray,
                 scale: float, zero: int) -> str:
    """The reason's clause on what the uint8 input alone costs, empty when nothing.

    An app feeds raw 0..255 pixels, which reach the model as (pixel - ``zero``) × ``scale``; a
    preprocessing mean of 127.5 has no integer zero point, so every pixel arrives half a step
    (about 0.004) off. The original ``function`` is run (:func:`original`) on exactly that input,
    a preprocessing of its own, and compared with its ``reference`` decisions: on a
    random-weight MobileNet v1 0.50/224 this alone changed 5 of 29 tuning images (0.8276, what
    int8 agreed on even with every layer in float); on the demo's MobileNet v3 small, none. No
    float layer removes that offset, only a float input (:data:`FLOAT_INPUT`), which every run
    of the repair from the input takes."""
    pre = source.preprocessing
    seen = _as_fed(pre, scale, zero)
    changed = int(np.sum(original(replace(source, preprocessing=seen), pixels, function)
                         .argmax(1) != reference.argmax(1)))
    if not changed:
        return ""
    off = input_steps(pre, scale, zero) * float(scale)
    return (f"; the uint8 input alone (zero point {zero}, scale {scale:.6g}: each pixel reaches "
            f"the model up to {off:.2g} off its preprocessing) already changes the original's "
            f"decision on {changed} of {len(pixels)} tuning images, which only a float input "
            f"removes")


def float32_model(function) -> bytes:
    """The float32 TFLite model of ``function`` (the size budget's yardstick)."""
    import tensorflow as tf

    return bytes(tf.lite.TFLiteConverter.from_concrete_functions([function]).convert())


def repair(source: Source, representative: Callable, *, calibration_images: int, tuning_images: int,
           target: float, max_size_ratio: float, input_quantization: tuple[float, int],
           diagnose_always: bool = False, repair_allowed: bool = True) -> Repair:
    """``representative()`` gives a fresh calibration dataset (the int8 artifact's), and
    ``input_quantization`` the int8 artifact's uint8 input (scale, zero point).

    Measure pure int8 on the tuning set; when it misses ``target`` (or ``diagnose_always``),
    diagnose every layer; when it misses ``target`` and ``repair_allowed``, repair
    (:func:`targets._repair.search`) within the budget of ``max_size_ratio`` of the float32
    model's size. ``model`` of the outcome is the repaired TFLite model (no metadata yet)."""
    try:
        paths, pixels, origin = tuning_set(source, calibration_images, tuning_images)
        function = source.concrete_function()  # one (a frozen graph's is rebuilt per call)
        quantizer = _Quantizer(function, representative)
        reference = original(source, pixels, function)
        steps = input_steps(source.preprocessing, *input_quantization)
        outcome = search(_Candidates(quantizer, source.preprocessing, steps), paths=paths,
                         origin=origin, pixels=pixels, reference=reference, target=target,
                         float32_size=len(float32_model(function)),
                         max_size_ratio=max_size_ratio, diagnose_always=diagnose_always,
                         repair_allowed=repair_allowed)
        if outcome.reason:  # not repaired: say what the uint8 input alone costs
            outcome = replace(outcome, reason=outcome.reason + input_clause(
                source, function, pixels, reference, *input_quantization))
        return outcome
    except ConversionError:
        raise
    except (ValueError, RuntimeError) as error:  # the converter's and interpreter's errors
        raise ConversionError(f"int8 repair failed: {type(error).__name__}: "
                              f"{first_line(error)}") from error
