"""Running artifacts for the verifier (``toolchain.measure``): in-process and in a child process
give the same numbers; a child that dies or hangs becomes one line instead of taking the
verifier down; malformed runner output is passed on for the verifier to judge, never mended."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import targets
from targets import ArtifactMetadata, Runner, Runners, Source
from targets.tflite import TFLiteOptions
from tests.helpers import TINY_ARCH, operator_inputs_past_the_end
from toolchain.images import load_rgb
from toolchain.measure import _death, _hung, measure, measure_isolated

TFLITE, COREML = targets.get("tflite"), targets.get("coreml")
#: Long enough for a healthy child to start (TensorFlow and tflite-support imports) and load
#: the model: test_child_process_gives_the_same_numbers' child does all of it and measures in a
#: few seconds here. A child still running after this really hangs.
HUNG_TIMEOUT = 15


@pytest.fixture(scope="module")
def float_artifact(retrained_tflite):
    return retrained_tflite("float32")


@pytest.fixture(scope="module")
def pixels(sample_dir):
    return np.stack([load_rgb(path, 96) for path in sorted(sample_dir.glob("*/*.jpg"))[:5]])


def _looping(tmp_path_factory, keep_going) -> object:
    """A valid .tflite (labels and normalization in its metadata) whose graph is a while loop
    (a second subgraph) that runs while ``keep_going(step, probabilities)``."""
    import tensorflow as tf

    from toolchain.backbones import Preprocessing

    def factory():
        def loop(image):
            probabilities = tf.nn.softmax(tf.reduce_mean(image, axis=[1, 2]))  # [1, 3]
            _, out = tf.while_loop(keep_going, lambda step, p: (step + 1, p),
                                   [tf.constant(0), probabilities])
            return out

        return tf.function(loop).get_concrete_function(
            tf.TensorSpec([1, 8, 8, 3], tf.float32, name="image"))

    source = Source(labels=("a", "b", "c"), input_size=8,
                    preprocessing=Preprocessing(1 / 127.5, (-1.0, -1.0, -1.0)),
                    architecture="looping", user_defined={}, calibration=(),
                    function_factory=factory)
    options = TFLiteOptions(variant="float32")
    folder = tmp_path_factory.mktemp("looping")
    return TFLITE.export(source, options, ArtifactMetadata(), folder / TFLITE.filename(options))


@pytest.mark.slow
def test_an_app_runtime_that_refuses_the_model_fails_its_row_only(tmp_path_factory):
    """MediaPipe Tasks loads no model with a second subgraph: its rows fail with its reason,
    the interpreter's row still has its numbers."""
    pytest.importorskip("mediapipe", reason="the mediapipe extra is not installed here")
    import tensorflow as tf

    artifact = _looping(tmp_path_factory, lambda step, p: step < tf.constant(3))
    measured = measure(TFLITE, artifact, np.zeros((2, 8, 8, 3), np.uint8), batch_size=2,
                       photos=[])
    found = {result.runtime: result for result in measured.runtimes}
    assert found["tflite-interpreter"].probabilities.shape == (2, 3)
    assert not found["tflite-interpreter"].error
    assert found["mediapipe-tasks"].probabilities is None
    assert found["mediapipe-tasks"].error == (
        "crashed: mediapipe-tasks cannot load the model: Classification tflite "
        "models are assumed to have a single subgraph.")


@pytest.fixture(scope="module")
def never_ending(tmp_path_factory):
    """A loop whose condition is always true: ``invoke()`` never returns."""
    import tensorflow as tf

    return _looping(tmp_path_factory, lambda step, p: tf.reduce_sum(p) > -1.0)


@pytest.mark.slow
def test_child_process_gives_the_same_numbers(float_artifact, pixels):
    here = measure(TFLITE, float_artifact, pixels, batch_size=2)
    there = measure_isolated(TFLITE, float_artifact, pixels, batch_size=2)
    assert here.precision == there.precision == "float32" and not there.error
    assert [r.runtime for r in here.runtimes] == [r.runtime for r in there.runtimes]
    for ours, theirs in zip(here.runtimes, there.runtimes, strict=True):
        assert ours.labels == theirs.labels and not theirs.error
        np.testing.assert_array_equal(ours.probabilities, theirs.probabilities)
        assert theirs.probabilities.shape == (5, len(theirs.labels))


@pytest.mark.slow
def test_a_core_ml_child_gives_the_same_numbers_without_importing_tensorflow(
        coreml_export, pixels, tmp_path):
    """coremltools imports TensorFlow for its converters; the child blocks it (5 s a child
    here) and its runners still give the numbers they give in-process, device row included."""
    path, _ = coreml_export(TINY_ARCH)
    here = measure(COREML, path, pixels, batch_size=2)
    there = measure_isolated(COREML, path, pixels, batch_size=2)
    assert here.precision == there.precision == "float32" and not there.error
    assert [r.runtime for r in there.runtimes] == ["coreml-numpy", "coreml-numpy-float16"]
    for ours, theirs in zip(here.runtimes, there.runtimes, strict=True):
        assert ours.labels == theirs.labels and not theirs.error
        np.testing.assert_array_equal(ours.probabilities, theirs.probabilities)

    np.save(tmp_path / "pixels.npy", pixels)
    child = [str(arg) for arg in ("coreml", path, tmp_path / "pixels.npy", tmp_path, 2)]
    script = ("import sys; from toolchain import measure; measure.main(sys.argv[1:]); "
              "print('tensorflow imported:', sys.modules.get('tensorflow') is not None)")
    result = subprocess.run([sys.executable, "-c", script, *child], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.stdout.strip().endswith("tensorflow imported: False"), result.stderr
    assert (tmp_path / "result.json").is_file()


@pytest.mark.slow
def test_a_truncated_tflite_is_refused_before_the_interpreter_sees_it(float_artifact, pixels,
                                                                      tmp_path):
    """TensorFlow Lite 2.13.1 (pinned) segfaults reading the first 5000 bytes of a model; the
    inspector reads the file as data first and names what lies outside it."""
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(float_artifact.read_bytes()[:5000])
    measured = measure_isolated(TFLITE, truncated, pixels, batch_size=2)
    assert measured.error.startswith(f"cannot read the artifact: {truncated} is not a valid "
                                     "TFLite model: the subgraphs at byte ")
    assert measured.error.endswith("lies outside the file (5000 bytes)")
    assert measured.precision is None and measured.runtimes == []


@pytest.mark.slow
def test_a_tflite_that_crashes_the_interpreter_kills_the_child_only(float_artifact, pixels,
                                                                   tmp_path):
    """A model whose first operator's inputs point past the file: the inspector does not read
    operators, TensorFlow Lite 2.13.1 segfaults on it; the child dies by the signal, and that,
    not a Python error, is the reason given."""
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(operator_inputs_past_the_end(float_artifact.read_bytes()))
    measured = measure_isolated(TFLITE, broken, pixels, batch_size=2)
    assert measured.error == "its runtime crashed the process (SIGSEGV)"
    assert measured.precision is None and measured.runtimes == []


@pytest.mark.slow
def test_a_hung_child_is_killed_at_the_limit_naming_its_runtime(never_ending):
    """The child loads the model and enters the interpreter, which never returns; at the time
    limit it is killed and the reason names the runtime it was stuck in (proof that it hung
    there, not while starting)."""
    measured = measure_isolated(TFLITE, never_ending, np.zeros((2, 8, 8, 3), np.uint8),
                                batch_size=2, timeout=HUNG_TIMEOUT)
    assert measured.error == (f"its runtime did not finish within {HUNG_TIMEOUT} s "
                              "(tflite-interpreter was running)")
    assert measured.precision is None and not measured.runtimes


def test_how_a_dead_or_hung_child_is_described():
    stderr = ("Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call "
              "first):\n  File \"x.py\", line 1 in <module>\nExtension modules: numpy\n")
    assert _death(-11, stderr) == "its runtime crashed the process (SIGSEGV)"
    assert _death(3, "RuntimeError: boom\n") == "its runtime exited with code 3: RuntimeError: boom"
    assert _death(-11, "toolchain.measure: running coreml-numpy\n") == (
        "its runtime crashed the process (SIGSEGV)")
    assert _hung(7.5, None) == "its runtime did not finish within 7.5 s"
    assert _hung(60, b"toolchain.measure: running a\nnoise\ntoolchain.measure: running b\n") == (
        "its runtime did not finish within 60 s (b was running)")


# --- what a runner returns, in this process ------------------------------------------------------


class _StandIn(Runner):
    runtime, labels, input_size = "stand-in", ("a", "b"), 8

    def __init__(self, output) -> None:
        self.output = output

    def __call__(self, pixels):
        return self.output(pixels)


class _Target:
    name = "stand-in"

    def __init__(self, *runners) -> None:
        self._runners = list(runners)

    def precision(self, path):
        return "float32"

    def runners(self, path):
        return Runners(self._runners)


@pytest.mark.parametrize("output, probabilities, error", [
    (lambda pixels: None, None, ""),
    (lambda pixels: np.full((len(pixels), 3), 0.5), (5, 3), ""),
    (lambda pixels: np.full((len(pixels), 2), np.nan), (5, 2), ""),
    (lambda pixels: np.zeros(len(pixels)), (5,), ""),
    (lambda pixels: 0.5, None, "returned batches of shapes (), (), ()"),
    (lambda pixels: np.zeros((len(pixels), 2 + len(pixels) % 2)), None,
     "returned batches of shapes (2, 2), (2, 2), (1, 3)"),
    (lambda pixels: "many", None,
     "returned something that is not numbers: ValueError: could not convert string to float: "
     "'many'"),
], ids=["nothing", "wrong-width", "nan", "flat", "scalars", "ragged", "text"])
def test_runner_output_is_passed_on_as_it_is(output, probabilities, error):
    """The verifier judges malformed output (tests/toolchain/test_verify.py); measuring keeps it
    as it came, in one array, or says why it cannot be one."""
    measured = measure(_Target(_StandIn(output)), "x", np.zeros((5, 8, 8, 3), np.uint8), 2)
    (result,) = measured.runtimes
    assert result.error == error
    if probabilities is None:
        assert result.probabilities is None
    else:
        assert result.probabilities.shape == probabilities
        assert result.probabilities.dtype == np.float32
