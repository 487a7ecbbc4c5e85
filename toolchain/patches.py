"""Every workaround for a library's internals, in one place, each naming why and its upstream.

The pinned stack (TensorFlow 2.13.1, coremltools 9.0, tflite-support 0.4.4, protobuf 3.20.3 in
pure Python) has habits the toolchain cannot switch off through public APIs: progress bars drawn
into CI logs, a spec save-and-reparse that dominates conversion time on Linux, lines printed per
layer. The fixes reach into the libraries' modules, so a new version could quietly undo them and
nothing would fail, only get slower or noisier. Hence this registry: each entry in
:data:`PATCHES` names the module and attribute it relies on; ``tests/toolchain/test_patches.py``
fails when one no longer exists in the installed version. At run time a missing attribute
only switches its patch off (correctness never depends on one), with a debug log line.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

log = logging.getLogger("toolchain")


@dataclass(frozen=True)
class Patch:
    """One attribute of a library that a workaround replaces or relies on."""

    module: str
    attribute: str
    why: str
    upstream: str

    def resolve(self):
        """The module object, or None (logged) if it or the attribute is gone."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            log.debug("patch skipped: %s is not importable", self.module)
            return None
        if not hasattr(module, self.attribute):
            log.debug("patch skipped: %s has no %s", self.module, self.attribute)
            return None
        return module


_BARS = "coremltools draws tqdm progress bars per conversion pass, with no switch to turn them off"
_BARS_ISSUE = "apple/coremltools#1815"
#: coremltools modules whose tqdm is swapped for a disabled one during a conversion.
PROGRESS_BARS = (
    Patch("coremltools.converters.mil.frontend.tensorflow.convert_utils", "_tqdm", _BARS,
          _BARS_ISSUE),
    Patch("coremltools.converters.mil.frontend.tensorflow.load", "_tqdm", _BARS, _BARS_ISSUE),
    Patch("coremltools.converters.mil.frontend.tensorflow2.load", "_tqdm", _BARS, _BARS_ISSUE),
    Patch("coremltools.converters.mil.backend.nn.op_mapping", "_tqdm", _BARS, _BARS_ISSUE),
    Patch("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm", _BARS, _BARS_ISSUE),
    Patch("coremltools.optimize.coreml._quantization_passes", "tqdm", _BARS, _BARS_ISSUE),
)
_TRIPS = ("MLModel(spec) saves every intermediate NeuralNetwork spec to a temporary .mlmodel and "
          "parses it back, for a runtime Linux does not have: 16.6 of 29 s of a conversion")
_TRIPS_ISSUE = "apple/coremltools#1954 (_MLModelProxy creation extremely slow)"
#: coremltools internals the spec round-trip skip replaces (and the proxy it checks is absent).
SPEC_ROUND_TRIPS = (
    Patch("coremltools.models.model", "_save_spec", _TRIPS, _TRIPS_ISSUE),
    Patch("coremltools.models.model", "_load_spec", _TRIPS, _TRIPS_ISSUE),
    Patch("coremltools.models.model", "_MLModelProxy", _TRIPS, _TRIPS_ISSUE),
)
#: quantize_weights print()s one line per layer.
QUANTIZE_PRINTS = Patch(
    "coremltools.models.neural_network.quantization_utils", "quantize_weights",
    "quantize_weights prints a line per layer to stdout, with no switch", "none found")
#: Private coremltools functions the NumPy Core ML executor reads ML Program weights with.
INTERNALS = (
    Patch("coremltools.models.utils", "_try_get_weights_dir_path",
          "finds an .mlpackage's weights folder as MLModel does; no public equivalent",
          "none (private API)"),
    Patch("coremltools.libmilstoragepython", "_BlobStorageReader",
          "reads ML Program weight blobs on Linux; no public equivalent", "none (private API)"),
)
#: MediaPipe Tasks' ImageClassifier, whose finaliser the runners make safe.
MEDIAPIPE_FINALISER = Patch(
    "mediapipe.tasks.python.vision.image_classifier", "ImageClassifier",
    "ImageClassifier.__del__ calls close(), which waits for its dispatcher's worker thread; "
    "when the garbage collector finalises a classifier left in a reference cycle, the same "
    "collection has already stopped that thread (its executor is weakly referenced), so the "
    "wait never ends and the process hangs", "google-ai-edge/mediapipe#6233")
#: Every registered patch, for the test that checks they still apply.
PATCHES = (*PROGRESS_BARS, *SPEC_ROUND_TRIPS, QUANTIZE_PRINTS, *INTERNALS, MEDIAPIPE_FINALISER)


@contextlib.contextmanager
def without_progress_bars():
    """coremltools' per-pass progress bars off (a dozen per conversion, even in CI logs)."""
    swapped = []
    for patch in PROGRESS_BARS:
        module = patch.resolve()
        if module is None:
            continue
        original = getattr(module, patch.attribute)
        setattr(module, patch.attribute, partial(original, disable=True))
        swapped.append((module, patch.attribute, original))
    try:
        yield
    finally:
        for module, attribute, original in swapped:
            setattr(module, attribute, original)


@contextlib.contextmanager
def without_spec_round_trips():
    """Skip coremltools' save-and-reparse of every intermediate NeuralNetwork spec, off macOS.

    ``ct.convert`` builds ``MLModel(spec)`` five times for a NeuralNetwork classifier; each
    writes the spec to a temporary ``.mlmodel`` and parses it back to hand the file to Core ML's
    runtime. Off macOS there is no runtime (``_MLModelProxy`` is None), so the round trip only
    copies the spec, slowly: protobuf is pure Python on this stack. Here a temporary file's spec
    is handed over as an in-memory copy (``CopyFrom`` copies repeated floats as lists). The saved
    artifact is still read back and checked. On macOS, or if the internals differ, nothing is
    changed.
    """
    if not all(patch.resolve() is not None for patch in SPEC_ROUND_TRIPS):
        yield
        return
    ct_model = importlib.import_module("coremltools.models.model")
    if ct_model._MLModelProxy is not None:  # macOS: the runtime needs the file
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


def quantize_weights(model, **kwargs):
    """coremltools' NeuralNetwork ``quantize_weights``, its per-layer prints kept off stdout."""
    module = importlib.import_module(QUANTIZE_PRINTS.module)
    with contextlib.redirect_stdout(io.StringIO()):
        return module.quantize_weights(model, **kwargs)


@contextlib.contextmanager
def quantized_input_warning_off():
    """TFLite's converter warns "Statistics for quantized inputs were expected" for a uint8
    input with no statistics given. That is what we mean: the input's scale and zero point come
    from calibration, and the TFLite target checks them after conversion."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        yield


@contextlib.contextmanager
def quantizer_chatter_off():
    """TFLite's ``mlir_quantize`` prints ``fully_quantize: 0, inference_type: 6, ...`` from C++
    straight onto the process's stderr, once per call, and the int8 repair makes one call per
    layer and candidate (over a hundred lines for a MobileNet v3 small). The descriptor is
    captured while the block runs, and everything else it received is written back to stderr
    afterwards, so a real error message is never lost."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (an embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace")
                    .splitlines(keepends=True) if not line.startswith("fully_quantize: ")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _Collecting:
    """Whether a garbage collection is running (a ``gc.callbacks`` entry keeps it current)."""

    active = False
    #: Open MediaPipe classifiers a collection reached and left open (never waited on).
    left_open = 0

    @classmethod
    def track(cls, phase: str, info: dict) -> None:
        cls.active = phase == "start"


def mediapipe_finalisers_never_wait() -> None:
    """Make MediaPipe's ``ImageClassifier.__del__`` safe; idempotent.

    Upstream, ``__del__`` calls ``close()``, which hands the native close to the classifier's
    one-thread executor and waits for it. When the classifier is garbage in a reference cycle,
    the collector first clears the weak reference that keeps that executor's thread running, so
    the wait never ends: on the main thread, in the middle of whatever allocated last (a TFLite
    conversion, a protobuf parse) (google-ai-edge/mediapipe#6233). Patched, a finaliser that
    runs inside a collection leaves the classifier open and warns (``ResourceWarning``, as for
    an unclosed file); outside a collection (the last reference dropped) it closes as upstream
    does. The runners close their classifiers explicitly (``targets.Runners``), so this is the
    backstop for a caller that forgot, never the way they are closed."""
    module = MEDIAPIPE_FINALISER.resolve()
    if module is None:
        return
    classifier = getattr(module, MEDIAPIPE_FINALISER.attribute)
    original = classifier.__dict__.get("__del__")
    if original is None or getattr(original, "never_waits", False):
        return

    def __del__(self):
        if not _Collecting.active:
            original(self)
        elif getattr(self, "_handle", None):
            _Collecting.left_open += 1
            warnings.warn("a MediaPipe ImageClassifier was never closed and reached the garbage "
                          "collector; left open (closing it there hangs: "
                          "google-ai-edge/mediapipe#6233)", ResourceWarning, stacklevel=1)

    __del__.never_waits = True
    classifier.__del__ = __del__
    if _Collecting.track not in gc.callbacks:
        gc.callbacks.append(_Collecting.track)


def mediapipe_classifiers_left_open() -> int:
    """How many MediaPipe classifiers a garbage collection reached unclosed (and left open)."""
    return _Collecting.left_open
