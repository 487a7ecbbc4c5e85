"""Export targets: one module per format, one contract, one registry.

Every module in this package defines a :class:`Target` subclass and registers one instance of
it; adding a format means adding one file. The registry refuses a duplicate name.

The contract, as the converter and verifier use it:

- ``name`` (``coreml``, ``tflite``) and ``add_arguments`` / ``options``: the target's options
  as a frozen dataclass, built and validated from the command line;
- ``filename(options)``: the artifact's file name, suffix included;
- ``export(source, options, metadata, path)``: write the artifact at ``path`` atomically;
- ``runners(path)``: how to run an artifact (one runner per runtime), each reading the labels
  from the artifact itself, so a model with wrong embedded labels is caught;
- ``opens(path)``: whether a file is this target's format (``label`` uses it);
- ``precision(path)``: how the artifact stores its numbers (``float32``, ``float16``, ``int8``,
  or ``dynamic`` for int8 weights with float compute), read from the file: the verifier picks
  the threshold for it.

A :class:`Source` is what every target converts: the retrained model (or a TensorFlow for Poets
frozen graph), its labels, input size and preprocessing (from the backbone spec: the one object
that carries preprocessing), provenance, and the training images for quantization calibration.
"""

from __future__ import annotations

import abc
import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import __version__
from toolchain.backbones import Preprocessing
from toolchain.errors import UsageError


@dataclass(frozen=True)
class ArtifactMetadata:
    """Human-facing metadata written into every artifact."""

    name: str = "Image classifier"
    description: str = "Classifies an image into one of the labels it was retrained on."
    author: str = "toolchain"
    license: str = "Proprietary"
    version: str = "1.0"


@dataclass
class Source:
    """The model to convert, with everything a target needs to know about it."""

    labels: tuple[str, ...]
    input_size: int
    preprocessing: Preprocessing
    architecture: str
    user_defined: dict[str, str]
    calibration: tuple[Path, ...]
    keras_model: Any = None
    function_factory: Callable[[], Any] | None = field(default=None, repr=False)

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


class Runner(abc.ABC):
    """Runs one artifact in one runtime: uint8 RGB pixels (n, size, size, 3) → probabilities."""

    #: The runtime's name, as reports show it (``tflite-interpreter``, ``coreml``, ...).
    runtime: str
    #: The labels, read from the artifact itself, in output order.
    labels: tuple[str, ...]
    #: The square input size the artifact expects, read from the artifact.
    input_size: int

    @abc.abstractmethod
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities, one row per image, columns in ``labels`` order."""


class Target(abc.ABC):
    """One export format. Subclasses set ``name`` and ``help`` and implement the methods."""

    name: str = ""
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 (optional)
        """Add this target's options (prefixed with its name) to a command's parser."""

    @abc.abstractmethod
    def options(self, args: argparse.Namespace):
        """This target's frozen options dataclass, validated, from parsed arguments."""

    @abc.abstractmethod
    def filename(self, options) -> str:
        """The artifact's file name, e.g. ``model.mlmodel`` or ``model_int8.tflite``."""

    @abc.abstractmethod
    def export(self, source: Source, options, metadata: ArtifactMetadata, path: Path) -> Path:
        """Write the artifact at ``path`` (atomically) and return ``path``."""

    @abc.abstractmethod
    def runners(self, path: Path) -> list[Runner]:
        """The runtimes that can run the artifact on this machine, one runner each."""

    @abc.abstractmethod
    def opens(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this target."""

    @abc.abstractmethod
    def precision(self, path: Path) -> str:
        """``float32``, ``float16``, ``int8`` or ``dynamic``, read from the artifact itself."""


_REGISTRY: dict[str, Target] = {}


def artifact_bytes(path: Path) -> int:
    """Size of an artifact: a file, or every file of a folder artifact (``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def register(target: Target) -> Target:
    """Add a target; a second target with the same name is a programming error."""
    if not target.name:
        raise ValueError(f"{type(target).__name__} has no name")
    if target.name in _REGISTRY:
        raise ValueError(f"a target named {target.name!r} is already registered")
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


def for_artifact(path: Path) -> Target:
    """The target whose format ``path`` is."""
    for name in names():
        if _REGISTRY[name].opens(Path(path)):
            return _REGISTRY[name]
    raise UsageError(f"{path} is not a model this toolchain reads",
                     hint="pass a retrain output folder, .tflite, .mlmodel, .mlpackage or .pb")


__all__ = ["ArtifactMetadata", "Runner", "Source", "Target", "__version__", "for_artifact",
           "get", "names", "register", "resolve"]
