"""TFLite target: ``model_<variant>.tflite`` with labels and normalization as TFLite metadata.

Why metadata: the Android Task Library (and Android Studio's ML binding) read the labels, the
input normalization and the colour space from the model file itself, so an app cannot pair the
model with the wrong labels or the wrong preprocessing. The metadata is read back after writing
and compared with what was meant, before the artifact gets its final name.

Variants: ``int8`` (full-integer, uint8 input and output, calibrated on training images only),
``dynamic`` (int8 weights, float activations), ``float16`` (float16 weights) and ``float32``.
Two runners check an artifact: TensorFlow's ``tf.lite.Interpreter`` and tflite-support's Task
Library ``ImageClassifier`` (the C++ the Android Task Library runs). Both take the labels from
the metadata, never from a side file; the Task Library takes the normalization from it too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from targets import ArtifactMetadata, Runner, Source, Target, register
from toolchain import atomic
from toolchain.backbones import Preprocessing
from toolchain.dataset import labels_text, parse_labels
from toolchain.errors import (
    MissingSystemLibrary,
    ModelError,
    ToolchainError,
    UsageError,
    first_line,
)

VARIANTS = ("int8", "dynamic", "float16", "float32")
LABEL_FILE = "labels.txt"


@dataclass(frozen=True)
class TFLiteOptions:
    """``--tflite-variant`` and ``--tflite-calibration-images``."""

    variant: str = "int8"
    calibration_images: int = 100

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UsageError(f"unknown TFLite variant {self.variant!r}",
                             hint="use one of " + ", ".join(VARIANTS))
        if not isinstance(self.calibration_images, int) or self.calibration_images < 1:
            raise UsageError("--tflite-calibration-images must be at least 1")


def _support() -> SimpleNamespace:
    """tflite-support's modules; a missing libusb-1.0 becomes one line with a fix."""
    try:
        from tflite_support import metadata
        from tflite_support import metadata_schema_py_generated as schema
        from tflite_support.metadata_writers import image_classifier, metadata_info, writer_utils
        from tflite_support.task import core, processor, vision
    except (ImportError, OSError) as error:
        if "libusb" not in str(error):
            raise
        raise MissingSystemLibrary(
            "tflite-support needs the system library libusb-1.0-0, which is not installed",
            hint="on Debian/Ubuntu: apt-get install libusb-1.0-0") from None
    return SimpleNamespace(metadata=metadata, schema=schema, image_classifier=image_classifier,
                           info=metadata_info, writer_utils=writer_utils, core=core,
                           processor=processor, vision=vision)


def _label_text(labels: tuple[str, ...]) -> str:
    """One label per line, UTF-8, as ``labels.txt`` and the Task Library expect."""
    if not labels or any(not label or "\n" in label or "\r" in label for label in labels):
        raise UsageError("labels must be non-empty and free of line breaks to fit labels.txt")
    if len(set(labels)) != len(labels):
        raise UsageError("the labels are not unique: " + ", ".join(
            sorted({label for label in labels if labels.count(label) > 1})))
    return labels_text(labels)


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
    with warnings.catch_warnings():
        # A uint8 input with no statistics given is what we mean: the input's scale and zero
        # point come from calibration, and _check_input_quantization verifies them afterwards.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return bytes(converter.convert())


def _check_input_quantization(model: bytes, pre: Preprocessing) -> None:
    """A uint8 input must turn raw pixels into the training preprocessing within one step."""
    import tensorflow as tf

    scale, zero = tf.lite.Interpreter(model_content=model).get_input_details()[0]["quantization"]
    pixels = np.array([0.0, 255.0])
    for offset in pre.offset:
        error = np.abs((pixels - zero) * scale - (pixels * pre.scale + offset)).max()
        if not scale > 0 or error > max(scale, pre.scale):
            raise ToolchainError(f"the int8 model's uint8 input (scale {scale:.6g}, zero point "
                                 f"{zero}) does not reproduce the preprocessing (scale "
                                 f"{pre.scale:.6g}, offset {offset:g})",
                                 hint="per-channel offsets cannot be one uint8 zero point; use "
                                      "--tflite-variant dynamic or float16")


def _with_metadata(model: bytes, source: Source, metadata: ArtifactMetadata) -> bytes:
    """``model`` with general info, input normalization and ``labels.txt`` as metadata.

    ``image_classifier.MetadataWriter.create_for_inference`` cannot set name, description,
    version, author or license (its docstring points to ``create_from_metadata_info``), so this
    builds the input and output metadata it would build, plus a ``GeneralMd``.
    """
    lib, pre = _support(), source.preprocessing
    info, classifier, types = lib.info, lib.image_classifier, lib.writer_utils
    with tempfile.TemporaryDirectory(prefix="tflite-labels-") as folder:
        labels_path = Path(folder) / LABEL_FILE  # the associated file takes this file's name
        labels_path.write_text(_label_text(tuple(source.labels)), encoding="utf-8")
        writer = classifier.MetadataWriter.create_from_metadata_info(
            bytearray(model),
            general_md=info.GeneralMd(name=metadata.name, version=metadata.version,
                                      description=metadata.description, author=metadata.author,
                                      licenses=metadata.license),
            input_md=info.InputImageTensorMd(
                name=classifier.INPUT_NAME, description=classifier.INPUT_DESCRIPTION,
                norm_mean=list(pre.mean), norm_std=list(pre.std),
                color_space_type=lib.schema.ColorSpaceType.RGB,
                tensor_type=types.get_input_tensor_types(model)[0]),
            output_md=info.ClassificationTensorMd(
                name=classifier.OUTPUT_NAME, description=classifier.OUTPUT_DESCRIPTION,
                label_files=[info.LabelFileMd(file_path=str(labels_path))],
                tensor_type=types.get_output_tensor_types(model)[0]))
        return bytes(writer.populate())


def _associated_files(node) -> list:
    """Every ``associated_files`` entry anywhere in a metadata JSON document."""
    if isinstance(node, list):
        return [file for item in node for file in _associated_files(item)]
    if not isinstance(node, dict):
        return []
    return [file for key, value in node.items()
            for file in (value if key == "associated_files" else _associated_files(value))]


@dataclass(frozen=True)
class _Embedded:
    """What a ``.tflite`` file says about itself, read with tflite-support's MetadataDisplayer."""

    document: dict
    labels: tuple[str, ...]
    packed: tuple[str, ...]
    input_size: int

    @classmethod
    def read(cls, model: bytes | Path) -> _Embedded:
        lib, where = _support(), model if isinstance(model, Path) else "the written model"
        try:
            buffer = model.read_bytes() if isinstance(model, Path) else model
            displayer = lib.metadata.MetadataDisplayer.with_model_buffer(buffer)
            text = displayer.get_associated_file_buffer(LABEL_FILE).decode("utf-8")
            return cls(json.loads(displayer.get_metadata_json()),
                       parse_labels(text),
                       tuple(displayer.get_packed_associated_file_list()),
                       int(lib.writer_utils.get_input_tensor_shape(buffer, 0)[1]))
        except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as error:
            raise ModelError(f"{where} has no readable TFLite metadata with {LABEL_FILE} "
                             f"({first_line(error)})",
                             hint="convert it with: toolchain convert") from None

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        tensor = self.document["subgraph_metadata"][0]["input_tensor_metadata"][0]
        for unit in tensor.get("process_units", []):
            if unit.get("options_type") == "NormalizationOptions":
                return unit["options"]["mean"], unit["options"]["std"]
        return None


def _check_metadata(buffer: bytes, source: Source, metadata: ArtifactMetadata) -> None:
    """Read the written metadata back; any difference from what was meant is an error."""
    embedded, pre = _Embedded.read(buffer), source.preprocessing
    for key in ("name", "description", "version", "author", "license"):
        found, expected = embedded.document.get(key), getattr(metadata, key)
        if found != expected:
            raise ToolchainError(f"TFLite metadata {key} reads back as {found!r}, "
                                 f"expected {expected!r}")
    norm = embedded.normalization
    if norm is None or not (len(norm[0]) == len(norm[1]) == 3
                            and np.allclose(norm[0], pre.mean, rtol=1e-6, atol=1e-4)
                            and np.allclose(norm[1], pre.std, rtol=1e-6, atol=1e-4)):
        raise ToolchainError(f"TFLite metadata normalization reads back as {norm}, expected "
                             f"mean {list(pre.mean)} std {list(pre.std)}")
    files = [(file.get("name"), file.get("type")) for file in _associated_files(embedded.document)]
    if files != [(LABEL_FILE, "TENSOR_AXIS_LABELS")] or embedded.packed != (LABEL_FILE,):
        raise ToolchainError(f"TFLite metadata associated files read back as {files} (packed: "
                             f"{list(embedded.packed)}), expected one {LABEL_FILE} of type "
                             "TENSOR_AXIS_LABELS")
    if embedded.labels != tuple(source.labels):
        raise ToolchainError(f"TFLite metadata {LABEL_FILE} reads back as "
                             f"{list(embedded.labels)}, expected {list(source.labels)}")


def read_labels(path: Path) -> tuple[str, ...]:
    """The labels embedded in a ``.tflite`` file's metadata (for ``toolchain label``)."""
    return _Embedded.read(Path(path)).labels


class _InterpreterRunner(Runner):
    """``tf.lite.Interpreter``: raw pixels into a uint8 input, else normalized per the metadata."""

    runtime = "tflite-interpreter"

    def __init__(self, path: Path, threads: int = 2) -> None:
        import tensorflow as tf

        embedded = _Embedded.read(path)
        self.labels, self.input_size = embedded.labels, embedded.input_size
        self._interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._pre, norm = None, embedded.normalization  # uint8 input: raw pixels, as on device
        if self._input["dtype"] != np.uint8:
            if norm is None or len(set(norm[1])) != 1:
                raise ModelError(f"{path} has no usable NormalizationOptions in its metadata")
            self._pre = Preprocessing(1.0 / norm[1][0], tuple(-m / norm[1][0] for m in norm[0]))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        rows = []
        for image in np.asarray(pixels, dtype=np.uint8):
            value = image[None] if self._pre is None else self._pre.apply(image[None])
            self._interpreter.set_tensor(self._input["index"], value.astype(self._input["dtype"]))
            self._interpreter.invoke()
            row = self._interpreter.get_tensor(self._output["index"])[0]
            if self._output["dtype"] in (np.uint8, np.int8):
                scale, zero = self._output["quantization"]
                row = (row.astype(np.float32) - zero) * scale
            rows.append(row.astype(np.float32))
        return np.stack(rows)


def interpreter_runner(path: Path, threads: int = 2) -> Runner:
    """The ``tf.lite.Interpreter`` runner with ``threads`` threads (``toolchain bench`` times
    1 and 2), fed as the verifier and a device feed it."""
    return _InterpreterRunner(Path(path), threads)


class _TaskLibraryRunner(Runner):
    """tflite-support's ``ImageClassifier``: normalization and labels from the metadata."""

    runtime = "tflite-task-library"

    def __init__(self, path: Path) -> None:
        lib, embedded = _support(), _Embedded.read(path)
        self.labels, self.input_size = embedded.labels, embedded.input_size
        self._vision = lib.vision
        self._columns = {label: column for column, label in enumerate(self.labels)}
        self._classifier = lib.vision.ImageClassifier.create_from_options(
            lib.vision.ImageClassifierOptions(
                base_options=lib.core.BaseOptions(file_name=str(path), num_threads=2),
                classification_options=lib.processor.ClassificationOptions(
                    max_results=len(self.labels), score_threshold=0.0)))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        images = np.asarray(pixels, dtype=np.uint8)
        out = np.zeros((len(images), len(self.labels)), np.float32)
        for row, image in enumerate(images):
            tensor = self._vision.TensorImage.create_from_array(np.ascontiguousarray(image))
            for category in self._classifier.classify(tensor).classifications[0].categories:
                if category.category_name not in self._columns:
                    raise ModelError(f"the Task Library returned category "
                                     f"{category.category_name!r}, which is not a label")
                out[row, self._columns[category.category_name]] = category.score
        return out


class TFLiteTarget(Target):
    name = "tflite"
    help = "TensorFlow Lite with labels and normalization as metadata (Android Task Library)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tflite-variant", choices=VARIANTS, default=TFLiteOptions.variant,
                            help="int8: full-integer (uint8 in and out), dynamic: int8 weights, "
                                 "float16: float16 weights, float32 (default: %(default)s)")
        parser.add_argument("--tflite-calibration-images", type=int, metavar="N",
                            default=TFLiteOptions.calibration_images,
                            help="training images that calibrate int8 (default: %(default)s)")

    def options(self, args: argparse.Namespace) -> TFLiteOptions:
        return TFLiteOptions(
            getattr(args, "tflite_variant", TFLiteOptions.variant),
            getattr(args, "tflite_calibration_images", TFLiteOptions.calibration_images))

    def filename(self, options: TFLiteOptions) -> str:
        return f"model_{options.variant}.tflite"

    def export(self, source: Source, options: TFLiteOptions, metadata: ArtifactMetadata,
               path: Path) -> Path:
        """Validate → convert → check input quantization → embed metadata → read back → write."""
        path = Path(path)
        labels_text = _label_text(tuple(source.labels))
        _support()  # a missing system library fails before the conversion, not after it
        model = _convert(source, options)
        if options.variant == "int8":
            _check_input_quantization(model, source.preprocessing)
        model = _with_metadata(model, source, metadata)
        with atomic.replacing(path, suffix=".tflite") as tmp:
            tmp.write_bytes(model)
            _check_metadata(tmp.read_bytes(), source, metadata)
        atomic.write_text(path.parent / LABEL_FILE, labels_text)
        return path

    def runners(self, path: Path) -> list[Runner]:
        return [_InterpreterRunner(Path(path)), _TaskLibraryRunner(Path(path))]

    def opens(self, path: Path) -> bool:
        path = Path(path)
        return path.suffix.lower() == ".tflite" and path.is_file()

    def precision(self, path: Path) -> str:
        """From the tensors: a quantized input is full-integer ``int8``; int8 weights with a
        float input are ``dynamic``; float16 weights ``float16``; otherwise ``float32``."""
        import tensorflow as tf

        try:
            interpreter = tf.lite.Interpreter(model_path=str(path))
        except (ValueError, RuntimeError) as error:
            raise ModelError(f"cannot read {path}: {first_line(error)}") from None
        if interpreter.get_input_details()[0]["dtype"] in (np.uint8, np.int8):
            return "int8"
        stored = {np.dtype(detail["dtype"]) for detail in interpreter.get_tensor_details()}
        if np.dtype(np.int8) in stored:
            return "dynamic"
        return "float16" if np.dtype(np.float16) in stored else "float32"


register(TFLiteTarget())
