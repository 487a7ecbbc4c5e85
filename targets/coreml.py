"""Core ML target: a classifier ``.mlmodel`` (NeuralNetwork) or ``.mlpackage`` (ML Program).

The iOS app feeds the model a camera image and reads ``classLabel`` / ``classLabelProbs``
(Create ML's names), so the artifact takes an RGB image of the backbone's size and does the
backbone's preprocessing itself (``ImageType`` scale/bias, read from the one ``Preprocessing``
object). Labels, metadata and Xcode's preview type are embedded. After saving, the file is read
back by the inspector and compared with what was meant (labels, image input, scale/bias, preview
key, stored weight precision, metadata) before it takes its final name: a model that would
silently misclassify never appears.

Precision: NeuralNetwork models are converted in float32 and their weights quantized with
``quantization_utils.quantize_weights`` (16 bits: float16; 8 bits: linear). ML Programs use
``compute_precision`` for float32/float16; int8 is the float32 program passed through
``ct.optimize.coreml.linear_quantize_weights`` (linear_symmetric). All of these run on Linux
since coremltools 6 (apple/coremltools#1177), as long as no ``sample_data`` is passed (that
path runs predictions, which need macOS).

Speed: protobuf 3.20.3 has no compiled module for Python 3.11, so coremltools encodes and decodes
a NeuralNetwork's float32 weights in pure Python; :mod:`toolchain.patches` skips the spec round
trips that cost most of it (Inception V3 to ``.mlmodel``: 64.5 s). ML Programs keep weights in a
blob file and convert faster.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
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
    _coreml_repair,
    _repair,
    artifact_bytes,
    register,
)
from targets._coreml_spec import (
    INPUT,
    LABEL,
    PREVIEW_KEY,
    PREVIEW_TYPE,
    PROBS,
    record,
)
from targets._repair_options import RepairOptions
from toolchain import atomic, patches
from toolchain.errors import (
    ConversionError,
    ModelError,
    ToolchainError,
    UsageError,
    describe,
)
from toolchain.options import Options, option

log = logging.getLogger("toolchain")

FORMATS = ("neuralnetwork", "mlprogram")
PRECISIONS = ("float32", "float16", "int8")
SUFFIXES = {"neuralnetwork": ".mlmodel", "mlprogram": ".mlpackage"}
#: What the repair stage measured, beside the quantized artifact: ``<artifact>`` + this.
QUANTIZATION_SUFFIX = ".quantization.json"


@dataclass(frozen=True, kw_only=True)
class _CoreMLChoice(Options):
    """The Core ML target's own choices, listed before the repair's (:class:`CoreMLOptions`)."""

    format: str = option("neuralnetwork", "neuralnetwork writes .mlmodel (iOS 13+), mlprogram "
                                          ".mlpackage (iOS 15+, 16+ for int8)", choices=FORMATS)
    precision: str = option("float32", "weight storage precision", choices=PRECISIONS)


@dataclass(frozen=True, kw_only=True)
class CoreMLOptions(RepairOptions, _CoreMLChoice):
    """``--coreml-format``, ``--coreml-precision`` (weight storage), and the repair's options
    (:class:`targets._repair_options.RepairOptions`) for int8 and a NeuralNetwork's float16."""

    @property
    def nbits(self) -> int:
        """The bits coremltools stores each quantized weight in (a NeuralNetwork's float16: 16)."""
        return 16 if self.precision == "float16" else 8

    @property
    def repairable(self) -> bool:
        """Weight-only quantization with layers to keep in float: int8 in both formats, float16
        weights in a NeuralNetwork (an ML Program's float16 is its compute precision)."""
        return self.precision == "int8" or (self.precision == "float16"
                                            and self.format == "neuralnetwork")


def mixed_name(path: Path) -> str:
    """``model_int8.mlmodel`` → ``model_int8_mixed.mlmodel``: the repaired model's name."""
    path = Path(path)
    return f"{path.stem}_mixed{path.suffix}"


class CoreMLTarget(Target):
    name = "coreml"
    help = "Core ML classifier (.mlmodel, or .mlpackage with --coreml-format mlprogram)"
    options_class = CoreMLOptions
    # coremltools imports TensorFlow (5 s here) for its converters alone; no runner converts.
    runners_never_import = ("tensorflow",)

    def filename(self, options: CoreMLOptions) -> str:
        return f"model_{options.precision}{SUFFIXES[options.format]}"

    def export(self, source: Source, options: CoreMLOptions, metadata: ArtifactMetadata,
               path: Path) -> Path:
        """Convert → describe (names, metadata) → save under a temporary name → inspect and
        compare with what was meant → final name; then, for quantized weights, the repair
        stage (targets/_coreml_repair.py)."""
        path, suffix = Path(path), SUFFIXES[options.format]
        if path.suffix.lower() != suffix:
            raise UsageError(f"a Core ML {options.format} model must be saved as {suffix}, "
                             f"not {path.name}")
        with patches.without_progress_bars(), patches.without_spec_round_trips():
            model, float_model = _convert(source, options)
        self._save(model, source, options, metadata, path)
        if options.precision != "float32":
            self._repair(source, options, metadata, path, float_model, model)
        return path

    def _save(self, model, source: Source, options: CoreMLOptions, metadata: ArtifactMetadata,
              path: Path) -> None:
        import coremltools as ct

        spec = _describe(model.get_spec(), source, metadata)
        expected = self.expected(source, options, metadata)
        if source.user_defined.get("float_layers"):  # a repaired model: float and quantized
            expected = dataclasses.replace(expected, details={
                **expected.details, "weights": sorted({"float32", options.precision})})
        with atomic.replacing(path, directory=options.format == "mlprogram",
                              suffix=path.suffix) as tmp:
            # save_spec writes the package directly (MLModel(spec).save would serialize and
            # parse the spec twice more: slow with protobuf 3.20's pure-Python runtime).
            ct.utils.save_spec(spec, str(tmp), weights_dir=model.weights_dir)
            self.check_written(tmp, path.name, expected)

    def _repair(self, source: Source, options: CoreMLOptions, metadata: ArtifactMetadata,
                path: Path, float_model, model) -> None:
        """Measure the quantized weights on the tuning set and, when they miss the repair
        agreement, write the repaired model as its own artifact. A previous run's repaired
        model and record are removed first: they belong to another model."""
        mixed = path.with_name(mixed_name(path))
        report = path.with_name(path.name + QUANTIZATION_SUFFIX)
        for stale in (mixed, report):
            atomic.remove(stale)
        if not options.repairable:
            if options.explain:
                log.info("coreml: %s is float16 compute, not weights: no layer to diagnose",
                         path.name)
            return
        if options.no_repair and not options.explain:
            return
        if not (source.tuning or source.calibration):
            log.info("coreml: no validation or training images known, so %s weights are not "
                     "measured (pass --image-dir)", options.precision)
            return
        try:
            with patches.without_progress_bars(), patches.without_spec_round_trips():
                outcome, repaired = _coreml_repair.repair(
                    source, float_model, model, fmt=options.format,
                    precision=options.precision, nbits=options.nbits,
                    quantized_size=artifact_bytes(path),
                    tuning_images=options.tuning_images, target=options.target_agreement,
                    max_size_ratio=options.size_ratio,
                    diagnose_always=options.explain, repair_allowed=not options.no_repair)
        except ConversionError as error:  # the quantized artifact is written and still judged
            log.warning("coreml: %s; %s is written and will be verified as it is",
                        error.message, path.name)
            return
        pure, tuning = outcome.pure, len(outcome.tuning)
        said = (f"coreml: {options.precision} weights agree with the original on "
                f"{pure.agreement:.4f} of {tuning} tuning images "
                f"({_repair.origin_text(outcome.tuning_from)})")
        if repaired is not None:
            self._save(repaired, _repair.with_float_layers(source, outcome), options, metadata,
                       mixed)
        _repair.announce(said, outcome, mixed, artifact_bytes(mixed) if mixed.exists() else 0,
                         "--coreml-no-repair")
        _repair.write_record(report, path, mixed, outcome)

    def diagnosis(self, path: Path) -> dict | None:
        path = Path(path)
        plain = path.name.replace("_mixed.", ".")
        return _repair.read_record(path.with_name(plain + QUANTIZATION_SUFFIX))

    def companions(self, path: Path) -> list[Path]:
        mixed = Path(path).with_name(mixed_name(path))
        return [mixed] if "_mixed." not in Path(path).name and mixed.exists() else []

    def expected(self, source: Source, options: CoreMLOptions,
                 metadata: ArtifactMetadata) -> ArtifactRecord:
        size = source.input_size
        return ArtifactRecord(
            target=self.name, format=options.format, precision=options.precision,
            labels=tuple(source.labels), input=ImageInput(INPUT, size, size, "RGB"),
            preprocessing=source.preprocessing, outputs=tuple(sorted((LABEL, PROBS))),
            metadata={"description": metadata.description, "author": metadata.author,
                      "license": metadata.license, "version": metadata.version},
            user_defined={**source.user_defined, PREVIEW_KEY: PREVIEW_TYPE},
            details={"weights": [options.precision], "predicted_feature": LABEL,
                     "predicted_probabilities": PROBS})

    def inspect(self, path: Path) -> ArtifactRecord:
        from toolchain.runtimes import load_spec

        return record(load_spec(path), Path(path))

    def precision(self, path: Path) -> str:
        found = self.inspect(path)
        if found.precision == "unknown":
            raise ModelError(f"{Path(path).name} stores no weights this toolchain recognises "
                             f"({found.details['weights']})")
        return found.precision

    def runners(self, path: Path) -> Runners:
        """Two rows: the file as Core ML's CPU computes it (float32), and the device row, the
        NumPy executor with float16 compute (a phone's GPU or Neural Engine, which the iOS
        app's compute units allow).

        Core ML predicts only on macOS, with ``CPU_ONLY`` there so its row is float32 as
        judged; elsewhere the NumPy executor of its documented semantics runs the same file
        (toolchain.runtimes). The float16 row is the executor on every platform: a Mac's GPU
        or Neural Engine is not the phone's, and the emulation is the same on every machine."""
        kind = CoreMLRunner if sys.platform == "darwin" else NumpyRunner
        return Runners.opening([lambda: kind(Path(path)),
                                lambda: NumpyRunner(Path(path), "float16")])

    def opens(self, path: Path) -> bool:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".mlmodel":
            return not path.is_dir()
        return suffix == ".mlpackage" and not path.is_file()


class CoreMLRunner(Runner):
    """The Core ML runtime (macOS): one ``predict`` per image, labels read from the model."""

    runtime = "coreml"

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self.path = Path(path)
        found = CoreMLTarget().inspect(self.path)
        if not found.labels or found.input_size is None:
            raise ModelError(f"{self.path.name} is not a classifier of one square image")
        self.labels, self.input_size = found.labels, found.input_size
        # CPU only: Core ML's CPU computes in float32, which this row is judged as; the
        # GPU and Neural Engine's float16 is the executor's float16 row.
        self._model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.CPU_ONLY)

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
    """The NumPy Core ML executor (any platform): the model's own preprocessing and labels.

    ``compute_precision="float16"`` is the device row (``coreml-numpy-float16``): every weight,
    input and intermediate value rounded to float16, as Core ML computes on a GPU or the
    Neural Engine, which an app's default compute units (``.all``) may choose."""

    runtime = "coreml-numpy"

    def __init__(self, path: Path, compute_precision: str = "float32") -> None:
        from toolchain import runtimes

        if compute_precision != "float32":
            self.runtime, self.compute = f"coreml-numpy-{compute_precision}", compute_precision
        self.path = Path(path)
        self._executor = runtimes.load(self.path, compute_precision)
        self.labels = tuple(self._executor.labels)
        self.input_size = int(self._executor.input_size)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._executor.predict(np.asarray(pixels, dtype=np.uint8)), np.float32)


def _convert(source: Source, options: CoreMLOptions):
    """coremltools conversion and weight quantization: (the model, its float32 model); any
    crash becomes one line."""
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
        float_model = model
        if options.repairable:
            model = _coreml_repair.write_model(float_model, options.format, options.nbits)
    except ToolchainError:
        raise
    except Exception as error:  # noqa: BLE001 (coremltools and TensorFlow raise assorted types)
        raise ConversionError(f"coreml: {options.format} {options.precision} conversion "
                              f"failed: {describe(error)}") from error
    return model, float_model


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


register(CoreMLTarget())
