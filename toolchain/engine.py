"""The engines that turn a preprocessed image into its bottleneck vector, and which one runs.

Two runtimes compute the frozen backbone, and which is faster depends on the backbone and the
CPU. Measured on this project's 2-core machine (``toolchain bench``): for MobileNets a float32
TFLite copy under XNNPACK, one single-threaded interpreter per core, is about twice TensorFlow
batched (625 against 297 img/s for mobilenet_0.50_224); for Inception V3 TensorFlow batched is
about twice XNNPACK (25.0 against 13.2 img/s; batching XNNPACK does not close the gap: 14.3).
So the choice is measured, once per weights on each machine, by :func:`choose_runtime`, and
recorded beside the TFLite engine.

The TFLite engine is built once per weights, cached, and checked against TensorFlow when built.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.errors import CacheError, ToolchainError

log = logging.getLogger("toolchain")

#: Largest difference allowed between the TFLite engine and TensorFlow on the same input,
#: relative to the features' scale (max(1, largest |feature|)): float32 rounding grows with
#: magnitude, and random-weight Inception features reach the hundreds.
ENGINE_TOLERANCE = 1e-4


class Engine:
    """The backbone as a float32 TFLite model under XNNPACK: preprocessed image in, vector out."""

    def __init__(self, model_path: Path, threads: int) -> None:
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_path=str(model_path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._input, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)[0]


def engine_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest difference, relative to the features' scale; compare with ENGINE_TOLERANCE."""
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def _check_engine(engine: Engine, backbone: Backbone) -> float:
    """Scaled difference between the engine and TensorFlow on a seeded synthetic image."""
    size = backbone.spec.input_size
    rng = np.random.default_rng(1)
    coarse = rng.uniform(0, 255, size=(4, 4, 3))
    pixels = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
    batch = backbone.spec.preprocessing.apply(pixels.astype(np.uint8))[None]
    expected = backbone.model(batch, training=False).numpy()[0]
    return engine_difference(engine(batch), expected)


def float_tflite_bytes(keras_model) -> bytes:
    """A float32 TFLite flatbuffer of ``keras_model`` with a batch-1 input.

    Converted from a frozen concrete function, not through ``from_keras_model``: that path
    round-trips a SavedModel, and with the pure-Python protobuf that tflite-support's
    ``protobuf<4`` pin forces on Python 3.11 (no compiled 3.20 wheel exists for it), it took
    75 s instead of 2.7 s for a small MobileNetV2 on this machine.
    """
    import tensorflow as tf

    shape = [1, *keras_model.input_shape[1:]]
    function = tf.function(lambda image: keras_model(image, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()


def load_engine(cache, threads: int = 2) -> Engine:
    """The cached TFLite engine for this backbone, converting it once if absent or unreadable."""
    path = cache.engine_path
    if path.is_file():
        try:
            return Engine(path, threads)
        except (ValueError, RuntimeError):
            log.warning("engine %s is unreadable; rebuilding it", path)
    log.info("building the TFLite engine for %s (once per weights)", cache.backbone.spec.name)
    data = float_tflite_bytes(cache.backbone.model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create {path.parent}: {error.strerror}") from error
    with atomic.replacing(path, suffix=".tflite") as tmp:
        tmp.write_bytes(data)
        engine = Engine(tmp, threads)
        difference = _check_engine(engine, cache.backbone)
        if difference > ENGINE_TOLERANCE:
            raise CacheError(f"the TFLite engine for {cache.backbone.spec.name} differs from "
                             f"TensorFlow by {difference:.2e} of the feature scale "
                             f"(limit {ENGINE_TOLERANCE:g})")
    return Engine(path, threads)


#: The runtimes :func:`choose_runtime` picks between.
XNNPACK, TENSORFLOW = "xnnpack", "tensorflow"
#: TensorFlow must be this much faster to be chosen: XNNPACK is the default (less memory, and
#: its engine is the one checked when built), so noise alone never flips the choice.
TENSORFLOW_MARGIN = 1.2
#: Images per TensorFlow batch, in the measurement and in extraction.
BATCH = 16


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime extraction uses, and the rates (images/s) that decided it."""

    runtime: str
    xnnpack: float
    tensorflow: float
    workers: int


def batched_function(backbone: Backbone):
    """The backbone as a ``tf.function`` on batches of any size: one trace, no retracing."""
    import tensorflow as tf

    size = backbone.spec.input_size
    model = backbone.model
    return tf.function(lambda images: model(images, training=False),
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
                       autograph=False)


def _synthetic(backbone: Backbone, count: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    size = backbone.spec.input_size
    pixels = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return backbone.spec.preprocessing.apply(pixels)


def _measure(cache, workers: int, engine: Engine | None) -> RuntimeChoice:
    """Images/s of each runtime on synthetic images, as extraction would run them."""
    images = _synthetic(cache.backbone, BATCH)
    engine = engine or Engine(cache.engine_path, threads=1)
    engine(images[:1])  # XNNPACK packs its weights on the first call
    start = time.perf_counter()
    for image in images[:4]:
        engine(image[None])
    xnnpack = workers * 4 / (time.perf_counter() - start)  # one interpreter per worker
    function = batched_function(cache.backbone)
    function(images).numpy()  # trace and warm up
    start = time.perf_counter()
    function(images).numpy()
    tensorflow = len(images) / (time.perf_counter() - start)
    runtime = TENSORFLOW if tensorflow > TENSORFLOW_MARGIN * xnnpack else XNNPACK
    return RuntimeChoice(runtime, xnnpack, tensorflow, workers)


def choice_path(cache) -> Path:
    return cache.engine_path.with_suffix(".runtime.json")


def choose_runtime(cache, workers: int, engine: Engine | None = None) -> RuntimeChoice:
    """The faster runtime for this backbone here: recorded once, else measured (seconds).

    ``engine``: a single-threaded engine the caller already loaded, to measure with."""
    path = choice_path(cache)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        choice = RuntimeChoice(**recorded)
        if choice.runtime in (XNNPACK, TENSORFLOW) and choice.workers == workers:
            return choice
    except (OSError, ValueError, TypeError):
        pass  # absent, unreadable or from another worker count: measure again
    choice = _measure(cache, workers, engine)
    log.info("bottleneck engine for %s: %s (measured %.1f img/s, the other runtime %.1f)",
             cache.backbone.spec.name, choice.runtime,
             max(choice.xnnpack, choice.tensorflow), min(choice.xnnpack, choice.tensorflow))
    try:
        atomic.write_json(path, asdict(choice))
    except ToolchainError as error:  # a read-only cache still works: measured again next run
        log.debug("cannot record the runtime choice: %s", error)
    return choice
