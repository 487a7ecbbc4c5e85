"""Retrain the last layer: a softmax head trained on cached bottlenecks.

The steps, in order: compute or read every bottleneck (and cached distortion variants) →
train the head with retrain.py's schedule (random batches, SGD, periodic evaluation, TensorBoard
summaries) → measure test accuracy → join backbone and head into one model → check that the
joined model reproduces the head's output on real images → write the model directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolchain import __version__, atomic
from toolchain import model as model_io
from toolchain.backbones import Backbone
from toolchain.cache import BottleneckCache, Job, Vectors, extract
from toolchain.dataset import SUBSETS, Dataset, labels_text
from toolchain.distortions import Distortions
from toolchain.errors import CacheError, DatasetError, ModelError, UsageError
from toolchain.options import Options, option
from toolchain.untrusted import shown

log = logging.getLogger("toolchain")

#: The joined model must reproduce head(bottleneck) this closely on real images.
EXPORT_TOLERANCE = 1e-4


@dataclass(frozen=True, kw_only=True)
class TrainingOptions(Options):
    """retrain.py's training flags, with its defaults."""

    how_many_training_steps: int = option(4000, "training steps")
    learning_rate: float = option(0.01, "SGD learning rate")
    train_batch_size: int = option(100, "images per training step")
    eval_step_interval: int = option(10, "steps between evaluations (TensorBoard points)")
    validation_batch_size: int = option(100, "validation images per evaluation (-1: all)")
    print_misclassified_test_images: bool = option(
        False, "print every test image the retrained model gets wrong")
    seed: int = option(0, "seed of the head's initialisation and of batch sampling")

    def validate(self) -> None:
        if self.how_many_training_steps < 1:
            raise UsageError("--how-many-training-steps must be at least 1")
        if not self.learning_rate > 0:
            raise UsageError("--learning-rate must be positive")
        if self.train_batch_size < 1:
            raise UsageError("--train-batch-size must be at least 1")
        if self.eval_step_interval < 1:
            raise UsageError("--eval-step-interval must be at least 1")
        if self.validation_batch_size == 0 or self.validation_batch_size < -1:
            raise UsageError("--validation-batch-size must be positive, or -1 for all")


@dataclass(frozen=True, kw_only=True)
class OutputOptions(Options):
    """Where retrain.py's extra outputs go, beside the model folder."""

    summaries_dir: Path | None = option(None, "TensorBoard summaries",
                                        shown_default="the model folder's summaries/")
    output_graph: Path | None = option(
        None, "also write a frozen TF-for-Poets graph (tensors input, final_result) here")
    output_labels: Path | None = option(None, "also write the labels here, one per line")


@dataclass(frozen=True)
class RetrainResult:
    """What a retraining run produced."""

    output_dir: Path
    info: model_io.ModelInfo
    train_accuracy: float
    misclassified: tuple[tuple[str, str, str], ...]
    skipped: int
    bottlenecks_cached: int
    bottlenecks_computed: int
    seconds: float
    #: Of ``seconds``, the training steps alone (evaluations and summaries included).
    train_seconds: float = 0.0


def bottleneck_jobs(dataset: Dataset, distortions: Distortions) -> list[Job]:
    """Every bottleneck a training run needs: each image, plus distorted variants if asked.

    Ordered training, validation, testing, then the variants (image by image), so that each
    of training's matrices is a run of consecutive rows of the extraction's one matrix: a view,
    not a copy (:meth:`toolchain.cache.Vectors.rows_of`)."""
    jobs = [Job(entry.path) for subset in SUBSETS for entry in dataset.subset(subset)]
    if distortions.enabled:
        jobs += [Job(entry.path, distortions, index)
                 for entry in dataset.subset("training") for index in range(distortions.variants)]
    return jobs


def _arrays(dataset: Dataset, subset: str, vectors: Vectors) -> tuple[np.ndarray, np.ndarray]:
    entries = dataset.subset(subset)
    if not entries:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    features = vectors.rows_of([(entry.path, "") for entry in entries])
    return features, np.array([entry.label_index for entry in entries])


def train_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               classes: int, options: TrainingOptions, summaries_dir: Path | None,
               progress: bool = True):
    """Train a softmax layer like retrain.py; returns the Keras Dense layer and train accuracy.

    ``train_x`` is (images, dim) or, with distortion variants, (images, variants, dim): each
    step then samples one variant per chosen image.
    """
    import tensorflow as tf
    from tqdm import tqdm

    tf.keras.utils.set_random_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    head = tf.keras.layers.Dense(
        classes, activation="softmax", name="final_result",
        kernel_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.001, seed=options.seed))
    head.build((None, train_x.shape[-1]))
    optimizer = tf.keras.optimizers.SGD(options.learning_rate)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            probabilities = head(x)
            loss = loss_fn(y, probabilities)
        optimizer.apply_gradients(zip(tape.gradient(loss, head.trainable_variables),
                                      head.trainable_variables))
        return loss, probabilities

    @tf.function
    def evaluate(x, y):
        probabilities = head(x)
        accuracy = tf.reduce_mean(tf.cast(tf.argmax(probabilities, 1) == y, tf.float32))
        return accuracy, loss_fn(y, probabilities)

    writers = _summary_writers(summaries_dir)
    steps = options.how_many_training_steps
    train_accuracy = 0.0
    # disable=None: bars only on a terminal, never as \r frames in CI logs.
    with tqdm(total=steps, unit="step", desc="training", leave=False,
              disable=None if progress else True, dynamic_ncols=True) as bar:
        for index in range(steps):
            batch, labels = _batch(rng, train_x, train_y, options.train_batch_size)
            loss, probabilities = step(batch, labels)
            last = index + 1 == steps
            if (index + 1) % options.eval_step_interval and not last:
                bar.update(1)
                continue
            train_accuracy = float(np.mean(np.argmax(probabilities.numpy(), 1) == labels))
            record = {"train": (train_accuracy, float(loss))}
            if len(val_x):
                pick = _validation_pick(rng, len(val_x), options.validation_batch_size)
                accuracy, entropy = evaluate(val_x[pick], val_y[pick])
                record["validation"] = (float(accuracy), float(entropy))
            _summarise(writers, record, index + 1)
            bar.set_postfix({"train": f"{record['train'][0]:.0%}",
                             "val": (f"{record['validation'][0]:.0%}" if "validation" in record
                                     else "-")})
            bar.update(1)
    for writer in writers.values():
        writer.flush()
    return head, train_accuracy


def _summary_writers(summaries_dir: Path | None) -> dict:
    """TensorBoard writers for ``train`` and ``validation`` under ``summaries_dir`` (none
    without one); a folder TensorFlow cannot write is a one-line ModelError."""
    import tensorflow as tf

    if summaries_dir is None:
        return {}
    try:
        return {name: tf.summary.create_file_writer(str(Path(summaries_dir) / name))
                for name in ("train", "validation")}
    except tf.errors.OpError as error:
        # TensorFlow's message is a graph dump; its type says it (PermissionDeniedError...).
        raise ModelError(f"cannot write TensorBoard summaries to {summaries_dir} "
                         f"({type(error).__name__})", hint="pass a writable --summaries-dir") \
            from error


def _batch(rng, train_x: np.ndarray, train_y: np.ndarray, size: int):
    """One training batch drawn with replacement, as retrain.py drew it; with distortion
    variants, one variant per chosen image."""
    chosen = rng.integers(0, len(train_x), size=size)
    batch = train_x[chosen]
    if batch.ndim == 3:
        batch = batch[np.arange(len(chosen)), rng.integers(0, batch.shape[1], len(chosen))]
    return batch, train_y[chosen]


def _validation_pick(rng, count: int, size: int) -> np.ndarray:
    """Which validation rows an evaluation uses: ``size`` drawn with replacement, or all of
    them for -1 or a size at least ``count``."""
    size = count if size == -1 else size
    return rng.integers(0, count, size=size) if size < count else np.arange(count)


def _summarise(writers: dict, record: dict, step: int) -> None:
    """Accuracy and cross-entropy of each of ``record``'s sets at ``step``, to TensorBoard."""
    import tensorflow as tf

    for name, (accuracy, entropy) in record.items():
        if name in writers:
            with writers[name].as_default(step=step):
                tf.summary.scalar("accuracy", accuracy)
                tf.summary.scalar("cross_entropy", entropy)


def join(backbone: Backbone, head):
    """One Keras model: preprocessed image in, probabilities out."""
    import tensorflow as tf

    inputs = tf.keras.Input(shape=backbone.spec.input_shape, name="image")
    return tf.keras.Model(inputs, head(backbone.model(inputs, training=False)),
                          name=f"retrained_{backbone.spec.name.replace('.', '_')}")


def join_graph(backbone: Backbone, head) -> bytes:
    """A frozen-graph backbone's retrained model: retrain.py's ``retrained_graph.pb``."""
    from toolchain import poets

    kernel, bias = (np.asarray(value) for value in head.get_weights())
    graph = poets.append_head(backbone.graph.graph_def, backbone.graph.bottleneck_tensor,
                              kernel, bias, model_io.GRAPH_OUTPUT)
    return graph.SerializeToString()


def _predict(joined, backbone: Backbone):
    """The joined model as ``preprocessed batch → probabilities`` (Keras model or graph bytes)."""
    if not isinstance(joined, bytes):
        return lambda pixels: joined(pixels, training=False).numpy()
    from toolchain import poets

    features = poets.GraphFeatures(poets.parse_graph(joined, model_io.GRAPH_FILE),
                                   backbone.graph.input_tensor, model_io.GRAPH_OUTPUT,
                                   backbone.spec.input_size)
    return lambda pixels: features(pixels).numpy()


def _check_joined(joined, head, entries, bottlenecks: np.ndarray, backbone: Backbone) -> None:
    """The saved graph must compute what was trained: compare on up to 8 real images, whose
    cached ``bottlenecks`` the head was trained on."""
    from toolchain.images import load_rgb

    pixels = np.stack([backbone.spec.preprocessing.apply(load_rgb(e.path, backbone.spec.input_size))
                       for e in entries])
    expected, got = head(bottlenecks).numpy(), _predict(joined, backbone)(pixels)
    if got.shape != expected.shape:
        raise ModelError(f"the joined model answers with shape {list(got.shape)}, the trained "
                         f"head with {list(expected.shape)}")
    difference = float(np.abs(got - expected).max())
    if difference > EXPORT_TOLERANCE:
        raise ModelError(f"the joined model differs from the trained head by {difference:.2e}")


def retrain(dataset: Dataset, backbone: Backbone, *, cache_dir: Path, output_dir: Path,
            training: TrainingOptions = TrainingOptions(),
            distortions: Distortions = Distortions(),
            outputs: OutputOptions = OutputOptions(), progress: bool = True,
            require_cached: bool = False) -> RetrainResult:
    """Run the whole retraining stage and write the model directory: check the outputs can be
    written, fill the bottleneck cache, train the head, measure it, save the joined model.

    With ``require_cached`` no bottleneck is computed: a vector missing from the cache is a
    ``CacheError`` naming how many and which, before any training (sharded extraction first).

    TensorBoard summaries go to ``outputs.summaries_dir``, by default ``output_dir/summaries``;
    with ``training.print_misclassified_test_images`` each misclassified test image is printed,
    as retrain.py printed them.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    summaries_dir = outputs.summaries_dir or output_dir / "summaries"
    _check_writable(output_dir, summaries_dir, outputs)
    extraction, dataset = _bottlenecks(dataset, backbone, cache_dir, distortions, progress,
                                       require_cached)
    vectors = extraction.vectors
    train_x, train_y = _training_rows(dataset, vectors, distortions)
    val_x, val_y = _arrays(dataset, "validation", vectors)
    test_x, test_y = _arrays(dataset, "testing", vectors)

    log.info("training the last layer for %d steps (bottlenecks: %d cached, %d computed)",
             training.how_many_training_steps, extraction.cached, extraction.computed)
    training_start = time.perf_counter()
    head, train_accuracy = train_head(train_x, train_y, val_x, val_y, len(dataset.labels),
                                      training, summaries_dir, progress)
    train_seconds = time.perf_counter() - training_start
    val_accuracy = (float(np.mean(np.argmax(head(val_x).numpy(), 1) == val_y)) if len(val_x)
                    else None)
    test_accuracy, misclassified = _tested(head, dataset, test_x, test_y)
    if training.print_misclassified_test_images:
        for relpath, truth, guess in misclassified:
            print(shown(f"misclassified: {relpath} (true {truth}, predicted {guess})"),
                  flush=True)
    info = _save(dataset, backbone, head, vectors, output_dir, outputs, training, distortions,
                 test_accuracy=test_accuracy, val_accuracy=val_accuracy, tested=len(test_x))
    return RetrainResult(output_dir, info, train_accuracy, tuple(misclassified),
                         len(dataset.skipped), extraction.cached, extraction.computed,
                         time.perf_counter() - start, train_seconds)


def _check_writable(output_dir: Path, summaries_dir: Path, outputs: OutputOptions) -> None:
    """Every folder retrain writes to can be written, before the long work, not after it; the
    output folder first, so that is what an error names when the summaries go inside it."""
    wanted = [output_dir, Path(summaries_dir),
              *(Path(p).parent for p in (outputs.output_graph, outputs.output_labels)
                if p is not None)]
    for folder in dict.fromkeys(wanted):
        atomic.check_writable(folder)


def _bottlenecks(dataset: Dataset, backbone: Backbone, cache_dir: Path,
                 distortions: Distortions, progress: bool, require_cached: bool):
    """(extraction, dataset without the images that failed): every bottleneck the training
    needs, from the cache or computed (none with ``require_cached``: then a missing one is a
    CacheError); at least two classes must keep training images."""
    cache = BottleneckCache(cache_dir, backbone)
    extraction = extract(bottleneck_jobs(dataset, distortions), cache, progress=progress,
                         compute=not require_cached)
    if extraction.missing:
        missing = extraction.missing
        raise CacheError(
            f"{len(missing)} of {len(missing) + extraction.cached} bottlenecks are not in "
            f"{cache.dir} (first: {missing[0][0].path}); --require-cached computes none",
            hint="run `toolchain bottlenecks` (with --shard I/N on each worker) first; "
                 "`toolchain bottlenecks --status --shards N` names the incomplete shards")
    dataset = dataset.without(extraction.failures)
    counts = dataset.counts()
    trainable = [label for label in dataset.labels if counts[label]["training"]]
    if len(trainable) < 2:
        raise DatasetError(f"only {len(trainable)} class(es) have training images; need 2",
                           hint="add images, or lower --validation-percentage/--testing-percentage")
    return extraction, dataset


def _training_rows(dataset: Dataset, vectors, distortions: Distortions):
    """(x, y) of the training split: one bottleneck per image, or with distortions
    ``(images, variants, size)``, each image's distorted variants."""
    train_x, train_y = _arrays(dataset, "training", vectors)
    if distortions.enabled:
        entries = dataset.subset("training")
        train_x = vectors.rows_of([(e.path, Job(e.path, distortions, i).variant)
                                   for e in entries for i in range(distortions.variants)]
                                  ).reshape(len(entries), distortions.variants, -1)
    return train_x, train_y


def _tested(head, dataset: Dataset, test_x, test_y):
    """(test accuracy or None, misclassified ``(relpath, truth, guess)``) on the testing
    split; an empty one is a warning."""
    if not len(test_x):
        log.warning("the test set is empty, so no test accuracy is measured; "
                    "add images or raise --testing-percentage")
        return None, []
    predicted = np.argmax(head(test_x).numpy(), 1)
    misclassified = [(entry.relpath, entry.label, dataset.labels[guess])
                     for entry, guess in zip(dataset.subset("testing"), predicted)
                     if guess != entry.label_index]
    return float(np.mean(predicted == test_y)), misclassified


def _save(dataset: Dataset, backbone: Backbone, head, vectors, output_dir: Path,
          outputs: OutputOptions, training: TrainingOptions, distortions: Distortions, *,
          test_accuracy, val_accuracy, tested: int) -> model_io.ModelInfo:
    """Join backbone and head, check the joined model computes what the head computed on
    cached bottlenecks, and write the model folder (and retrain.py's graph and labels files
    when asked); returns the model's ``model.json`` record."""
    checked = (dataset.subset("testing") or dataset.subset("training"))[:8]
    check_rows = np.stack([vectors[(e.path, "")] for e in checked])
    joined = join_graph(backbone, head) if backbone.graph else join(backbone, head)
    _check_joined(joined, head, checked, check_rows, backbone)
    graph_record = None
    if backbone.graph:
        graph_record = {**backbone.graph.record(), "input_size": backbone.spec.input_size,
                        "graph": model_io.GRAPH_FILE, "output_tensor": model_io.GRAPH_OUTPUT}
    info = model_io.ModelInfo(
        architecture=backbone.spec.name, labels=dataset.labels, weights=backbone.source,
        weights_fingerprint=backbone.fingerprint, bottleneck_size=backbone.bottleneck_size,
        test_accuracy=test_accuracy, validation_accuracy=val_accuracy, test_images=tested,
        training_steps=training.how_many_training_steps, toolchain_version=__version__,
        backbone=graph_record)
    record = dataset.record()
    record["training_options"] = asdict(training)
    record["distortions"] = asdict(distortions)
    model_io.save(output_dir, joined, info, record)
    if outputs.output_graph is not None:
        atomic.write_bytes(Path(outputs.output_graph), joined if isinstance(joined, bytes)
                           else model_io.frozen_graph_bytes(joined))
    if outputs.output_labels is not None:
        atomic.write_text(Path(outputs.output_labels), labels_text(dataset.labels))
    return info
