"""The bottleneck cache: each image runs through the frozen backbone once.

Key: (architecture, fingerprint of the exact weights, image loader version, SHA-256 of the image
file, distortion variant). A changed image, weights file or architecture is a cache miss, never
a stale hit. Layout::

    CACHE/<architecture>/<weights fingerprint>-<loader version>/<ab>/<sha256>[.<variant>].bn
    CACHE/engines/<architecture>-<weights fingerprint>.tflite

An entry is a 12-byte header (magic ``TCBN``, float count, CRC-32 of the data) and float32
data: compact, readable without pickle, and a truncated or corrupt entry is detected and
recomputed. Entries and engines are written to a temporary name and renamed, so an interrupted
or concurrent run never leaves a half-written file under a final name.

The engine is a float32 TFLite copy of the frozen backbone, run by XNNPACK: on this kind of
CPU about five times faster than TensorFlow (see DESIGN.md). It is checked against TensorFlow
once when built. One worker thread per core decodes an image and runs it through its own
single-threaded interpreter (PIL and TFLite release the GIL); see :func:`extract` for why.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.distortions import Distortions
from toolchain.errors import CacheError, UnreadableImage
from toolchain.images import LOADER_VERSION, file_digest, load_rgb

log = logging.getLogger("toolchain")

_HEADER = struct.Struct("<4sII")
_MAGIC = b"TCBN"
#: Largest difference allowed between the TFLite engine and TensorFlow on the same input,
#: relative to the features' scale (max(1, largest |feature|)): float32 rounding grows with
#: magnitude, and random-weight Inception features reach the hundreds.
ENGINE_TOLERANCE = 1e-4


class BottleneckCache:
    """Reads and writes cache entries for one backbone (architecture and exact weights)."""

    def __init__(self, root: Path, backbone: Backbone) -> None:
        self.root = Path(root)
        self.backbone = backbone
        self.dir = self.root / backbone.spec.name / f"{backbone.fingerprint[:20]}-{LOADER_VERSION}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot create bottleneck cache {self.dir}: {error.strerror}",
                             hint="pass a writable --bottleneck-dir") from None
        self._sweep()

    def _sweep(self) -> None:
        """Remove the temporary files of runs that were killed mid-write (see atomic.sweep)."""
        atomic.sweep(self.root / "engines")
        try:
            buckets = [entry.path for entry in os.scandir(self.dir) if entry.is_dir()]
        except OSError:
            return
        for bucket in buckets:
            atomic.sweep(Path(bucket))

    def path(self, digest: str, variant: str = "") -> Path:
        name = f"{digest}.{variant}.bn" if variant else f"{digest}.bn"
        return self.dir / digest[:2] / name

    def read(self, digest: str, variant: str = "") -> np.ndarray | None:
        """The cached vector, or None if absent, truncated or corrupt (then it is recomputed)."""
        path = self.path(digest, variant)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CacheError(f"cannot read cache entry {path}: {error.strerror}") from None
        if len(data) >= _HEADER.size:
            magic, count, crc = _HEADER.unpack_from(data)
            payload = data[_HEADER.size:]
            if magic == _MAGIC and len(payload) == 4 * count and zlib.crc32(payload) == crc \
                    and count == self.backbone.bottleneck_size:
                return np.frombuffer(payload, dtype="<f4").copy()
        log.warning("cache entry %s is corrupt or truncated; recomputing it", path)
        return None

    def write(self, digest: str, variant: str, vector: np.ndarray) -> None:
        path = self.path(digest, variant)
        payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot write to bottleneck cache {path.parent}: {error.strerror}",
                             hint="pass a writable --bottleneck-dir with free space") from None
        try:
            atomic.write_bytes(path, _HEADER.pack(_MAGIC, vector.size, zlib.crc32(payload)) + payload)
        except Exception as error:
            raise CacheError(str(error), hint="pass a writable --bottleneck-dir with free space") from None

    @property
    def engine_path(self) -> Path:
        return self.root / "engines" / f"{self.backbone.spec.name}-{self.backbone.fingerprint[:20]}.tflite"


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


def load_engine(cache: BottleneckCache, threads: int = 2) -> Engine:
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
        raise CacheError(f"cannot create {path.parent}: {error.strerror}") from None
    with atomic.replacing(path, suffix=".tflite") as tmp:
        tmp.write_bytes(data)
        engine = Engine(tmp, threads)
        difference = _check_engine(engine, cache.backbone)
        if difference > ENGINE_TOLERANCE:
            raise CacheError(f"the TFLite engine for {cache.backbone.spec.name} differs from "
                             f"TensorFlow by {difference:.2e} of the feature scale "
                             f"(limit {ENGINE_TOLERANCE:g})")
    return Engine(path, threads)


@dataclass(frozen=True)
class Job:
    """One vector to have: an image, or distortion variant ``index`` of it."""

    path: Path
    distortions: Distortions | None = None
    index: int = 0

    @property
    def variant(self) -> str:
        return f"d{self.distortions.tag}-{self.index}" if self.distortions else ""


@dataclass
class ExtractionResult:
    """Vectors by (path, variant), images that failed to decode, and what it cost."""

    vectors: dict[tuple[Path, str], np.ndarray] = field(default_factory=dict)
    failures: dict[Path, str] = field(default_factory=dict)
    cached: int = 0
    computed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    """One extraction worker per core."""
    return max(1, os.cpu_count() or 1)


def extract(jobs: list[Job], cache: BottleneckCache, *, workers: int | None = None,
            progress: bool = True) -> ExtractionResult:
    """Vectors for every job: read from the cache, or computed once and written to it.

    Missing vectors are computed by ``workers`` threads (default: one per core), each decoding
    its image and running its own single-threaded XNNPACK interpreter. Measured on this 2-core
    machine for mobilenet_v2_1.0_224: two 1-thread interpreters side by side reach 168 img/s,
    one 2-thread interpreter 151 img/s, and the 2-thread interpreter with decoding in separate
    threads only 89 img/s end to end, because decoding and XNNPACK's threads fight for the cores.
    PIL's decoding and TFLite's ``invoke`` both release the GIL.
    """
    from tqdm import tqdm

    # disable=None: tqdm shows bars only on a terminal, never as \r frames in CI logs.
    result = ExtractionResult()
    workers = workers or default_workers()
    size = cache.backbone.spec.input_size
    preprocess = cache.backbone.spec.preprocessing.apply
    with ThreadPoolExecutor(max_workers=workers) as pool:
        paths = sorted({job.path for job in jobs})
        digests = dict(zip(paths, pool.map(_digest_or_none, paths)))
        missing = []
        for job in jobs:
            digest = digests[job.path]
            if digest is None:
                result.failures[job.path] = "cannot read the file"
                continue
            vector = cache.read(digest, job.variant)
            if vector is None:
                missing.append(job)
            else:
                result.vectors[(job.path, job.variant)] = vector
                result.cached += 1
        if not missing:
            return result

        # Built (once) and checked before the workers start; the first worker uses this one.
        spare = [load_engine(cache, threads=1)]
        local = threading.local()

        def compute(job: Job) -> np.ndarray:
            if not hasattr(local, "engine"):
                local.engine = spare.pop() if spare else Engine(cache.engine_path, threads=1)
            digest = digests[job.path]
            transform = job.distortions.transform(digest, job.index) if job.distortions else None
            vector = local.engine(preprocess(load_rgb(job.path, size, transform))[None])
            cache.write(digest, job.variant, vector)
            return vector

        start = time.perf_counter()
        futures = {pool.submit(compute, job): job for job in missing}
        try:
            with tqdm(total=len(missing), unit="img", desc="bottlenecks", leave=False,
                      disable=None if progress else True, dynamic_ncols=True) as bar:
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        result.vectors[(job.path, job.variant)] = future.result()
                        result.computed += 1
                    except UnreadableImage as error:
                        if job.path not in result.failures:
                            log.warning("skipping %s: %s", job.path, error.reason)
                        result.failures[job.path] = error.reason
                    bar.update(1)
        except BaseException:
            for future in futures:  # Ctrl-C or an error: stop queued work, keep what is written
                future.cancel()
            raise
        result.seconds = time.perf_counter() - start
    return result


def _digest_or_none(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None
