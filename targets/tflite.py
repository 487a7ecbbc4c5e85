"""TFLite target: ``model_<variant>.tflite`` with labels and normalization as TFLite metadata.

The metadata (written and read by :mod:`targets._tflite_metadata`) carries the labels, the input
normalization and the colour space, which the Android Task Library, MediaPipe Tasks and Android
Studio read from the model file itself. The written file is read back by the inspector and
compared with what was meant before it gets its final name.

Variants: ``int8`` (full-integer, uint8 input and output, calibrated on training images only),
``dynamic`` (int8 weights, float activations), ``float16`` (float16 weights) and ``float32``.
The runtimes that check an artifact (:mod:`targets._tflite_runners`): TensorFlow's
``tf.lite.Interpreter`` everywhere, and the two app runtimes where their extras install,
tflite-support's Task Library and MediaPipe Tasks, each twice: on our resized pixels, and on the
photos at their own size, which it resizes itself as the app does. All take the labels from the
metadata, never from a side file; the app runtimes take the normalization from it too.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from targets import (
    ArtifactMetadata,
    ArtifactRecord,
    ImageInput,
    Runner,
    Runners,
    Source,
    Target,
    _repair,
    _tflite_metadata,
    _tflite_repair,
    _tflite_runners,
    _tflite_weights,
    register,
)
from targets._repair_options import RepairOptions
from targets._tflite_metadata import (
    INPUT_NAME,
    LABEL_FILE,
    OUTPUT_NAME,
    PROVENANCE_FILE,
    label_text,
    record,
    with_metadata,
)
from toolchain import atomic, patches
from toolchain.backbones import Preprocessing
from toolchain.errors import ConversionError, ModelError, UsageError
from toolchain.options import Options, option

log = logging.getLogger("toolchain")

VARIANTS = ("int8", "dynamic", "float16", "float32")
#: The repaired int8 model (targets/_tflite_repair.py), written beside model_int8.tflite.
MIXED = "model_int8_mixed.tflite"
#: What int8's repair stage measured, beside model_int8.tflite (``model_dynamic`` and
#: ``model_float16`` get theirs: :func:`quantization_report`).
QUANTIZATION_REPORT = "model_int8.quantization.json"


def quantization_report(path: Path) -> Path:
    """Where the record of what ``path``'s export measured goes: ``<model>.quantization.json``
    (the repaired int8 model shares its plain model's)."""
    path = Path(path)
    stem = "model_int8" if path.name == MIXED else path.stem
    return path.with_name(f"{stem}.quantization.json")


@dataclass(frozen=True, kw_only=True)
class _TFLiteChoice(Options):
    """The TFLite target's own choices, listed before the repair's (:class:`TFLiteOptions`)."""

    variant: str = option("int8", "int8: full-integer (uint8 in and out), dynamic: int8 "
                                  "weights, float16: float16 weights, float32", choices=VARIANTS)
    calibration_images: int = option(100, "training images that calibrate int8")


@dataclass(frozen=True, kw_only=True)
class TFLiteOptions(RepairOptions, _TFLiteChoice):
    """``--tflite-variant``, ``--tflite-calibration-images``, and the repair's options
    (:class:`targets._repair_options.RepairOptions`): int8's repaired model is :data:`MIXED`;
    ``dynamic`` and ``float16`` are measured and diagnosed, never repaired."""

    QUANTIZED = "variant"

    def validate(self) -> None:
        if self.calibration_images < 1:
            raise UsageError("--tflite-calibration-images must be at least 1")
        super().validate()


def _representative(source: Source, count: int):
    """Calibration data: the Source's training images, preprocessed as in training.

    The first batch is read now, so a Source without calibration images fails before the
    converter runs. Its first two pixels are set to what pixels 0 and 255 preprocess to: the
    converter derives the uint8 input's scale and zero point from the range the calibration data
    happened to cover (tensorflow/tensorflow#53069), while apps and the Task Library feed raw
    0..255 pixels, so that range must be the full one (measured: dim images gave an input scale
    of 0.0036 instead of 1/127.5). Two pixels barely move any other tensor's range.
    """
    batches = source.calibration_batches(count)
    first = next(batches, None)
    if first is None:
        raise UsageError(f"none of the {len(source.calibration)} calibration images can be read",
                         hint="pass --image-dir with the training images")
    first = np.array(first, dtype=np.float32)
    first[0, 0, 0] = source.preprocessing.apply(np.zeros(3, np.uint8))
    first[0, 0, 1] = source.preprocessing.apply(np.full(3, 255, np.uint8))

    def dataset():
        yield [first]
        for batch in batches:
            yield [batch]
    return dataset


def _convert(source: Source, options: TFLiteOptions) -> bytes:
    import tensorflow as tf

    # A concrete function without ``trackable_obj``, on purpose: the trackable path (like
    # ``from_keras_model``) round-trips a SavedModel, and protobuf runs in pure Python on this
    # stack (tflite-support pins protobuf<4; protobuf 3.20 has no compiled wheel for Python
    # 3.11), so it took ~75 s instead of ~3 s per model here. absl's "Please consider providing
    # the trackable_obj argument" deprecation warning is therefore expected.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([source.concrete_function()])
    if options.variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if options.variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if options.variant == "int8":
        converter.representative_dataset = _representative(source, options.calibration_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with patches.quantized_input_warning_off():
        return bytes(converter.convert())


def _check_input_quantization(model: bytes, pre: Preprocessing) -> tuple[float, int]:
    """A uint8 input must turn raw pixels into the training preprocessing within one step.
    Returns its (scale, zero point), for the repair stage to tell what the input alone costs."""
    import tensorflow as tf

    scale, zero = tf.lite.Interpreter(model_content=model).get_input_details()[0]["quantization"]
    pixels = np.array([0.0, 255.0])
    for offset in pre.offset:
        error = np.abs((pixels - zero) * scale - (pixels * pre.scale + offset)).max()
        if not scale > 0 or error > max(scale, pre.scale):
            raise ConversionError(f"the int8 model's uint8 input (scale {scale:.6g}, zero point "
                                  f"{zero}) does not reproduce the preprocessing (scale "
                                  f"{pre.scale:.6g}, offset {offset:g})",
                                  hint="per-channel offsets cannot be one uint8 zero point; use "
                                       "--tflite-variant dynamic or float16")
    return float(scale), int(zero)


def interpreter_runner(path: Path, threads: int = 2) -> Runner:
    """The ``tf.lite.Interpreter`` runner with ``threads`` threads (``toolchain bench`` times
    1 and 2), fed as the verifier and a device feed it."""
    return _tflite_runners.InterpreterRunner(Path(path), _usable(Path(path)), threads)


def _usable(path: Path) -> ArtifactRecord:
    """The record of a model the runners can feed: labels in its metadata, one square image."""
    found = TFLiteTarget().inspect(path)
    if not found.labels:
        raise ModelError(f"{path} has no readable TFLite metadata with {LABEL_FILE}",
                         hint="convert it with: toolchain convert")
    if found.input_size is None:
        raise ModelError(f"{path} does not take one square RGB image")
    return found


class TFLiteTarget(Target):
    name = "tflite"
    help = "TensorFlow Lite with labels and normalization as metadata (MediaPipe Tasks, LiteRT)"
    options_class = TFLiteOptions

    def filename(self, options: TFLiteOptions) -> str:
        return f"model_{options.variant}.tflite"

    def export(self, source: Source, options: TFLiteOptions, metadata: ArtifactMetadata,
               path: Path) -> Path:
        """Validate → convert → check input quantization → embed metadata → write under a
        temporary name → inspect and compare with what was meant → final name."""
        path = Path(path)
        labels = label_text(tuple(source.labels))
        model = _convert(source, options)
        if options.variant == "int8":
            uint8_input = _check_input_quantization(model, source.preprocessing)
        self._write(with_metadata(model, source, metadata), path,
                    self.expected(source, options, metadata))
        atomic.write_text(path.parent / LABEL_FILE, labels)
        if options.variant == "int8":
            self._repair(source, options, metadata, path, uint8_input)
        elif options.variant in ("dynamic", "float16"):
            self._diagnose_weights(source, options, path, model)
        return path

    def _diagnose_weights(self, source: Source, options: TFLiteOptions, path: Path,
                          model: bytes) -> None:
        """Measure a weight-only variant on the tuning set and, when it misses the target (or
        on --tflite-explain), diagnose its layers (targets/_tflite_weights.py)."""
        report = quantization_report(path)
        report.unlink(missing_ok=True)
        if not (source.tuning or source.calibration):
            log.info("tflite: no validation or training images known, so %s is not measured "
                     "(pass --image-dir)", path.name)
            return
        try:
            outcome = _tflite_weights.diagnose(
                source, model, options.variant, tuning_images=options.tuning_images,
                target=options.target_agreement, diagnose_always=options.explain)
        except ConversionError as error:
            log.warning("tflite: %s; %s is written and will be verified as it is",
                        error.message, path.name)
            return
        said = (f"tflite: {options.variant} agrees with the original on "
                f"{outcome.pure.agreement:.4f} of {len(outcome.tuning)} tuning images "
                f"({_tflite_repair.origin_text(outcome.tuning_from)})")
        if outcome.needed:
            log.warning("%s, short of %s; %d layer(s) diagnosed in %s (%s)", said,
                        outcome.aim_text, len(outcome.layers), report.name, outcome.reason)
        else:
            log.info("%s: no help needed", said)
        _repair.write_record(report, path, None, outcome)

    def _write(self, model: bytes, path: Path, expected: ArtifactRecord) -> None:
        with atomic.replacing(path, suffix=".tflite") as tmp:
            tmp.write_bytes(model)
            self.check_written(tmp, path.name, expected)

    def _repair(self, source: Source, options: TFLiteOptions, metadata: ArtifactMetadata,
                path: Path, uint8_input: tuple[float, int]) -> None:
        """Measure int8 on the tuning set and, when it misses ``repair_agreement``, write the
        repaired model as its own artifact (targets/_tflite_repair.py). A previous run's
        repaired model and report are removed first: they belong to another model.
        ``uint8_input`` is the int8 model's input (scale, zero point)."""
        mixed, report = path.with_name(MIXED), path.with_name(QUANTIZATION_REPORT)
        for stale in (mixed, report):
            stale.unlink(missing_ok=True)
        if options.no_repair and not options.explain:
            return
        try:
            outcome = _tflite_repair.repair(
                source, lambda: _representative(source, options.calibration_images),
                calibration_images=options.calibration_images,
                tuning_images=options.tuning_images, target=options.target_agreement,
                max_size_ratio=options.size_ratio, input_quantization=uint8_input,
                diagnose_always=options.explain,
                repair_allowed=not options.no_repair)
        except ConversionError as error:  # the int8 artifact is written and still judged
            log.warning("tflite: %s; %s is written and will be verified as it is",
                        error.message, path.name)
            return
        pure, tuning = outcome.pure, len(outcome.tuning)
        said = (f"tflite: int8 agrees with the original on {pure.agreement:.4f} of {tuning} "
                f"tuning images ({_tflite_repair.origin_text(outcome.tuning_from)})")
        if outcome.model is not None:
            fixed = _repair.with_float_layers(source, outcome)
            expected = self.expected(fixed, options, metadata)
            if _tflite_repair.FLOAT_INPUT in outcome.float_layers:
                expected = dataclasses.replace(
                    expected, input=dataclasses.replace(expected.input, dtype="float32"))
            self._write(with_metadata(outcome.model, fixed, metadata), mixed, expected)
        _repair.announce(said, outcome, mixed, outcome.kept.size if outcome.kept else 0,
                         "--tflite-no-repair")
        _repair.write_record(report, path, mixed, outcome)

    def diagnosis(self, path: Path) -> dict | None:
        return _repair.read_record(quantization_report(path))

    def companions(self, path: Path) -> list[Path]:
        mixed = Path(path).with_name(MIXED)
        return [mixed] if Path(path).name == "model_int8.tflite" and mixed.is_file() else []

    def expected(self, source: Source, options: TFLiteOptions,
                 metadata: ArtifactMetadata) -> ArtifactRecord:
        size = source.input_size
        dtype = "uint8" if options.variant == "int8" else "float32"
        return ArtifactRecord(
            target=self.name, format="tflite", precision=options.variant,
            labels=tuple(source.labels), input=ImageInput(INPUT_NAME, size, size, "RGB", dtype),
            preprocessing=source.preprocessing, outputs=(OUTPUT_NAME,),
            metadata={"name": metadata.name, "description": metadata.description,
                      "version": metadata.version, "author": metadata.author,
                      "license": metadata.license},
            user_defined=dict(source.user_defined),
            details={"associated_files": [[LABEL_FILE, "TENSOR_AXIS_LABELS"],
                                          [PROVENANCE_FILE, "DESCRIPTIONS"]],
                     "packed_files": [LABEL_FILE, PROVENANCE_FILE]})

    def inspect(self, path: Path) -> ArtifactRecord:
        return record(Path(path))

    def precision(self, path: Path) -> str:
        """From the tensors (``_tflite_metadata.precision``), read as data."""
        return _tflite_metadata.precision(_tflite_metadata.read_model(Path(path))[1])

    def runners(self, path: Path) -> Runners:
        """The interpreter everywhere; the Task Library and MediaPipe Tasks (each twice) where
        their extras are installed (:meth:`runtimes_not_here` says why one is not)."""
        return _tflite_runners.runners(Path(path), _usable(Path(path)))

    def runtimes_not_here(self) -> dict[str, str]:
        return _tflite_runners.not_here()

    def opens(self, path: Path) -> bool:
        path = Path(path)
        return path.suffix.lower() == ".tflite" and path.is_file()


register(TFLiteTarget())
