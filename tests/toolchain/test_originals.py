"""The verifier's original (``toolchain.originals``): a retrain folder, a frozen graph and a
``.keras`` file give the same probabilities for the same pixels, each says where its
normalisation came from, and what cannot be an original is one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.helpers import pixels_of
from toolchain.conversion import GraphOptions
from toolchain.errors import ModelError, UsageError
from toolchain.originals import FROZEN_GRAPH, KERAS, RETRAINED, open_original


def _graphs_name_their_source() -> bool:
    """Whether ``source_from_graph`` says where a graph's normalisation came from (its own
    detection), which the original then reports instead of the flags' or the default's."""
    from targets import Source

    return hasattr(Source, "normalization_source") or "normalization_source" in getattr(
        Source, "__dataclass_fields__", {})


@pytest.fixture(scope="module")
def pixels(sample_dir):
    return pixels_of(sorted(sample_dir.glob("*/*"))[::12], 96)


@pytest.fixture(scope="module")
def folder_original(retrained):
    return open_original(retrained.output_dir)


def test_a_retrain_folder(retrained, folder_original):
    original = folder_original
    assert (original.kind, original.model_dir) == (RETRAINED, retrained.output_dir)
    assert original.labels == retrained.info.labels and original.input_size == 96
    assert original.preprocessing_source == f"model.json ({retrained.info.architecture})"
    assert original.record()["preprocessing"]["mean"] == list(original.preprocessing.mean)


def test_a_frozen_graph_gives_the_folders_probabilities(retrained, folder_original, pixels):
    graph = retrained.output_dir.parent / "retrained_graph.pb"
    original = open_original(graph)
    assert (original.kind, original.labels, original.input_size) == (
        FROZEN_GRAPH, retrained.info.labels, 96)
    assert original.model_dir is None and original.max_batch == 1
    if not _graphs_name_their_source():
        assert original.preprocessing_source.startswith("default (mean 127.5, std 127.5")
    np.testing.assert_allclose(original.probabilities(pixels),
                               folder_original.probabilities(pixels), atol=1e-5)
    flagged = open_original(graph, GraphOptions(input_mean=0.0, input_std=255.0))
    assert flagged.preprocessing.mean == (0.0, 0.0, 0.0)
    if not _graphs_name_their_source():
        assert flagged.preprocessing_source == "--input-mean 0 --input-std 255"


def test_a_keras_file_with_labels_beside_it(retrained, folder_original, pixels, tmp_path):
    keras_file = tmp_path / "classifier.keras"
    shutil.copy(retrained.output_dir / "model.keras", keras_file)
    with pytest.raises(UsageError, match="no labels file found"):
        open_original(keras_file)
    (tmp_path / "retrained_labels.txt").write_text("".join(f"{label}\n" for label in
                                                           retrained.info.labels))
    original = open_original(keras_file)
    assert (original.kind, original.input_size) == (KERAS, 96)
    assert original.preprocessing_source.startswith("default (mean 127.5, std 127.5")
    np.testing.assert_allclose(original.probabilities(pixels),
                               folder_original.probabilities(pixels), atol=1e-5)
    (tmp_path / "retrained_labels.txt").write_text("one\ntwo\n")
    with pytest.raises(ModelError, match="6 outputs but its labels file has 2 labels"):
        open_original(keras_file)


def test_a_keras_file_in_a_retrain_folder_reads_its_manifest(retrained):
    original = open_original(retrained.output_dir / "model.keras")
    assert original.kind == KERAS and original.labels == retrained.info.labels
    assert original.preprocessing_source == f"model.json ({retrained.info.architecture})"


def test_what_cannot_be_an_original_is_one_line(retrained, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        open_original(tmp_path / "absent.pb")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="is not a model the verifier reads"):
        open_original(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="--output-name does not apply"):
        open_original(retrained.output_dir / "model.keras", GraphOptions(output_name="x"))
