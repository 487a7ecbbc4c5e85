"""The runtimes a ``.tflite`` is checked in, one :class:`targets.Runner` each.

- ``tflite-interpreter``: TensorFlow's ``tf.lite.Interpreter`` (everywhere): raw pixels into a
  uint8 input, else normalised per the metadata.
- ``tflite-task-library`` and ``-full-size``: tflite-support's ``ImageClassifier``, the C++ the
  Android Task Library runs, where the ``tasklib`` extra installs (x86-64).
- ``mediapipe-tasks`` and ``-full-size``: MediaPipe Tasks' ``ImageClassifier``, the C++ the
  Android sample app's ``com.google.mediapipe:tasks-vision`` runs, where the ``mediapipe``
  extra installs (every platform but Intel Macs: mediapipe has no macOS x86-64 wheel).

The two app runtimes read the labels and the normalisation from the metadata, as the apps do;
each runs twice: on our resized pixels, and on the photos at their own size, which it resizes
itself as an app resizes a bitmap. A runtime whose package is missing is not run, and
:func:`not_here` says why (the verifier's reports show it). Underscored so the target registry
does not take it for a target.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from targets import ArtifactRecord, Runner, Runners
from targets._tflite_metadata import support
from toolchain import patches
from toolchain.errors import MissingSystemLibrary, ModelError, first_line


class InterpreterRunner(Runner):
    """``tf.lite.Interpreter``: raw pixels into a uint8 input, else normalized per the metadata."""

    runtime = "tflite-interpreter"

    def __init__(self, path: Path, found: ArtifactRecord, threads: int = 2) -> None:
        import tensorflow as tf

        self.labels, self.input_size = found.labels, found.input_size
        self._interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._pre = None  # a uint8 input takes raw pixels, as on a device
        if self._input["dtype"] != np.uint8:
            if found.preprocessing is None:
                raise ModelError(f"{path} has no usable NormalizationOptions in its metadata")
            self._pre = found.preprocessing

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


class _Categories(Runner):
    """A runtime that answers with named categories: each is put in its label's column."""

    def _columns(self, found: ArtifactRecord) -> None:
        self.labels, self.input_size = found.labels, found.input_size
        self._column = {label: column for column, label in enumerate(self.labels)}

    def _row(self, categories, out: np.ndarray) -> None:
        for name, score in categories:
            if name not in self._column:
                raise ModelError(f"{self.runtime} returned category {name!r}, which is not a "
                                 "label")
            out[self._column[name]] = score

    def _classify(self, image: np.ndarray):
        """(name, score) of every category for one uint8 RGB image."""
        raise NotImplementedError

    def __call__(self, pixels) -> np.ndarray:
        """Resized pixels, or (``full_size``) photos of any sizes, one image per call."""
        out = np.zeros((len(pixels), len(self.labels)), np.float32)
        for row, image in enumerate(pixels):
            self._row(self._classify(np.ascontiguousarray(image, dtype=np.uint8)), out[row])
        return out


class TaskLibraryRunner(_Categories):
    """tflite-support's ``ImageClassifier``: normalization and labels from the metadata."""

    runtime = "tflite-task-library"

    def __init__(self, path: Path, found: ArtifactRecord) -> None:
        lib = support()
        self._columns(found)
        self._vision = lib.vision
        self._classifier = lib.vision.ImageClassifier.create_from_options(
            lib.vision.ImageClassifierOptions(
                base_options=lib.core.BaseOptions(file_name=str(path), num_threads=2),
                classification_options=lib.processor.ClassificationOptions(
                    max_results=len(self.labels), score_threshold=0.0)))

    def _classify(self, image: np.ndarray):
        result = self._classifier.classify(self._vision.TensorImage.create_from_array(image))
        return [(c.category_name, c.score) for c in result.classifications[0].categories]


class TaskLibraryFullSizeRunner(TaskLibraryRunner):
    """The Task Library fed photos at their own size: it resizes them itself (its
    ``ImageClassifier`` preprocessing), as an Android app on the Task Library resizes the
    ``TensorImage`` of a bitmap, so a difference between our resize and the app's shows up as
    its own figure."""

    runtime = "tflite-task-library-full-size"
    full_size = True


def mediapipe() -> SimpleNamespace:
    """MediaPipe Tasks' Python modules (the ``mediapipe`` extra); ImportError without it."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    return SimpleNamespace(mp=mp, vision=vision, base_options=base_options)


#: Every MediaPipe runner not yet closed: closed at exit, before the interpreter tears its
#: modules down (MediaPipe's own finaliser then fails, and a process that still holds an open
#: classifier at exit can hang). The test suite checks after every test that it is empty.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runner in list(_OPEN):
        runner.close()


class MediaPipeRunner(_Categories):
    """MediaPipe Tasks' ``ImageClassifier`` (what the Android sample app runs): normalization
    and labels from the metadata. Closed by whoever made it, else at exit (:data:`_OPEN`)."""

    runtime = "mediapipe-tasks"

    def __init__(self, path: Path, found: ArtifactRecord) -> None:
        lib = mediapipe()
        patches.mediapipe_finalisers_never_wait()
        self._columns(found)
        self._mp = lib.mp
        self._classifier = lib.vision.ImageClassifier.create_from_options(
            lib.vision.ImageClassifierOptions(
                base_options=lib.base_options.BaseOptions(model_asset_path=str(path)),
                max_results=len(self.labels), score_threshold=0.0))
        _OPEN.add(self)

    def _classify(self, image: np.ndarray):
        picture = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=image)
        result = self._classifier.classify(picture)
        return [(c.category_name, c.score) for c in result.classifications[0].categories]

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.discard(self)
            self._classifier.close()

    @classmethod
    def still_open(cls) -> int:
        """How many MediaPipe runners are open now (the suite's leak check reads it)."""
        return len(_OPEN)


class MediaPipeFullSizeRunner(MediaPipeRunner):
    """MediaPipe Tasks fed photos at their own size: it resizes them itself, as the app's
    ``BitmapImageBuilder`` image of a bitmap is."""

    runtime = "mediapipe-tasks-full-size"
    full_size = True


def _missing(load, package: str, extra: str, where: str) -> str | None:
    try:
        load()
    except ImportError as error:
        return (f"{package} is not installed ({first_line(error)}); it has wheels {where}: "
                f"pip install 'toolchain[{extra}]'")
    except MissingSystemLibrary as error:
        return f"{error.message} ({error.hint})"
    return None


def task_library_missing() -> str | None:
    """Why the Task Library cannot run here (one line), or None when it can."""
    return _missing(support, "tflite-support", "tasklib", "only for x86-64 with Python 3.11")


def mediapipe_missing() -> str | None:
    """Why MediaPipe Tasks cannot run here (one line), or None when it can."""
    return _missing(mediapipe, "mediapipe", "mediapipe", "for Linux, Windows and Apple Silicon "
                                                         "Macs, not Intel Macs")


class _Unloadable(Runner):
    """An app runtime installed here that refused to load the model (MediaPipe Tasks refuses a
    graph with more than one subgraph, e.g. a while loop): each call raises why, so its row
    fails while the other runtimes still run, as the app itself would fail to load it."""

    def __init__(self, kind: type[Runner], found: ArtifactRecord, error: Exception) -> None:
        self.runtime, self.full_size = kind.runtime, kind.full_size
        self.labels, self.input_size = found.labels, found.input_size
        self._why = f"{kind.runtime} cannot load the model: {first_line(error)}"

    def __call__(self, pixels) -> np.ndarray:
        raise ModelError(self._why)


def _loaded(kind: type[Runner], path: Path, found: ArtifactRecord) -> Runner:
    try:
        return kind(path, found)
    except (ValueError, RuntimeError, ModelError) as error:
        return _Unloadable(kind, found, error)


def runners(path: Path, found: ArtifactRecord) -> Runners:
    """Every runtime installed here, the interpreter first (its failure to load the model is
    the model's failure); an app runtime that refuses the model runs as a failing row. If one
    fails to open otherwise, those already open are closed before the error goes on."""
    kinds = []
    if task_library_missing() is None:
        kinds += [TaskLibraryRunner, TaskLibraryFullSizeRunner]
    if mediapipe_missing() is None:
        kinds += [MediaPipeRunner, MediaPipeFullSizeRunner]
    return Runners.opening([lambda: InterpreterRunner(path, found)]
                           + [functools.partial(_loaded, kind, path, found) for kind in kinds])


def not_here() -> dict[str, str]:
    """Each app runtime this machine lacks, with why."""
    missing = {}
    for why, kinds in ((task_library_missing(), (TaskLibraryRunner, TaskLibraryFullSizeRunner)),
                       (mediapipe_missing(), (MediaPipeRunner, MediaPipeFullSizeRunner))):
        if why is not None:
            missing.update({kind.runtime: why for kind in kinds})
    return missing
