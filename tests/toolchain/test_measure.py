"""Running artifacts for the verifier: in-process and in a child process give the same numbers,
and a child that dies or hangs becomes one line instead of taking the verifier down."""

from __future__ import annotations

import numpy as np
import pytest

import targets
from targets import ArtifactMetadata
from targets.tflite import TFLiteOptions
from toolchain.conversion import source_from_model
from toolchain.images import load_rgb
from toolchain.measure import _death, measure, measure_isolated

TFLITE = targets.get("tflite")


@pytest.fixture(scope="module")
def float_artifact(retrained, tmp_path_factory):
    options = TFLiteOptions(variant="float32")
    return TFLITE.export(source_from_model(retrained.output_dir), options, ArtifactMetadata(),
                         tmp_path_factory.mktemp("measure") / TFLITE.filename(options))


@pytest.fixture(scope="module")
def pixels(sample_dir):
    return np.stack([load_rgb(path, 96) for path in sorted(sample_dir.glob("*/*.jpg"))[:5]])


def test_child_process_gives_the_same_numbers(float_artifact, pixels):
    here = measure(TFLITE, float_artifact, pixels, batch_size=2)
    there = measure_isolated(TFLITE, float_artifact, pixels, batch_size=2)
    assert here.precision == there.precision == "float32" and not there.error
    assert [r.runtime for r in here.runtimes] == [r.runtime for r in there.runtimes]
    for ours, theirs in zip(here.runtimes, there.runtimes, strict=True):
        assert ours.labels == theirs.labels and not theirs.error
        np.testing.assert_array_equal(ours.probabilities, theirs.probabilities)
        assert theirs.probabilities.shape == (5, len(theirs.labels))


def test_a_hung_child_is_a_failure_with_the_limit(float_artifact, pixels):
    measured = measure_isolated(TFLITE, float_artifact, pixels, batch_size=2, timeout=0.01)
    assert measured.error == "its runtime did not finish within 0 s" and not measured.runtimes


def test_how_a_dead_child_is_described():
    stderr = ("Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call "
              "first):\n  File \"x.py\", line 1 in <module>\nExtension modules: numpy\n")
    assert _death(-11, stderr) == "its runtime crashed the process (SIGSEGV)"
    assert _death(3, "RuntimeError: boom\n") == "its runtime exited with code 3: RuntimeError: boom"
