"""Export targets: one module per format, one contract, one registry.

Every public module in this package defines a :class:`Target` subclass and registers one
instance of it; adding a format means adding one file. The registry refuses a duplicate name.

The contract, as the converter, the verifier, ``label`` and ``install`` use it:

- ``name`` (``coreml``, ``tflite``), ``help``, and ``options_class``: the target's options, a
  frozen keyword-only dataclass (:mod:`toolchain.options`) whose fields become the
  ``--<name>-<field>`` flags and the ``<name>_<field>`` keywords of the Python API;
- ``filename(options)``: the artifact's file name, suffix included;
- ``export(source, options, metadata, path)``: write the artifact at ``path`` atomically, after
  reading it back with ``inspect`` and comparing with :meth:`Target.expected` (any difference
  is a ConversionError that names it, and the artifact never takes its final name);
- ``inspect(path)``: one :class:`ArtifactRecord` of what the file says about itself (labels,
  input, preprocessing, precision, format, metadata, outputs), read from the file alone;
- ``runners(path)``: how to run an artifact here (one runner per runtime, as :class:`Runners`,
  which the caller closes with ``with``), each reading the labels from the artifact itself, so
  a model with wrong embedded labels is caught; a runner with ``full_size`` set takes photos at
  their own size and resizes them itself;
- ``runtimes_not_here()``: runtimes the target has elsewhere but not on this machine, with
  the reason (the reports name them);
- ``opens(path)``: whether a file is this target's format;
- ``companions(path)``: further artifacts that exporting ``path`` wrote (none by default; the
  repaired quantized models), each one verified like any other;
- ``diagnosis(path)``: what the export measured about its quantization (None by default; a
  repair record, targets/_repair.py), shown in the verifier's reports.

A :class:`Source` is what every target converts: the retrained model (or a frozen graph), its
labels, input size and preprocessing (from the backbone spec), provenance, and its images.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.backbones import Preprocessing
from toolchain.errors import UsageError
from toolchain.options import Options, group, option


@dataclass(frozen=True, kw_only=True)
class ArtifactMetadata(Options):
    """Human-facing metadata written into every artifact."""

    name: str = option("Image classifier", "model name (TFLite metadata; Core ML takes its name "
                                           "from the file)")
    description: str = option("Classifies an image into one of the labels it was retrained on.",
                              "one-sentence description shown by Xcode and Android Studio")
    author: str = option("toolchain", "author")
    license: str = option("Proprietary", "license")
    version: str = option("1.0", "model version", name="model_version")


@dataclass
class Source:
    """The model to convert, with everything a target needs to know about it.

    ``normalization_source`` says where ``preprocessing`` came from, in words a report can show:
    ``flag``, ``read from the graph's Sub/Mul nodes``, ``retrain.py's defaults for
    mobilenet_v1``, a guess for a graph of unknown architecture, or the backbone registry for a
    retrained model. Frozen graphs also record it (with ``input_mean``/``input_std``) in
    ``user_defined``, which every target writes into its artifact.
    """

    labels: tuple[str, ...]
    input_size: int
    preprocessing: Preprocessing
    architecture: str
    user_defined: dict[str, str]
    calibration: tuple[Path, ...]
    keras_model: Any = None
    function_factory: Callable[[], Any] | None = field(default=None, repr=False)
    normalization_source: str = ""
    #: Images the head was not fit on, which quantization's repair tunes on (targets/_tuning.py).
    tuning: tuple[Path, ...] = ()
    #: False when the head never saw these images (a frozen graph, a .keras file).
    fit_on_images: bool = True

    def concrete_function(self):
        """A TF concrete function: float32 [1, size, size, 3] preprocessed image → probabilities."""
        if self.function_factory is not None:
            return self.function_factory()
        import tensorflow as tf

        model = self.keras_model
        function = tf.function(lambda image: model(image, training=False))
        shape = [1, self.input_size, self.input_size, 3]
        return function.get_concrete_function(tf.TensorSpec(shape, tf.float32, name="image"))

    def calibration_batches(self, count: int):
        """Preprocessed training images for quantization calibration (never held-out ones)."""
        from toolchain.errors import UnreadableImage
        from toolchain.images import load_rgb

        if not self.calibration:
            raise UsageError("full-integer quantization needs calibration images and none "
                             "are known",
                             hint="pass --image-dir with the training images")
        used = 0
        for path in self.calibration:
            if used == count:
                break
            try:
                pixels = load_rgb(path, self.input_size)
            except UnreadableImage:
                continue
            used += 1
            yield self.preprocessing.apply(pixels)[None]


@dataclass(frozen=True)
class ImageInput:
    """The artifact's image input: its name, size, colour order and element type."""

    name: str
    width: int
    height: int
    color: str = "RGB"
    dtype: str = "image"


@dataclass(frozen=True)
class ArtifactRecord:
    """What an artifact says about itself, read from the file alone (``Target.inspect``).

    ``preprocessing`` is the arithmetic the artifact applies, or tells its runtime to apply, to
    0..255 pixels (Core ML's image scale and bias; TFLite's NormalizationOptions); ``None`` when
    the file says nothing. ``metadata`` holds the human-facing fields the format stores (Core ML
    has no name field), ``user_defined`` the provenance key/values, ``details`` facts only one
    format has (TFLite's input quantization and associated files; Core ML's spec version).
    """

    target: str
    format: str
    precision: str
    labels: tuple[str, ...]
    input: ImageInput | None
    preprocessing: Preprocessing | None
    outputs: tuple[str, ...]
    metadata: dict[str, str]
    user_defined: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int | None:
        """The side of a square image input, else None."""
        image = self.input
        return image.width if image is not None and image.width == image.height else None

    def record(self) -> dict:
        """JSON-ready: what ``toolchain`` tests keep as golden files."""
        pre = self.preprocessing
        return {"target": self.target, "format": self.format, "precision": self.precision,
                "labels": list(self.labels),
                "input": None if self.input is None else dataclasses.asdict(self.input),
                "preprocessing": None if pre is None else {
                    "scale": _rounded(pre.scale), "offset": [_rounded(v) for v in pre.offset],
                    "mean": [_rounded(v) for v in pre.mean], "std": [_rounded(v) for v in pre.std]},
                "outputs": list(self.outputs), "metadata": dict(sorted(self.metadata.items())),
                "user_defined": dict(sorted(self.user_defined.items())),
                "details": _jsonable(self.details)}


def differences(expected: ArtifactRecord, found: ArtifactRecord) -> list[str]:
    """Each field where ``found`` is not what ``expected`` says, as ``field: found, expected``.

    Preprocessing is compared numerically (float32 storage rounds 1/127.5); ``user_defined``
    and ``details`` only for the keys ``expected`` names (libraries add their own).
    """
    problems = []
    for name in ("target", "format", "precision", "labels", "input", "outputs"):
        want, got = getattr(expected, name), getattr(found, name)
        if want != got:
            problems.append(f"{name} reads back as {_shown(got)}, expected {_shown(want)}")
    want, got = expected.preprocessing, found.preprocessing
    if (want is None) != (got is None) or (want is not None and not np.allclose(
            [want.scale, *want.offset], [got.scale, *got.offset], rtol=1e-6, atol=1e-6)):
        problems.append(f"preprocessing reads back as {_pre(got)}, expected {_pre(want)}")
    for name in ("metadata", "user_defined"):
        want, got = getattr(expected, name), getattr(found, name)
        for key in sorted(set(want) | (set(got) if name == "metadata" else set())):
            if want.get(key) != got.get(key):
                problems.append(f"{name} {key} reads back as {got.get(key)!r}, "
                                f"expected {want.get(key)!r}")
    for key, want in expected.details.items():
        if found.details.get(key) != want:
            problems.append(f"{key} reads back as {_shown(found.details.get(key))}, "
                            f"expected {_shown(want)}")
    return problems


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _pre(pre: Preprocessing | None) -> str:
    if pre is None:
        return "none"
    return (f"scale {pre.scale:.6g} offset {[round(v, 6) for v in pre.offset]} "
            f"(mean {[round(v, 4) for v in pre.mean]}, std {[round(v, 4) for v in pre.std]})")


def _rounded(value: float) -> float:
    """Seven significant digits: what float32 storage keeps, so golden files stay stable."""
    return float(f"{float(value):.7g}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return _rounded(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


class Runner(abc.ABC):
    """Runs one artifact in one runtime: uint8 RGB pixels (n, size, size, 3) → probabilities.

    A runner with ``full_size = True`` resizes images itself, as an app's runtime does: it
    takes a sequence of uint8 RGB images of any sizes, each ``(height, width, 3)``, and the
    verifier feeds it the photos at their own size (one per call)."""

    #: The runtime's name, as reports show it (``tflite-interpreter``, ``coreml``, ...).
    runtime: str
    #: The labels, read from the artifact itself, in output order.
    labels: tuple[str, ...]
    #: The square input size the artifact expects, read from the artifact.
    input_size: int
    #: Fed full-size photos (it resizes them) rather than pixels at ``input_size``.
    full_size: bool = False
    #: A device row's compute precision (float16: GPU, Neural Engine); None: as stored.
    compute: str | None = None

    @abc.abstractmethod
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities, one row per image, columns in ``labels`` order."""

    def close(self) -> None:
        """Free what the runtime holds (a native classifier). Nothing by default; a runner that
        holds something overrides it, and closing twice is harmless."""
        return

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Runners(list):
    """The runners of one artifact (``Target.runners``): a list that is also a context manager
    closing every runner it holds, however its ``with`` block ends.

    Why: a native classifier left to the garbage collector is closed by its finaliser on
    whichever thread the collection runs, and MediaPipe Tasks' finaliser then waits forever
    for a dispatcher thread that the same collection has stopped (google-ai-edge/mediapipe#6233).
    So no runner's cleanup may depend on the collector: every caller opens runners with
    ``with target.runners(path) as runners:``.
    """

    @classmethod
    def opening(cls, makers) -> Runners:
        """Runners made by calling each of ``makers`` in order; if one raises, those already
        made are closed before the error goes on (nothing is left open half-way)."""
        made = cls()
        try:
            for make in makers:
                made.append(make())
        except BaseException:
            made.close()
            raise
        return made

    def __enter__(self) -> Runners:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close every runner, the last made first; one that fails to close does not keep the
        others open (the first such error is raised once all were tried)."""
        failed: BaseException | None = None
        while self:
            try:
                self.pop().close()
            except Exception as error:  # noqa: BLE001 (the others must still be closed)
                failed = failed or error
        if failed is not None:
            raise failed


class Target(abc.ABC):
    """One export format. Subclasses set ``name``, ``help`` and ``options_class`` and implement
    the abstract methods; see the module docstring for the contract."""

    name: str = ""
    help: str = ""
    #: A frozen keyword-only :class:`toolchain.options.Options` dataclass, defaults for all.
    options_class: type[Options] = Options
    #: Modules its runners never need: the verifier's child blocks them (toolchain/measure.py).
    runners_never_import: tuple[str, ...] = ()

    @abc.abstractmethod
    def filename(self, options) -> str:
        """The artifact's file name, e.g. ``model.mlmodel`` or ``model_int8.tflite``."""

    @abc.abstractmethod
    def export(self, source: Source, options, metadata: ArtifactMetadata, path: Path) -> Path:
        """Write the artifact at ``path`` (atomically) and return ``path``."""

    @abc.abstractmethod
    def inspect(self, path: Path) -> ArtifactRecord:
        """What the artifact at ``path`` says about itself; ModelError if it is unreadable."""

    @abc.abstractmethod
    def expected(self, source: Source, options, metadata: ArtifactMetadata) -> ArtifactRecord:
        """The record ``export`` means to write: the post-write check compares it with
        ``inspect`` of the written file."""

    @abc.abstractmethod
    def runners(self, path: Path) -> Runners:
        """The runtimes that can run the artifact on this machine, one runner each; the caller
        closes them (``with target.runners(path) as runners:``)."""

    def runtimes_not_here(self) -> dict[str, str]:
        """Runtimes this target runs where their package installs but that this machine
        lacks, each with the one-line reason (the TFLite Task Library without tflite-support):
        the verifier's reports name them, so a run without them is never taken for one with
        them. None by default."""
        return {}

    @abc.abstractmethod
    def opens(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this target."""

    def companions(self, path: Path) -> list[Path]:
        """Artifacts of their own that ``export`` of ``path`` also wrote in this run (the TFLite
        target's repaired ``model_int8_mixed.tflite``): converted, listed and verified like any
        other. None by default."""
        return []

    def diagnosis(self, path: Path) -> dict | None:
        """What the export measured about the quantization of ``path`` (the TFLite target's
        int8 repair record), for the verifier's reports; None when nothing was measured."""
        return None

    def precision(self, path: Path) -> str:
        """``float32``, ``float16``, ``int8`` or ``dynamic``, read from the artifact itself."""
        return self.inspect(path).precision

    def check_written(self, path: Path, final_name: str, expected: ArtifactRecord) -> None:
        """Inspect the file just written; any difference from ``expected`` is one
        ConversionError naming every field, before the file takes its final name."""
        from toolchain.errors import ConversionError

        problems = differences(expected, self.inspect(path))
        if problems:
            raise ConversionError(f"{self.name}: {final_name} read back wrong: "
                                  + "; ".join(problems))


_REGISTRY: dict[str, Target] = {}


def artifact_bytes(path: Path) -> int:
    """Size of an artifact: a file, or every file of a folder artifact (``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def artifact_digest(path: Path) -> str:
    """SHA-256 of an artifact's bytes: a file's, or a folder artifact's (``.mlpackage``) as the
    digest of its files' relative paths and digests, in sorted order. What the verifier records
    and ``install`` compares, so the bytes an app ships are the bytes that were verified."""
    import hashlib

    from toolchain.images import file_digest

    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    listing = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        listing.update(f"{item.relative_to(path).as_posix()}\0{file_digest(item)}\n"
                       .encode("utf-8", "surrogateescape"))
    return listing.hexdigest()


def register(target: Target) -> Target:
    """Add a target; a second target with the same name is a programming error."""
    if not target.name:
        raise ValueError(f"{type(target).__name__} has no name")
    if target.name in _REGISTRY:
        raise ValueError(f"a target named {target.name!r} is already registered")
    target.options_class.FLAG_PREFIX = f"{target.name}_"  # its flags: --<name>-<field>
    _REGISTRY[target.name] = target
    return target


def _discover() -> None:
    """Import every module of this package once; each registers its target."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def names() -> list[str]:
    """The registered target names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Target:
    """The target called ``name``; an unknown name is a one-line error listing the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise UsageError(f"unknown target {name!r}",
                         hint="known targets: " + ", ".join(sorted(_REGISTRY)) + ", or all")
    return _REGISTRY[name]


def resolve(requested: list[str]) -> list[Target]:
    """``--target`` values (repeatable, ``all`` for every target) → targets, in order, once each."""
    chosen: list[Target] = []
    for name in requested:
        for target in ([get(n) for n in names()] if name == "all" else [get(name)]):
            if target not in chosen:
                chosen.append(target)
    return chosen


@functools.cache
def options_type() -> type[Options]:
    """One options class with a group per registered target: its fields are the
    ``--<target>-<field>`` flags and ``<target>_<field>`` API keywords of convert and build."""
    fields = [(name, Options, group(factory=get(name).options_class, prefix=f"{name}_",
                                    title=f"{name} target: {get(name).help}"))
              for name in names()]
    return dataclasses.make_dataclass("TargetOptions", fields, bases=(Options,), frozen=True,
                                      kw_only=True)


def default_options() -> Options:
    """Every registered target's default options (the default of convert's and build's)."""
    return options_type()()


def jobs(requested: tuple[str, ...], options: Options) -> list[tuple[Target, Options]]:
    """(target, its options) for each requested name (``all``: every target).

    Options set for a target that was not requested would be ignored: that is a UsageError, so
    ``--coreml-format mlprogram --target tflite`` cannot silently build no Core ML model.
    """
    from toolchain.options import given, leaves

    if not requested:
        raise UsageError("no target given", hint="pass --target " + " or --target ".join(
            names()) + " (repeatable), or --target all")
    chosen = resolve(list(requested))
    owners = {leaf.name: leaf.path[0] for leaf in leaves(type(options))}
    unused = sorted((owners[name], f"--{name.replace('_', '-')}") for name in given(options)
                    if owners[name] not in {target.name for target in chosen})
    if unused:
        owner = unused[0][0]
        unused = [flag for _, flag in unused]
        raise UsageError(f"{', '.join(unused)} given, but not --target {owner}",
                         hint=f"add --target {owner}, or drop those options")
    return [(target, getattr(options, target.name)) for target in chosen]


def for_artifact(path: Path) -> Target:
    """The target whose format ``path`` is."""
    for name in names():
        if _REGISTRY[name].opens(Path(path)):
            return _REGISTRY[name]
    raise UsageError(f"{path} is not a model this toolchain reads",
                     hint="pass a retrain output folder, .tflite, .mlmodel, .mlpackage or .pb")


__all__ = ["ArtifactMetadata", "ArtifactRecord", "ImageInput", "Runner", "Runners", "Source",
           "Target", "artifact_bytes", "artifact_digest", "default_options", "differences",
           "for_artifact", "get", "jobs", "names", "options_type", "register", "resolve"]
