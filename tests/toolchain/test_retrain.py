"""Retraining: the model directory, its manifest, the split record, summaries and the .pb."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import TINY_ARCH
from toolchain import model as model_io
from toolchain.dataset import scan
from toolchain.errors import DatasetError, ModelError, UsageError
from toolchain.images import load_rgb
from toolchain.training import TrainingOptions, retrain


def test_output_directory_holds_a_complete_model(retrained, sample_dir):
    out = retrained.output_dir
    for name in ("model.keras", "labels.txt", "model.json", "split.json"):
        assert (out / name).is_file(), name
    labels = (out / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == sorted(p.name for p in sample_dir.iterdir() if p.is_dir())
    info = model_io.load_info(out)
    assert info.architecture == TINY_ARCH and list(info.labels) == labels
    assert info.test_images == len(scan(sample_dir).subset("testing")) > 0
    assert 0.0 <= info.test_accuracy <= 1.0
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["input"]["preprocessing"]["mean"] == [127.5] * 3
    assert manifest["input"]["shape"] == [1, 96, 96, 3]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_head_learns_the_sample_data(retrained):
    """Even on random backbone weights the sample classes are learnable (6 classes: chance 17%)."""
    assert retrained.train_accuracy >= 0.8
    assert retrained.info.test_accuracy >= 0.4


def test_split_record_partitions_every_image(retrained, sample_dir):
    record = json.loads((retrained.output_dir / "split.json").read_text())
    sets = record["sets"]
    every = [p for s in sets.values() for p in s]
    assert len(every) == len(set(every)) == len(list(sample_dir.glob("*/*.*")))
    assert record["validation_percentage"] == record["testing_percentage"] == 10.0
    assert record["training_options"]["how_many_training_steps"] == 300


def test_saved_model_reproduces_the_reported_test_accuracy(retrained, sample_dir):
    keras_model = model_io.load_keras(retrained.output_dir)
    info = model_io.load_info(retrained.output_dir)
    dataset = scan(sample_dir)
    test = dataset.subset("testing")
    batch = np.stack([info.spec.preprocessing.apply(load_rgb(e.path, info.spec.input_size))
                      for e in test])
    probabilities = keras_model(batch, training=False).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = np.mean(probabilities.argmax(1) == [e.label_index for e in test])
    assert accuracy == pytest.approx(info.test_accuracy, abs=1e-9)
    wrong = {(e.relpath, e.label) for e, p in zip(test, probabilities.argmax(1))
             if p != e.label_index}
    assert wrong == {(path, truth) for path, truth, _ in retrained.misclassified}


def test_frozen_graph_has_retrain_py_tensor_names_and_same_outputs(retrained, sample_dir):
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((retrained.output_dir.parent / "retrained_graph.pb").read_bytes())
    names = {node.name for node in graph_def.node}
    assert {"input", "final_result"} <= names
    function = tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    prune = function.prune(function.graph.get_tensor_by_name("input:0"),
                           function.graph.get_tensor_by_name("final_result:0"))
    info = model_io.load_info(retrained.output_dir)
    image = next(sample_dir.glob("ocean/*.jpg"))
    batch = info.spec.preprocessing.apply(load_rgb(image, info.spec.input_size))[None]
    expected = model_io.load_keras(retrained.output_dir)(batch, training=False).numpy()
    np.testing.assert_allclose(prune(tf.constant(batch)).numpy(), expected, atol=1e-5)
    labels = (retrained.output_dir.parent / "retrained_labels.txt").read_text().splitlines()
    assert labels == list(info.labels)


def test_tensorboard_summaries(retrained):
    import tensorflow as tf

    for run in ("train", "validation"):
        files = list((retrained.output_dir / "summaries" / run).glob("events.out.tfevents.*"))
        assert files, run
        tags = {value.tag for path in files
                for event in tf.compat.v1.train.summary_iterator(str(path))
                for value in event.summary.value}
        assert {"accuracy", "cross_entropy"} <= tags


def test_rerun_reuses_every_bottleneck(retrained, sample_dir, tiny_backbone, session_cache,
                                       tmp_path):
    again = retrain(scan(sample_dir), tiny_backbone, cache_dir=session_cache,
                    output_dir=tmp_path / "again",
                    training=TrainingOptions(how_many_training_steps=300, eval_step_interval=50),
                    progress=False)
    assert again.bottlenecks_computed == 0
    assert again.bottlenecks_cached == retrained.bottlenecks_cached + retrained.bottlenecks_computed
    assert again.info.test_accuracy == retrained.info.test_accuracy  # same seed, same result


def test_distortions_train_on_cached_variants(sample_dir, tiny_backbone, session_cache, tmp_path):
    from toolchain.distortions import Distortions

    distortions = Distortions(flip_left_right=True, random_brightness=10, variants=2)
    dataset = scan(sample_dir)
    result = retrain(dataset, tiny_backbone, cache_dir=session_cache, output_dir=tmp_path / "m",
                     training=TrainingOptions(how_many_training_steps=50),
                     distortions=distortions, progress=False)
    training = len(dataset.subset("training"))
    assert result.bottlenecks_computed == 2 * training  # the variants; plain ones were cached
    rerun = retrain(dataset, tiny_backbone, cache_dir=session_cache, output_dir=tmp_path / "m",
                    training=TrainingOptions(how_many_training_steps=50),
                    distortions=distortions, progress=False)
    assert rerun.bottlenecks_computed == 0


def test_a_class_without_training_images_cannot_train(tmp_path, sample_dir, tiny_backbone,
                                                      session_cache):
    import shutil

    data = tmp_path / "two"
    shutil.copytree(sample_dir / "forest", data / "forest")
    (data / "lonely").mkdir()
    shutil.copy(next((sample_dir / "ocean").glob("*.jpg")), data / "lonely" / "x.jpg")
    with pytest.raises(DatasetError, match="training images"):
        from toolchain.dataset import SplitOptions

        split = SplitOptions(validation_percentage=0, testing_percentage=99)
        retrain(scan(data, split), tiny_backbone, cache_dir=session_cache,
                output_dir=tmp_path / "o", training=TrainingOptions(how_many_training_steps=5),
                progress=False)


@pytest.mark.parametrize("field, value", [("how_many_training_steps", 0), ("learning_rate", 0),
                                          ("train_batch_size", 0), ("eval_step_interval", 0),
                                          ("validation_batch_size", -2)])
def test_training_options_are_validated(field, value):
    with pytest.raises(UsageError):
        TrainingOptions(**{field: value})


def test_manifest_checks(retrained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(retrained.output_dir, copy)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["input"]["preprocessing"]["scale"] = 1.0
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="preprocessing"):
        model_io.load_info(copy)
    (copy / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        model_io.load_info(copy)
    with pytest.raises(ModelError, match="no retrained model"):
        model_io.load_info(tmp_path)
    build_like = tmp_path / "build"
    shutil.copytree(retrained.output_dir, build_like / "model")
    assert model_io.find_dir(build_like) == build_like / "model"


def test_each_step_draws_the_batch_sizes_given(monkeypatch):
    """--train-batch-size images per step, --validation-batch-size per evaluation (every
    --eval-step-interval steps and at the last): read from the draws themselves, so two
    same-typed options swapped on their way in fail here (the seam build only sees the record)."""
    from toolchain import training

    draws = []
    real = np.random.default_rng

    class Recorded:
        def __init__(self, seed):
            self._rng = real(seed)

        def integers(self, low, high, size=None):
            draws.append((high, size))
            return self._rng.integers(low, high, size=size)

    monkeypatch.setattr(training.np.random, "default_rng", Recorded)
    rng = real(0)
    train_x, val_x = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(30, 8))
    options = TrainingOptions(how_many_training_steps=5, train_batch_size=6,
                              validation_batch_size=11, eval_step_interval=2)
    training.train_head(train_x, rng.integers(0, 3, 40), val_x.astype(np.float32),
                        rng.integers(0, 3, 30), 3, options, None, progress=False)
    # steps 1..5: a training batch each; evaluations after steps 2, 4 and 5 (the last).
    assert draws == [(40, 6), (40, 6), (30, 11), (40, 6), (40, 6), (30, 11), (40, 6), (30, 11)]


def test_retrain_into_a_folder_another_run_writes_is_refused(sample_dir, tmp_path, capsys):
    from toolchain import atomic
    from toolchain.cli import main

    out = tmp_path / "model"
    with atomic.exclusive(out, "retrain"):  # as another process would hold it
        code = main(["retrain", "--image-dir", str(sample_dir), "--weights", "none",
                     "--architecture", TINY_ARCH, "--bottleneck-dir", str(tmp_path / "cache"),
                     "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "toolchain: error: another toolchain retrain (pid " in err, err
    assert not (tmp_path / "cache").exists()  # refused before any work
