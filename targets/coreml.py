"""Core ML target: a classifier ``.mlmodel`` (NeuralNetwork) or ``.mlpackage`` (ML Program).

The iOS app feeds the model a camera image and reads ``classLabel`` / ``classLabelProbs``
(Create ML's names), so the artifact takes an RGB image of the backbone's size and does the
backbone's preprocessing itself (``ImageType`` scale/bias, read from the one ``Preprocessing``
object). Labels, metadata and Xcode's preview type are embedded. After saving, the file is read
back and checked (labels, image input, scale/bias, preview key, stored weight precision) before
it takes its final name: a model that would silently misclassify never appears.

Precision: NeuralNetwork models are converted in float32 and their weights quantized with
``quantization_utils.quantize_weights`` (16 bits: float16; 8 bits: linear). ML Programs use
``compute_precision`` for float32/float16; int8 is the float32 program passed through
``ct.optimize.coreml.linear_quantize_weights`` (linear_symmetric). All of these run on Linux
since coremltools 6 (apple/coremltools#1177), as long as no ``sample_data`` is passed (that
path runs predictions, which need macOS).

Speed: protobuf 3.20.3 has no compiled module for Python 3.11, so coremltools encodes and decodes
a NeuralNetwork's float32 weights (repeated floats, several round trips) in pure Python: Inception
V3 takes about 7 minutes. ML Programs keep weights in a blob file and convert in well under one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from targets import ArtifactMetadata, Runner, Source, Target, register
from toolchain import atomic
from toolchain.errors import ModelError, ToolchainError, UsageError, describe

FORMATS = ("neuralnetwork", "mlprogram")
PRECISIONS = ("float32", "float16", "int8")
SUFFIXES = {"neuralnetwork": ".mlmodel", "mlprogram": ".mlpackage"}
INPUT, LABEL, PROBS = "image", "classLabel", "classLabelProbs"
PREVIEW_KEY, PREVIEW_TYPE = "com.apple.coreml.model.preview.type", "imageClassifier"
#: ML Program weights with more elements than this are int8-quantized (coremltools' default).
INT8_WEIGHT_THRESHOLD = 2048


@dataclass(frozen=True)
class CoreMLOptions:
    """``--coreml-format`` and ``--coreml-precision`` (weight storage)."""

    format: str = "neuralnetwork"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"unknown Core ML format {self.format!r}",
                             hint="--coreml-format takes " + " or ".join(FORMATS))
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown Core ML precision {self.precision!r}",
                             hint="--coreml-precision takes " + ", ".join(PRECISIONS))


class CoreMLTarget(Target):
    name = "coreml"
    help = "Core ML classifier (.mlmodel, or .mlpackage with --coreml-format mlprogram)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--coreml-format", choices=FORMATS, default="neuralnetwork",
                            help="neuralnetwork writes .mlmodel (iOS 13+), mlprogram .mlpackage "
                                 "(iOS 15+, 16+ for int8)")
        parser.add_argument("--coreml-precision", choices=PRECISIONS, default="float32",
                            help="weight storage precision")

    def options(self, args: argparse.Namespace) -> CoreMLOptions:
        return CoreMLOptions(getattr(args, "coreml_format", "neuralnetwork"),
                             getattr(args, "coreml_precision", "float32"))

    def filename(self, options: CoreMLOptions) -> str:
        return f"model_{options.precision}{SUFFIXES[options.format]}"

    def export(self, source: Source, options: CoreMLOptions, metadata: ArtifactMetadata,
               path: Path) -> Path:
        import coremltools as ct

        path, suffix = Path(path), SUFFIXES[options.format]
        if path.suffix.lower() != suffix:
            raise UsageError(f"a Core ML {options.format} model must be saved as {suffix}, "
                             f"not {path.name}")
        with _without_progress_bars(), _without_spec_round_trips():
            model = _convert(source, options)
        spec = _describe(model.get_spec(), source, metadata)
        with atomic.replacing(path, directory=options.format == "mlprogram", suffix=suffix) as tmp:
            # save_spec writes the package directly (MLModel(spec).save would serialize and
            # parse the spec twice more: slow with protobuf 3.20's pure-Python runtime).
            ct.utils.save_spec(spec, str(tmp), weights_dir=model.weights_dir)
            _check(tmp, path.name, source, options)
        return path

    def runners(self, path: Path) -> list[Runner]:
        # Core ML predicts only on macOS; elsewhere the NumPy executor of its documented
        # semantics runs the same file (toolchain.runtimes).
        if sys.platform == "darwin":
            return [CoreMLRunner(Path(path))]
        return [NumpyRunner(Path(path))]

    def opens(self, path: Path) -> bool:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".mlmodel":
            return not path.is_dir()
        return suffix == ".mlpackage" and not path.is_file()

    def precision(self, path: Path) -> str:
        """The stored weight precision; a mix (never written by this target) counts as the
        lossiest one, so the verifier applies the loosest threshold only when it is due."""
        from toolchain.runtimes import load_spec

        stored = weight_precisions(load_spec(path))
        for precision in ("int8", "float16", "float32"):
            if precision in stored:
                return precision
        raise ModelError(f"{Path(path).name} stores no weights this toolchain recognises "
                         f"({sorted(stored)})")


class CoreMLRunner(Runner):
    """The Core ML runtime (macOS): one ``predict`` per image, labels read from the model."""

    runtime = "coreml"

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self.path = Path(path)
        self.labels = read_labels(self.path)
        self._model = ct.models.MLModel(str(self.path))
        self.input_size = int(self._model.get_spec().description.input[0].type.imageType.width)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        from PIL import Image

        rows = []
        for image in np.asarray(pixels, dtype=np.uint8):
            scores = self._model.predict({INPUT: Image.fromarray(image, "RGB")})[PROBS]
            if set(scores) != set(self.labels):
                raise ModelError(f"{self.path.name} scored {sorted(scores)}, not its labels")
            rows.append([scores[label] for label in self.labels])
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(self.labels))


class NumpyRunner(Runner):
    """The NumPy Core ML executor (any platform): the model's own preprocessing and labels."""

    runtime = "coreml-numpy"

    def __init__(self, path: Path, compute_precision: str = "float32") -> None:
        from toolchain import runtimes

        self.path = Path(path)
        self._executor = runtimes.load(self.path, compute_precision)
        self.labels = tuple(self._executor.labels)
        self.input_size = int(self._executor.input_size)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._executor.predict(np.asarray(pixels, dtype=np.uint8)), np.float32)


def read_labels(path: Path) -> tuple[str, ...]:
    """The class labels embedded in a ``.mlmodel`` or ``.mlpackage``, in output order."""
    from toolchain.runtimes import load_spec

    return _labels(load_spec(path))


#: coremltools modules that draw tqdm progress bars during a conversion, and their tqdm name.
_PROGRESS_BARS = (
    ("coremltools.converters.mil.frontend.tensorflow.convert_utils", "_tqdm"),
    ("coremltools.converters.mil.frontend.tensorflow.load", "_tqdm"),
    ("coremltools.converters.mil.frontend.tensorflow2.load", "_tqdm"),
    ("coremltools.converters.mil.backend.nn.op_mapping", "_tqdm"),
    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
    ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
)


@contextlib.contextmanager
def _without_progress_bars():
    """Keep coremltools' per-pass progress bars (a dozen per conversion, drawn even into CI
    logs) off the toolchain's output. coremltools has no switch for them: apple/coremltools#1815
    asks for one. Each module's ``tqdm`` is swapped for a disabled one during the conversion; a
    module missing in another coremltools version is skipped."""
    import importlib
    from functools import partial

    swapped = []
    for module_name, attribute in _PROGRESS_BARS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, attribute, None)
        if original is not None:
            setattr(module, attribute, partial(original, disable=True))
            swapped.append((module, attribute, original))
    try:
        yield
    finally:
        for module, attribute, original in swapped:
            setattr(module, attribute, original)


@contextlib.contextmanager
def _without_spec_round_trips():
    """Skip coremltools' save-and-reparse of every intermediate NeuralNetwork spec on Linux.

    ``MLModel(spec)`` writes the spec to a temporary ``.mlmodel`` and parses it back, to hand
    the file to Core ML's runtime; ``ct.convert`` does this five times for a NeuralNetwork
    classifier (image input, classifier, ...). Off macOS there is no runtime, so the round trip
    only copies the spec, and with the pure-Python protobuf that tflite-support's ``protobuf<4``
    pin forces it dominates the conversion: a profile of mobilenet_0.50_224 spent 16.6 of 29 s
    in those constructors. Here a temporary file's spec is handed over as an in-memory copy
    (protobuf's ``CopyFrom`` copies repeated floats as lists, without per-value checks). The
    saved artifact is parsed back and checked by :func:`_check` as before. On macOS, or if
    coremltools' internals differ from what this expects, nothing is changed.
    """
    import tempfile

    try:
        from coremltools.models import model as ct_model
    except ImportError:
        yield
        return
    if getattr(ct_model, "_MLModelProxy", True) is not None or not all(
            hasattr(ct_model, name) for name in ("_save_spec", "_load_spec")):
        yield
        return
    save, load, held = ct_model._save_spec, ct_model._load_spec, {}
    temporary = Path(tempfile.gettempdir()).resolve()

    def save_spec(spec, filename, *args, **kwargs):
        path = Path(filename).resolve()
        if path.suffix == ".mlmodel" and path.parent == temporary and not args and not kwargs:
            copy = type(spec)()
            copy.CopyFrom(spec)
            held[str(path)] = copy
            return None
        return save(spec, filename, *args, **kwargs)

    def load_spec(filename, *args, **kwargs):
        found = held.pop(str(Path(filename).resolve()), None)
        return found if found is not None else load(filename, *args, **kwargs)

    ct_model._save_spec, ct_model._load_spec = save_spec, load_spec
    try:
        yield
    finally:
        ct_model._save_spec, ct_model._load_spec = save, load


def _convert(source: Source, options: CoreMLOptions):
    """coremltools conversion and weight quantization; any crash becomes one line."""
    import coremltools as ct

    pre, size = source.preprocessing, source.input_size
    # No input name: coremltools binds the model's single input (``image`` for our Keras models,
    # ``input`` for TF-for-Poets graphs); _describe renames it to ``image``.
    image = ct.ImageType(shape=(1, size, size, 3), scale=pre.scale, bias=list(pre.offset),
                         color_layout=ct.colorlayout.RGB)
    mlprogram = options.format == "mlprogram"
    extra = {}
    if mlprogram:
        extra["compute_precision"] = (ct.precision.FLOAT16 if options.precision == "float16"
                                      else ct.precision.FLOAT32)
    try:
        model = ct.convert(source.keras_model if source.keras_model is not None
                           else [source.concrete_function()],
                           source="tensorflow", convert_to=options.format, inputs=[image],
                           classifier_config=ct.ClassifierConfig(list(source.labels)), **extra)
        if mlprogram and options.precision == "int8":
            config = ct.optimize.coreml.OptimizationConfig(
                global_config=ct.optimize.coreml.OpLinearQuantizerConfig(
                    mode="linear_symmetric", weight_threshold=INT8_WEIGHT_THRESHOLD))
            model = ct.optimize.coreml.linear_quantize_weights(model, config=config)
        elif not mlprogram and options.precision != "float32":
            from coremltools.models.neural_network import quantization_utils

            # quantize_weights print()s a line per layer, with no switch to turn it off
            # (no upstream issue found); keep it off the toolchain's output.
            with contextlib.redirect_stdout(io.StringIO()):
                model = quantization_utils.quantize_weights(
                    model, nbits=16 if options.precision == "float16" else 8,
                    quantization_mode="linear")
    except ToolchainError:
        raise
    except Exception as error:  # noqa: BLE001 (coremltools and TensorFlow raise assorted types)
        raise ToolchainError(f"coreml: {options.format} {options.precision} conversion failed: "
                             f"{describe(error)}") from None
    return model


def _describe(spec, source: Source, metadata: ArtifactMetadata):
    """Create ML's feature names, human-facing metadata and Xcode's preview type (in place)."""
    import coremltools as ct

    description = spec.description
    ct.utils.rename_feature(spec, description.input[0].name, INPUT)
    # Also updates predictedProbabilitiesName (and, in a NeuralNetwork, the softmax layer's
    # output and labelProbabilityLayerName; in an ML Program, the classify op's output).
    ct.utils.rename_feature(spec, description.predictedProbabilitiesName, PROBS)
    meta = description.metadata
    meta.shortDescription, meta.author = metadata.description, metadata.author
    meta.license, meta.versionString = metadata.license, metadata.version
    for key, value in {**source.user_defined, PREVIEW_KEY: PREVIEW_TYPE}.items():
        meta.userDefined[key] = str(value)
    size = source.input_size
    texts = {INPUT: f"Image to classify, {size}x{size} RGB", LABEL: "Most likely label",
             PROBS: "Probability of each label"}
    for feature in [*description.input, *description.output]:
        feature.shortDescription = texts.get(feature.name, feature.shortDescription)
    return spec


def _check(path: Path, final_name: str, source: Source, options: CoreMLOptions) -> None:
    """Read the saved model back; anything that differs from what was asked is an error."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    description, size, pre = spec.description, source.input_size, source.preprocessing
    problems = []
    labels = _labels(spec)
    if labels != tuple(source.labels):
        problems.append(f"class labels {list(labels)} instead of {list(source.labels)}")
    image = description.input[0].type.imageType if len(description.input) == 1 else None
    if (image is None or description.input[0].name != INPUT
            or (image.width, image.height) != (size, size)
            or image.colorSpace != image.RGB):
        problems.append(f"input is not one {size}x{size} RGB image named {INPUT!r}")
    outputs = {feature.name for feature in description.output}
    if (outputs != {LABEL, PROBS} or description.predictedFeatureName != LABEL
            or description.predictedProbabilitiesName != PROBS):
        problems.append(f"outputs {sorted(outputs)} instead of {[LABEL, PROBS]}")
    scale, bias = _preprocessing(spec)
    expected = np.float32([pre.scale, *pre.offset])
    if not np.allclose(np.float32([scale, *bias]), expected, rtol=1e-6, atol=1e-7):
        problems.append(f"image scale/bias {scale}/{list(bias)} instead of "
                        f"{pre.scale}/{list(pre.offset)}")
    if description.metadata.userDefined.get(PREVIEW_KEY) != PREVIEW_TYPE:
        problems.append(f"{PREVIEW_KEY} is not {PREVIEW_TYPE}")
    stored = weight_precisions(spec)
    if stored != {options.precision}:
        problems.append(f"weights stored as {sorted(stored) or 'nothing'} "
                        f"instead of {options.precision}")
    if problems:
        raise ToolchainError(f"coreml: {final_name} read back wrong: " + "; ".join(problems))


def _mil_block(spec):
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset]


def _labels(spec) -> tuple[str, ...]:
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        return tuple(spec.neuralNetworkClassifier.stringClassLabels.vector)
    if spec.WhichOneof("Type") == "mlProgram":
        for op in _mil_block(spec).operations:
            if op.type == "classify":
                values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                return tuple(value.immediateValue.tensor.strings.values[0] for value in values)
    raise ModelError("the Core ML model is not an image classifier of this toolchain")


def _preprocessing(spec) -> tuple[float, tuple[float, ...]]:
    """The image scale and RGB bias the model applies to its input."""
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        for entry in spec.neuralNetworkClassifier.preprocessing:
            if entry.featureName == INPUT and entry.WhichOneof("preprocessor") == "scaler":
                s = entry.scaler
                return s.channelScale, (s.redBias, s.greenBias, s.blueBias)
        return 1.0, (0.0, 0.0, 0.0)
    # ML Program: coremltools' insert_image_preprocessing_ops pass writes mul(image, scale)
    # then add(.., bias[1,3,1,1]) after the input, each omitted when it would be a no-op.
    block = _mil_block(spec)
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    found, current = {"mul": [1.0], "add": [0.0, 0.0, 0.0]}, INPUT
    for op in block.operations:
        args = {key: value.arguments[0].name for key, value in op.inputs.items()}
        if op.type in found and args.get("x") == current and args.get("y") in consts:
            tensor = consts[args["y"]].attributes["val"].immediateValue.tensor
            found[op.type] = list(tensor.floats.values) or list(  # float16 constants: bytes
                np.frombuffer(tensor.bytes.values, np.float16).astype(np.float32))
            current = op.outputs[0].name
            if op.type == "add":
                break
    return float(found["mul"][0]), tuple(float(v) for v in found["add"])


def weight_precisions(spec) -> set[str]:
    """How the model stores its weights: {"float32"}, {"float16"}, {"int8"} or a mix.

    NeuralNetwork: every convolution / inner product / batched matmul weight. ML Program: every
    const or constexpr tensor with more than INT8_WEIGHT_THRESHOLD elements.
    """
    from coremltools.proto import MIL_pb2

    kinds = set()
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        for layer in spec.neuralNetworkClassifier.layers:
            kind = layer.WhichOneof("layer")
            if kind in ("convolution", "innerProduct", "batchedMatmul"):
                w = getattr(layer, kind).weights  # empty for a batchedMatmul of two inputs
                if w.floatValue or w.float16Value or w.rawValue:
                    kinds.add("float32" if w.floatValue else "float16" if w.float16Value
                              else f"int{w.quantization.numberOfBits}")
        return kinds
    names = {MIL_pb2.FLOAT32: "float32", MIL_pb2.FLOAT16: "float16", MIL_pb2.INT8: "int8",
             MIL_pb2.UINT8: "uint8"}
    for op in _mil_block(spec).operations:
        # constexpr ops of iOS 18 take their data from a const, which is counted as such.
        stored = {"const": "val", "constexpr_affine_dequantize": "quantized_data"}.get(op.type)
        if stored is None or stored not in op.attributes:
            continue
        dims = op.outputs[0].type.tensorType.dimensions
        if int(np.prod([d.constant.size for d in dims])) > INT8_WEIGHT_THRESHOLD:
            dtype = op.attributes[stored].type.tensorType.dataType
            kinds.add(names.get(dtype, MIL_pb2.DataType.Name(dtype).lower()))
    return kinds


register(CoreMLTarget())
