"""The bottleneck cache: each image runs through the frozen backbone once.

Key: (architecture, fingerprint of the exact weights, image loader version, SHA-256 of the image
file, distortion variant). A changed image, weights file or architecture is a cache miss, never
a stale hit. Layout::

    CACHE/<architecture>/<weights fingerprint>-<loader version>/<ab>/<sha256>[.<variant>].bn
    CACHE/engines/<architecture>-<weights fingerprint>.tflite
    CACHE/engines/<architecture>-<weights fingerprint>.runtime.json

An entry is a 12-byte header (magic ``TCBN``, float count, CRC-32 of the data) and float32
data: compact, readable without pickle, and a truncated or corrupt entry is detected and
recomputed. Entries and engines are written to a temporary name and renamed, so an interrupted
or concurrent run never leaves a half-written file under a final name.

Missing vectors are computed by the faster of two runtimes for the backbone on this machine,
measured once and recorded (``.runtime.json``; see :mod:`toolchain.engine`): a float32 TFLite
copy of the backbone under XNNPACK (MobileNets), or TensorFlow on batches (Inception V3).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.distortions import Distortions
from toolchain.engine import (  # noqa: F401 (ENGINE_TOLERANCE... are part of this API)
    BATCH,
    ENGINE_TOLERANCE,
    TENSORFLOW,
    XNNPACK,
    Engine,
    batched_function,
    choose_runtime,
    engine_difference,
    float_tflite_bytes,
    load_engine,
)
from toolchain.errors import CacheError, UnreadableImage, UsageError, first_line
from toolchain.images import LOADER_VERSION, file_digest, load_rgb

log = logging.getLogger("toolchain")

_HEADER = struct.Struct("<4sII")
#: Images decoded and run at once on the XNNPACK path: enough to keep every worker busy.
IN_FLIGHT = 256
_MAGIC = b"TCBN"


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
                             hint="pass a writable --bottleneck-dir") from error
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
            raise CacheError(f"cannot read cache entry {path}: {error.strerror}") from error
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
                             hint="pass a writable --bottleneck-dir with free space") from error
        try:
            header = _HEADER.pack(_MAGIC, vector.size, zlib.crc32(payload))
            atomic.write_bytes(path, header + payload)
        except Exception as error:  # noqa: BLE001 (any failed write is one CacheError)
            raise CacheError(str(error),
                             hint="pass a writable --bottleneck-dir with free space") from error

    @property
    def engine_path(self) -> Path:
        name = f"{self.backbone.spec.name}-{self.backbone.fingerprint[:20]}.tflite"
        return self.root / "engines" / name


@dataclass(frozen=True, slots=True)
class Job:
    """One vector to have: an image, or distortion variant ``index`` of it."""

    path: Path
    distortions: Distortions | None = None
    index: int = 0

    @property
    def variant(self) -> str:
        return f"d{self.distortions.tag}-{self.index}" if self.distortions else ""


def shard_of(digest: str, count: int) -> int:
    """The shard (from 0) of the image whose SHA-256 is ``digest``, among ``count``."""
    return int(digest[:16], 16) % count


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: the images whose content hash is ``I`` modulo ``N`` (``I`` from 0).

    Decided by the SHA-256 of each file, like the cache key, so an image stays in its shard
    when images are added or renamed, every image is in exactly one shard, and N job-array
    tasks (``$JOB_COMPLETION_INDEX``, ``$SLURM_ARRAY_TASK_ID``, a CI matrix) fill one shared
    cache without talking to each other."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise UsageError(f"--shard takes I/N (e.g. 0/4), not {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard {text}: I must be from 0 to N-1 and N at least 1")
        return cls(index, count)

    def owns(self, digest: str) -> bool:
        return shard_of(digest, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Vectors(Mapping):
    """The extracted vectors by (path, variant), held in one float32 matrix, a row per job.

    Each vector is copied into its job's row as it is read or computed, so extraction holds
    the bottleneck matrix and nothing else per image: no array object per vector, whose
    freed memory the allocator would keep (measured before this, 60,000 images: 330 MB more
    resident after extraction for a 132 MB matrix). The matrix is allocated on the first
    vector, rows in the order of the jobs; a job with no vector (its image failed, or it was
    left to another shard) has no key. ``rows_of(keys)`` gives the matrix of a run of keys
    without a copy when their rows are consecutive.
    """

    def __init__(self, jobs: list[Job] = ()) -> None:
        self._row = {(job.path, job.variant): index for index, job in enumerate(jobs)}
        self._filled = np.zeros(len(jobs), bool)  # a job given twice keeps its last row
        self.matrix = np.zeros((0, 0), np.float32)

    def put(self, job: Job, vector: np.ndarray) -> None:
        """Store ``job``'s vector in its row."""
        if not self.matrix.size:
            self.matrix = np.empty((len(self._filled), vector.size), np.float32)
        row = self._row[(job.path, job.variant)]
        self.matrix[row] = vector
        self._filled[row] = True

    def rows_of(self, keys: list[tuple[Path, str]]) -> np.ndarray:
        """The vectors of ``keys`` as one matrix: a view when their rows run consecutively
        (training's order, see :func:`toolchain.training.bottleneck_jobs`), else a copy."""
        rows = np.fromiter((self._row_filled(key) for key in keys), np.int64, len(keys))
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            return self.matrix[rows[0]:rows[0] + len(rows)]
        return self.matrix[rows]

    def _row_filled(self, key: tuple[Path, str]) -> int:
        row = self._row.get(key)
        if row is None or not self._filled[row]:
            raise KeyError(key)
        return row

    def __getitem__(self, key: tuple[Path, str]) -> np.ndarray:
        return self.matrix[self._row_filled(key)]

    def __iter__(self) -> Iterator[tuple[Path, str]]:
        return (key for key, row in self._row.items() if self._filled[row])

    def __len__(self) -> int:
        return int(self._filled.sum())


@dataclass
class ExtractionResult:
    """Vectors by (path, variant), images that failed to decode, and what it cost."""

    vectors: Vectors = field(default_factory=Vectors)
    failures: dict[Path, str] = field(default_factory=dict)
    cached: int = 0
    computed: int = 0
    seconds: float = 0.0
    #: The runtime that computed the missing vectors (``xnnpack`` or ``tensorflow``), if any.
    runtime: str = ""
    #: Vectors not in the cache and not computed (``compute=False``), with their image digests.
    missing: list[tuple[Job, str]] = field(default_factory=list)
    #: Vectors left to other shards.
    elsewhere: int = 0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    """One extraction worker per core."""
    return max(1, os.cpu_count() or 1)


def extract(jobs: list[Job], cache: BottleneckCache, *, workers: int | None = None,
            progress: bool = True, runtime: str | None = None, shard: Shard | None = None,
            compute: bool = True, keep: bool = True) -> ExtractionResult:
    """Vectors for every job: read from the cache, or computed once and written to it.

    With ``shard``, only the jobs of images in that shard are read or computed; the others are
    counted in ``elsewhere``. With ``compute=False`` nothing is computed: the jobs whose vectors
    are not cached are returned in ``missing`` (``--require-cached``, ``--status``). With
    ``keep=False`` the vectors are only counted, not returned (``toolchain bottlenecks``: a
    million images need not fit in memory to be cached).

    Missing vectors are computed by the faster runtime for this backbone on this machine
    (:func:`toolchain.engine.choose_runtime`; ``runtime`` forces one). With XNNPACK, ``workers``
    threads (default: one per core) each decode an image and run their own single-threaded
    interpreter: measured for mobilenet_v2_1.0_224, two 1-thread interpreters side by side reach
    168 img/s, one 2-thread interpreter 151 img/s, and the 2-thread interpreter with decoding in
    separate threads only 89 img/s, because decoding and XNNPACK's threads fight for the cores.
    With TensorFlow, the workers decode the next batch while TensorFlow runs this one. PIL's
    decoding, TFLite's ``invoke`` and TensorFlow all release the GIL.
    """
    result = ExtractionResult(Vectors(jobs) if keep else Vectors())
    workers = workers or default_workers()
    with _workers(workers) as pool:
        paths = sorted({job.path for job in jobs})
        digests = dict(zip(paths, _digests(pool, paths)))
        missing = _read_cached(jobs, cache, digests, result, shard, keep)
        if not compute:
            result.missing = [(job, digests[job.path]) for job in missing]
            return result
        if not missing:
            return result

        # Built (once) and checked before the workers start; the first worker uses this one.
        engine = _engine_or_none(cache)
        result.runtime = runtime or (choose_runtime(cache, workers, engine).runtime if engine
                                     else TENSORFLOW)
        outcomes = (_on_xnnpack(missing, cache, digests, pool, engine)
                    if result.runtime == XNNPACK else _on_tensorflow(missing, cache, digests, pool))
        start = time.perf_counter()
        _collect(outcomes, len(missing), result, keep, progress)
        result.seconds = time.perf_counter() - start
    return result


def _read_cached(jobs: list[Job], cache: BottleneckCache, digests: dict, result: ExtractionResult,
                 shard: Shard | None, keep: bool) -> list[Job]:
    """Count (and with ``keep``, hold) every vector already in the cache, note the images that
    cannot be read and those another shard owns; returns the jobs still to compute."""
    missing = []
    for job in jobs:
        digest = digests[job.path]
        if digest is None:
            result.failures[job.path] = "cannot read the file"
            continue
        if shard is not None and not shard.owns(digest):
            result.elsewhere += 1
            continue
        vector = cache.read(digest, job.variant)
        if vector is None:
            missing.append(job)
            continue
        if keep:
            result.vectors.put(job, vector)
        result.cached += 1
    return missing


def _collect(outcomes, total: int, result: ExtractionResult, keep: bool, progress: bool) -> None:
    """Take the computed vectors into ``result`` as they come, with a progress bar; an image
    that cannot be decoded is a warning (once per image) and a failure."""
    from tqdm import tqdm

    # disable=None: tqdm shows bars only on a terminal, never as \r frames in CI logs.
    with tqdm(total=total, unit="img", desc="bottlenecks", leave=False,
              disable=None if progress else True, dynamic_ncols=True) as bar:
        for job, outcome in outcomes:
            if isinstance(outcome, UnreadableImage):
                if job.path not in result.failures:
                    log.warning("skipping %s: %s", job.path, outcome.reason)
                result.failures[job.path] = outcome.reason
            else:
                if keep:
                    result.vectors.put(job, outcome)
                result.computed += 1
            bar.update(1)


@contextlib.contextmanager
def _workers(count: int):
    """A thread pool that, on Ctrl-C or an error, drops its queued jobs instead of running them
    all before the exception can leave (what is already written stays)."""
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _engine_or_none(cache: BottleneckCache) -> Engine | None:
    """The TFLite engine; for a frozen-graph backbone, None (TensorFlow computes) when TFLite
    cannot convert the graph, as with ops outside its builtins (retrain.py's quantized graphs)."""
    try:
        return load_engine(cache, threads=1)
    except Exception as error:  # noqa: BLE001 (the converter raises many kinds)
        if cache.backbone.graph is None:
            raise
        log.warning("no TFLite engine for %s (%s); TensorFlow computes its bottlenecks",
                    cache.backbone.spec.name, first_line(error, 120))
        return None


def _pixels(job: Job, cache: BottleneckCache, digest: str) -> np.ndarray:
    """The job's preprocessed image, distorted if it is a distortion variant."""
    spec = cache.backbone.spec
    transform = job.distortions.transform(digest, job.index) if job.distortions else None
    return spec.preprocessing.apply(load_rgb(job.path, spec.input_size, transform))


def _on_xnnpack(missing, cache, digests, pool, engine):
    """(job, vector or UnreadableImage) as workers finish: each decodes and runs its engine."""
    spare, local, results = [engine], threading.local(), queue.SimpleQueue()

    def compute(job: Job) -> None:
        try:
            if not hasattr(local, "engine"):
                local.engine = spare.pop() if spare else Engine(cache.engine_path, threads=1)
            digest = digests[job.path]
            vector = local.engine(_pixels(job, cache, digest)[None])
            cache.write(digest, job.variant, vector)
            results.put((job, vector))
        except BaseException as error:  # noqa: BLE001 (handed to the main thread, raised there)
            results.put((job, error))

    # A bounded window of jobs in flight, not one future per image: with 60,000 images, futures
    # holding every finished vector doubled extraction's memory (bench --scale). The workers
    # hand results over a queue rather than the main thread waiting on their futures:
    # concurrent.futures.wait() takes every future's lock in turn, and a Ctrl-C landing midway
    # left some taken, so a worker finishing its job blocked on one forever and the run never
    # stopped (seen in CI).
    waiting = iter(missing)

    def submit(count: int) -> int:
        jobs = list(itertools.islice(waiting, count))
        for job in jobs:
            pool.submit(compute, job)
        return len(jobs)

    in_flight = submit(IN_FLIGHT)
    while in_flight:
        job, outcome = results.get()
        if isinstance(outcome, BaseException) and not isinstance(outcome, UnreadableImage):
            raise outcome
        yield job, outcome
        in_flight += submit(1) - 1


def _on_tensorflow(missing, cache, digests, pool):
    """(job, vector or UnreadableImage) batch by batch: the workers decode the next batch
    while TensorFlow runs this one; at most two batches of pixels are held. On Ctrl-C or an
    error, the pool drops the next batch's queued decoding (:func:`_workers`)."""
    function = batched_function(cache.backbone)
    batches = [missing[i:i + BATCH] for i in range(0, len(missing), BATCH)]

    def decode(batch):
        return [pool.submit(_pixels, job, cache, digests[job.path]) for job in batch]

    pending = decode(batches[0])
    for index, batch in enumerate(batches):
        current, pending = pending, (decode(batches[index + 1])
                                     if index + 1 < len(batches) else [])
        decoded, arrays = [], []
        for job, future in zip(batch, current):
            try:
                arrays.append(future.result())
                decoded.append(job)
            except UnreadableImage as error:
                yield job, error
        if decoded:
            vectors = function(np.stack(arrays)).numpy()
            for job, vector in zip(decoded, vectors):
                cache.write(digests[job.path], job.variant, vector)
                yield job, vector


#: Files hashed per task: one future per file took 2 KB each that the allocator kept
#: (measured: 119 MB for 60,000 files); per chunk the bookkeeping is negligible.
DIGEST_CHUNK = 256


def _digests(pool: ThreadPoolExecutor, paths: list[Path]) -> Iterator[str | None]:
    """The SHA-256 of each of ``paths`` (None for an unreadable one), in order, hashed by the
    pool's workers :data:`DIGEST_CHUNK` files per task."""
    chunks = [paths[i:i + DIGEST_CHUNK] for i in range(0, len(paths), DIGEST_CHUNK)]
    for digests in pool.map(lambda chunk: [_digest_or_none(path) for path in chunk], chunks):
        yield from digests


def _digest_or_none(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


@dataclass(frozen=True)
class CacheStatus:
    """How much of a folder's bottlenecks the cache holds, overall and per shard."""

    cache_dir: Path
    vectors: int
    cached: int
    unreadable: int
    #: Missing vectors per shard index, for ``shards`` shards (one shard: the whole folder).
    missing_by_shard: tuple[int, ...]
    #: A few of the images whose vectors are missing, for the message.
    examples: tuple[Path, ...] = ()

    @property
    def missing(self) -> int:
        return sum(self.missing_by_shard)

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def incomplete_shards(self) -> list[int]:
        return [index for index, count in enumerate(self.missing_by_shard) if count]


def status(jobs: list[Job], cache: BottleneckCache, shards: int = 1,
           workers: int | None = None) -> CacheStatus:
    """What :func:`extract` would read and compute for ``jobs``, without computing anything."""
    result = extract(jobs, cache, workers=workers, progress=False, compute=False, keep=False)
    by_shard = [0] * shards
    for _, digest in result.missing:
        by_shard[shard_of(digest, shards)] += 1
    examples = tuple(dict.fromkeys(job.path for job, _ in result.missing))[:3]
    return CacheStatus(cache.dir, result.cached + len(result.missing), result.cached,
                       len(result.failures), tuple(by_shard), examples)
