"""Shared builders and constants of the test suite.

Conftest files hold fixtures only; everything a test imports by name lives here: the tiny
architecture, the labels and metadata of the shared test models, the tempered test models
themselves (:func:`make_source`), the held-out sample images, and the helpers that run real
``toolchain`` processes and read what they leave on disk.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from targets import ArtifactMetadata
from tests.privileges import drop_in_child

#: A tiny backbone (MobileNet v3 small at 96 px): the point of most tests is the pipeline's
#: behaviour, not accuracy.
TINY_ARCH = "mobilenet_v3_small_96"
#: The TFLite runtimes on this machine, in runner order: the app runtimes where their extras are
#: installed (make test's .venv has both; .venv-lite has no tflite-support).
TFLITE_RUNTIMES = ("tflite-interpreter",
                   *(("tflite-task-library", "tflite-task-library-full-size")
                     if importlib.util.find_spec("tflite_support") else ()),
                   *(("mediapipe-tasks", "mediapipe-tasks-full-size")
                     if importlib.util.find_spec("mediapipe") else ()))
#: Those fed our resized pixels (judged), and those fed full-size photos (shown).
TFLITE_SAME_PIXELS = tuple(r for r in TFLITE_RUNTIMES if not r.endswith("-full-size"))
TFLITE_FULL_SIZE = tuple(r for r in TFLITE_RUNTIMES if r.endswith("-full-size"))
#: Labels of the shared test models: non-ASCII text, spaces and a comma, as real folder names.
LABELS = ("crème brûlée", "daisy", "roses, red", "sun flower", "tulips")
#: Written into every shared export (tests/conftest.py ``coreml_export``, ``tflite_export``);
#: non-ASCII, so the metadata writers and readers of both formats are checked with it.
METADATA = ArtifactMetadata(name="Fleurs – test", description="Classe des fleurs, été 2026",
                            author="Ünit Tests", license="MIT", version="2.3.1")
#: Training images that calibrate the shared int8 TFLite exports.
CALIBRATION_IMAGES = 16
#: One small member of every family in the backbone registry.
FAMILY_ARCHS = ("mobilenet_0.25_128", "mobilenet_v2_0.35_96", "mobilenet_v3_small_96",
                "mobilenet_v3_large_96", "inception_v3_75")
#: How much the random head's logits are scaled, per family, so that the tempered model behaves
#: like a trained one: on the session's sample images (``write_sample_data(per_class=12,
#: seed=0)``, all 72) the median top probability is 0.60 and the median runner-up 0.20-0.23.
#: Untempered (scale 1), MobileNet v1 and v2 were near uniform (median top probability 0.32 and
#: 0.38, 0.07 above the runner-up) and Inception V3 saturated (median 1.000, logit spread 119),
#: so probability differences meant nothing and argmax flipped on rounding. Measured with
#: a bisection on the scale; tests/targets/test_tflite.py checks that it stays so.
HEAD_SCALE = {"mobilenet_0.25_128": 3.4, "mobilenet_v2_0.35_96": 2.43,
              "mobilenet_v3_small_96": 1.71, "mobilenet_v3_large_96": 1.18,
              "inception_v3_75": 0.0632}


# --- tolerances, measured -----------------------------------------------------------------------

#: The held-out sample images (validation and testing of ``sample_dir``) that the tolerances
#: below were measured on, with the tempered models of :func:`make_source`.
HELD_OUT = 18
#: Both tables bound how far an artifact's probabilities may be from Keras': the largest
#: difference over the 18 images and (quantized variants) the mean total-variation distance
#: (half the sum of absolute differences, per image). Each bound holds on both CPUs CI's
#: machines come with, a Xeon with AVX-512 and an AMD EPYC with AVX2 and FMA only (no
#: AVX-512): the figures beside each bound say which CPU measured what, and each bound is about
#: 1.5x the larger maximum and 2x the mean measured (the measuring script ran each artifact's
#: runners on the held-out pixels against ``keras_probabilities``, as the tests do).
#:
#: Why no count of changed top-1 labels: on these 18 images the two best classes of several
#: are within 0.004-0.05 of each other, so whether one flips is decided by rounding, and the
#: rounding is the CPU's. Quantized kernels (XNNPACK, ruy) and TensorFlow's own take other code
#: paths with and without AVX-512: on the same files v2 dynamic flipped 1 image on the Xeon and 2
#: on the EPYC, v3 large int8 7 and 5. A count is not a property of the model; a distance in
#: probability is, and it bounds the flips that matter: a maximum difference d cannot change
#: the label of an image whose best class leads by more than 2d.
#:
#: TFLite, per (family, variant), over its runtimes (the interpreter, the Task Library and
#: MediaPipe Tasks): (max difference or None, mean distance or None). Full-integer int8 of
#: random-weight MobileNet v3 moves some probabilities by (nearly) 1: their bottleneck features
#: reach ~220 (v3 small), so 8-bit activations lose the small ones; a property of the random
#: weights, not of the conversion (README, Verification); there the mean distance is the check.
#: The bound of every float32 row: reordered float32 sums alone moved probabilities by up to
#: 4.9e-5 here (v3 large on the Xeon), while an error in a conversion moves them by 1e-3 or
#: more (a wrong normalisation, about 0.1), so a bound at 1.5x one CPU's figure only measures
#: which CPU ran.
FLOAT32_FLOOR = 5e-5
TFLITE_TOLERANCE = {
    # max: Xeon 1.38e-5 interp. 2.95e-5 task, EPYC 1.36e-5
    ("mobilenet_0.25_128", "float32"): (FLOAT32_FLOOR, None),
    # max: Xeon 0.0207, EPYC 0.0252
    ("mobilenet_0.25_128", "float16"): (0.038, None),
    # max: Xeon 0.161, EPYC 0.169; mean: EPYC 0.0718
    ("mobilenet_0.25_128", "dynamic"): (0.26, 0.15),
    # max: Xeon 0.420, EPYC 0.358; mean: EPYC 0.172
    ("mobilenet_0.25_128", "int8"): (0.63, 0.35),
    # max: Xeon 9.66e-6 interp. 1.53e-5 task, EPYC 1.21e-5
    ("mobilenet_v2_0.35_96", "float32"): (FLOAT32_FLOOR, None),
    # max: Xeon 0.0265, EPYC 0.0183
    ("mobilenet_v2_0.35_96", "float16"): (0.04, None),
    # max: Xeon 0.0987, EPYC 0.0959; mean: EPYC 0.0553
    ("mobilenet_v2_0.35_96", "dynamic"): (0.15, 0.12),
    # max: Xeon 0.336, EPYC 0.285; mean: EPYC 0.149
    ("mobilenet_v2_0.35_96", "int8"): (0.5, 0.3),
    # max: Xeon 2.68e-6 interp. 1.53e-5 task, EPYC 1.27e-5
    ("mobilenet_v3_small_96", "float32"): (FLOAT32_FLOOR, None),
    # max: Xeon 0.0209, EPYC 0.0208
    ("mobilenet_v3_small_96", "float16"): (0.031, None),
    # max: Xeon 0.434 interp. 0.136 task, EPYC 0.261; mean: EPYC 0.0379
    ("mobilenet_v3_small_96", "dynamic"): (0.65, 0.076),
    # max: Xeon 1.00, EPYC 1.00; mean: EPYC 0.256
    ("mobilenet_v3_small_96", "int8"): (None, 0.52),
    # max: Xeon 4.91e-5 interp. 4.23e-5 task, EPYC 2.25e-5
    ("mobilenet_v3_large_96", "float32"): (7.4e-5, None),
    # max: Xeon 0.0107, EPYC 0.00797
    ("mobilenet_v3_large_96", "float16"): (0.016, None),
    # max: Xeon 0.566, EPYC 0.563; mean: EPYC 0.0950
    ("mobilenet_v3_large_96", "dynamic"): (0.85, 0.19),
    # max: Xeon 0.900, EPYC 0.958; mean: EPYC 0.243
    ("mobilenet_v3_large_96", "int8"): (None, 0.49),
    # max: Xeon 9.72e-6 interp. 8.97e-6 task, EPYC 1.10e-5
    ("inception_v3_75", "float32"): (FLOAT32_FLOOR, None),
    # max: Xeon 0.00896, EPYC 0.00794
    ("inception_v3_75", "float16"): (0.013, None),
    # max: Xeon 0.162 task, EPYC 0.199; mean: EPYC 0.0577
    ("inception_v3_75", "dynamic"): (0.3, 0.12),
    # max: Xeon 0.579, EPYC 0.673 (1.5x would be 1: no bound); mean: EPYC 0.173
    ("inception_v3_75", "int8"): (None, 0.35),
}
#: Core ML, per (family, format, weight precision) and runtime: (max difference, mean distance
#: or None). ``coreml-numpy`` is the NumPy executor (float32 compute, measured here).
#: ``coreml-numpy-float16`` is the verifier's device row, the executor with float16 compute
#: (``runtimes.load(path, compute_precision="float16")``), measured here; it shares each
#: figure with ``coreml`` (:func:`_with_device_rows`). ``coreml`` is Apple's runtime on macOS,
#: run on the CPU only; no Mac was at hand, so it is held to the float16 emulation's bound, a
#: looser one than its float32 compute should need: an estimate, not a measurement. Rounding
#: each value to float16 amplifies the CPU's last bits: the same file gave 0.0142 on the Xeon
#: and 0.0279 on the EPYC (v3 small, float32 weights).
COREML_TOLERANCE = {
    ("mobilenet_0.25_128", "neuralnetwork", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 2.18e-5, EPYC 1.52e-5
        "coreml": (0.08, None)},                # Xeon 0.0531, EPYC 0.0509
    ("mobilenet_0.25_128", "mlprogram", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 2.19e-5, EPYC 1.52e-5
        "coreml": (0.075, None)},               # Xeon 0.0467, EPYC 0.0498
    ("mobilenet_v2_0.35_96", "neuralnetwork", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 1.22e-5, EPYC 1.43e-5
        "coreml": (0.053, None)},               # Xeon 0.0353, EPYC 0.0324
    ("mobilenet_v2_0.35_96", "mlprogram", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 1.22e-5, EPYC 1.41e-5
        "coreml": (0.044, None)},               # Xeon 0.0291, EPYC 0.0289
    ("mobilenet_v3_small_96", "neuralnetwork", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 1.11e-5, EPYC 1.49e-5
        "coreml": (0.042, None)},               # Xeon 0.0142, EPYC 0.0279
    ("mobilenet_v3_small_96", "mlprogram", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 1.02e-5, EPYC 1.54e-5
        "coreml": (0.038, None)},               # Xeon 0.0251, EPYC 0.0192
    ("mobilenet_v3_large_96", "neuralnetwork", "float32"): {
        "coreml-numpy": (6.2e-5, None),         # Xeon 4.14e-5, EPYC 1.71e-5
        "coreml": (0.096, None)},               # Xeon 0.0643, EPYC 0.0481
    ("mobilenet_v3_large_96", "mlprogram", "float32"): {
        "coreml-numpy": (6.1e-5, None),         # Xeon 4.07e-5, EPYC 1.40e-5
        "coreml": (0.055, None)},               # Xeon 0.0364, EPYC 0.0364
    ("inception_v3_75", "neuralnetwork", "float32"): {  # with TOOLCHAIN_SLOW_TESTS=1
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 8.08e-6
        "coreml": (0.018, None)},               # Xeon 0.0120
    ("inception_v3_75", "mlprogram", "float32"): {
        "coreml-numpy": (FLOAT32_FLOOR, None),  # Xeon 8.02e-6, EPYC 8.67e-6
        "coreml": (0.02, None)},                # Xeon 0.00837, EPYC 0.00861, AVX-512 EPYC 0.0133
    (TINY_ARCH, "neuralnetwork", "float16"): {
        "coreml-numpy": (0.015, None),          # Xeon 0.00945, EPYC 0.0096
        "coreml": (0.042, None)},               # Xeon 0.0142, EPYC 0.0279
    (TINY_ARCH, "neuralnetwork", "int8"): {
        "coreml-numpy": (0.6, 0.069),           # Xeon 0.386, EPYC 0.398; mean EPYC 0.0342
        "coreml": (0.6, 0.069)},                # Xeon 0.390, EPYC 0.401; mean EPYC 0.0344
    (TINY_ARCH, "mlprogram", "float16"): {
        "coreml-numpy": (0.054, None),          # Xeon 0.0290, EPYC 0.0358
        "coreml": (0.036, None)},               # Xeon 0.0241, EPYC 0.0187
    (TINY_ARCH, "mlprogram", "int8"): {
        "coreml-numpy": (0.24, 0.053),          # Xeon 0.158, EPYC 0.158; mean EPYC 0.0264
        "coreml": (0.68, 0.087)},               # Xeon 0.455, EPYC 0.437; mean EPYC 0.0433
}


def _with_device_rows(table: dict) -> dict:
    """Each case's ``coreml`` bound (the float16-compute emulation, measured) also stands for
    the device row ``coreml-numpy-float16``, which is that emulation."""
    return {case: {**rows, "coreml-numpy-float16": rows["coreml"]} for case, rows in table.items()}


COREML_TOLERANCE = _with_device_rows(COREML_TOLERANCE)


# --- the shared test models ----------------------------------------------------------------------


@functools.cache
def keras_model(architecture: str):
    """A random-weight backbone joined with a seeded random softmax head, tempered by
    :data:`HEAD_SCALE` (cached: one model per architecture and session)."""
    import tensorflow as tf

    from toolchain import backbones
    from toolchain.training import join

    backbone = backbones.load(backbones.get(architecture), backbones.WeightsChoice("none"))
    head = tf.keras.layers.Dense(len(LABELS), activation="softmax", name="final_result",
                                 kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1))
    head.build((None, backbone.bottleneck_size))
    kernel, bias = head.get_weights()
    head.set_weights([kernel * np.float32(HEAD_SCALE[architecture]), bias])
    return join(backbone, head)


#: The head of the tests' models (a Keras Dense layer).
HEAD = "final_result"
#: How far ``badly_quantizing_model`` raises head weights.
OUTLIER, OFFSET, COMPUTE_OFFSET = 100.0, 100.0, 1.0


@functools.cache
def badly_quantizing_model(kind: str):
    """The tiny model with a head whose weights int8 (``outlier``) or float16 (``offset``)
    cannot hold, while the float model's probabilities stay the tiny model's: the way real
    models go wrong under weight quantization, made on purpose.

    ``outlier``: one feature's weight is raised by OUTLIER for every class. The softmax cancels
    a shift shared by all classes, but each int8 step now spans the outlier, so the other
    weights round away. ``offset``: every head weight is raised by OFFSET, so the small
    differences between them fall below float16's spacing. ``float16-compute``: raised by
    COMPUTE_OFFSET only, a model float32 computes within 3.2e-4 of Keras while float16
    compute (a phone's GPU or Neural Engine) flips 5 of 60 sample images (measured on the NumPy
    Core ML executor; 2.0 gave 6.3e-4 and 12 flips, 10.0 overflowed float16)."""
    import tensorflow as tf

    original = keras_model(TINY_ARCH)
    model = tf.keras.models.clone_model(original)
    model.set_weights(original.get_weights())
    kernel, bias = model.get_layer(HEAD).get_weights()
    if kind == "outlier":
        kernel[3, :] += OUTLIER
    elif kind == "offset":
        kernel += OFFSET
    elif kind == "float16-compute":
        kernel += COMPUTE_OFFSET
    else:
        raise ValueError(kind)
    model.get_layer(HEAD).set_weights([kernel, bias])
    return model


def make_source(architecture: str, calibration=(), tuning=()):
    """A ``targets.Source`` for ``architecture``: the cached tempered model (a fresh Source
    object each call, so a test may replace its fields)."""
    from targets import Source
    from toolchain import backbones

    spec = backbones.get(architecture)
    return Source(labels=LABELS, input_size=spec.input_size, preprocessing=spec.preprocessing,
                  architecture=spec.name,
                  user_defined={"architecture": spec.name, "toolchain_version": "test",
                                "classes": str(len(LABELS)), "test_accuracy": "0.5000"},
                  calibration=tuple(calibration), tuning=tuple(tuning),
                  keras_model=keras_model(architecture))


def held_out_paths(sample_dir: Path) -> list[Path]:
    """The sample data's validation and testing images (never used to calibrate int8)."""
    from toolchain.dataset import scan

    dataset = scan(sample_dir)
    return [entry.path for entry in dataset.subset("validation") + dataset.subset("testing")]


def pixels_of(paths, size: int) -> np.ndarray:
    """uint8 RGB pixels (n, size, size, 3), decoded by the toolchain's one image loader."""
    from toolchain.images import load_rgb

    return np.stack([load_rgb(path, size) for path in paths])


def keras_probabilities(source, pixels: np.ndarray) -> np.ndarray:
    """What the original (Keras) model of ``source`` gives for ``pixels``."""
    return np.asarray(source.keras_model(source.preprocessing.apply(pixels), training=False))


def agreement(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max abs probability difference, top-1 agreement) of ``got`` against ``expected``."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return (float(np.abs(got - expected).max()),
            float(np.mean(got.argmax(1) == expected.argmax(1))))


def within(got: np.ndarray, expected: np.ndarray, bounds: tuple[float | None, float | None],
           what: str) -> None:
    """Assert ``got`` is within ``bounds`` of ``expected``: the tolerance tables' largest
    absolute difference and mean total-variation distance (None leaves one unbounded)."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    largest, mean_bound = bounds
    difference = float(np.abs(got - expected).max())
    distance = float((0.5 * np.abs(got - expected).sum(1)).mean())
    if largest is not None:
        assert difference <= largest, f"{what}: max difference {difference:.3g} > {largest}"
    if mean_bound is not None:
        assert distance <= mean_bound, f"{what}: mean distance {distance:.3g} > {mean_bound}"


# --- ``toolchain label`` output ------------------------------------------------------------------

_LABEL_LINE = re.compile(r"(?P<label>.+) \(score = (?P<score>\d+\.\d{5})\)")


def parse_label_lines(out: str) -> list[tuple[str, float]]:
    """``toolchain label``'s printed lines → [(label, score)]; any other line fails the test."""
    found = []
    for line in out.splitlines():
        match = _LABEL_LINE.fullmatch(line)
        assert match, f"not a label line: {line!r}"
        found.append((match["label"], float(match["score"])))
    return found


# --- real ``toolchain`` processes ----------------------------------------------------------------


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a child: its own home and caches, quiet TensorFlow."""
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1", "KERAS_HOME":
            str(home / ".keras"), "MPLCONFIGDIR": str(home / ".mpl")}


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "toolchain", *map(str, args)]


def run(home: Path, *args: object, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``toolchain ARGS`` to the end; stdout and stderr as text."""
    return subprocess.run(command(*args), env=cli_env(home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=drop_in_child)


def _as_a_job() -> None:
    """In a started child, before it runs: SIGINT back to its default disposition, as a shell
    gives a job it starts (a test run started in the background, ``pytest &`` or under nohup,
    inherits an ignored SIGINT, and Python then never turns Ctrl-C into KeyboardInterrupt), then
    without root's privileges (tests/privileges.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    drop_in_child()


def start(home: Path, *args: object, log: Path) -> subprocess.Popen:
    """Start ``toolchain ARGS`` in its own process group (as a shell runs a job; Ctrl-C in a
    terminal signals the whole group), stdout and stderr to ``log``."""
    handle = open(log, "w", encoding="utf-8")
    try:
        # PYTHONFAULTHANDLER: a run that does not stop is sent SIGABRT, and its log then shows
        # where every thread was (interrupt()).
        env = {**cli_env(home), "PYTHONFAULTHANDLER": "1"}
        process = subprocess.Popen(command(*args), env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=_as_a_job)
        process.log = log
        return process
    finally:
        handle.close()


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300,
             interval: float = 0.005):
    """Poll ``condition()`` until it returns something true; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}")
        time.sleep(interval)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def wait_for_line(log: Path, marker: str, process: subprocess.Popen, timeout: float = 300):
    """Wait until the run's output (``log``) holds a line containing ``marker``: the line a stage
    prints when it starts, so a signal sent next lands inside that stage."""
    def printed():
        return [line for line in log.read_text(encoding="utf-8").splitlines() if marker in line]

    return wait_for(printed, process, f"the line {marker!r}", timeout)[0]


def interrupt(process: subprocess.Popen, signum: int, timeout: float = 120) -> int:
    """Send ``signum`` to the run's process group and wait for it to end; its exit code.

    A run that does not stop is sent SIGABRT first, so that its ``log`` shows every thread's
    stack (faulthandler, see start()) in the failure."""
    log = getattr(process, "log", None)
    os.killpg(process.pid, signum)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGABRT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # SIGABRT may have ended the group
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        stacks = log.read_text(encoding="utf-8")[-12000:] if log else ""
        pytest.fail(f"the run did not stop within {timeout} s of signal {signum}\n{stacks}")


def no_traceback(result) -> None:
    text = result if isinstance(result, str) else result.stdout + result.stderr
    assert "Traceback" not in text, text


# --- what runs leave on disk ---------------------------------------------------------------------


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files and folders under ``folders`` (atomic's hidden ``.*.tmp``/``.old``)."""
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            found += [Path(dirpath) / name for name in dirnames + filenames
                      if name.startswith(".") and (".tmp" in name or name.endswith(".old"))]
    return found


def cache_entries(cache: Path) -> list[Path]:
    """The bottleneck cache entries under their final names."""
    return [Path(d) / name for d, _, names in os.walk(cache) for name in names
            if name.endswith(".bn") and not name.startswith(".")]


def check_entries(cache: Path) -> int:
    """Every cache entry under a final name is complete and consistent; how many there are."""
    entries = cache_entries(cache)
    for path in entries:
        data = path.read_bytes()
        magic, count, crc = struct.unpack_from("<4sII", data)
        assert magic == b"TCBN" and len(data) == 12 + 4 * count, path
        assert zlib.crc32(data[12:]) == crc, path
    return len(entries)


# --- frozen graphs shaped like retrain.py's -------------------------------------------------


def _convs(tf, x, rng, widths: tuple[int, ...]):
    """Strided 3x3 convolutions with ReLU, seeded He-initialised constants."""
    for index, width in enumerate(widths):
        kernel = rng.normal(0, (2 / (9 * int(x.shape[-1]))) ** 0.5,
                            (3, 3, int(x.shape[-1]), width)).astype(np.float32)
        x = tf.nn.relu(tf.nn.conv2d(x, tf.constant(kernel, name=f"conv{index}/weights"), 2,
                                    "SAME") + np.float32(0.05))
    return x


def tiny_mobilenet_graph(size: int = 128, classes: int = 40, seed: int = 0,
                         batch: int | None = None, input_name: str = "input",
                         bottleneck_name: str = "MobilenetV1/Predictions/Reshape") -> bytes:
    """A frozen GraphDef with retrain.py's MobileNet v1 names: ``input`` [batch, size, size, 3]
    → a few convolutions → ``MobilenetV1/Predictions/Reshape`` [n, classes] → softmax."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    with tf.Graph().as_default() as graph:
        image = tf.compat.v1.placeholder(tf.float32, [batch, size, size, 3], name=input_name)
        features = tf.reduce_mean(_convs(tf, image, rng, (8, 16, 24)), [1, 2])
        weights = rng.normal(0, 0.3, (24, classes)).astype(np.float32)
        logits = tf.matmul(features, tf.constant(weights, name="Logits/weights"))
        flat = tf.reshape(logits, [-1, classes], name=bottleneck_name)
        tf.nn.softmax(flat, name="Predictions/Softmax")
    return graph.as_graph_def().SerializeToString()


def tiny_inception_graph(size: int = 96, features: int = 48, seed: int = 1) -> bytes:
    """A frozen GraphDef with Inception's ``classify_image_graph_def.pb`` names: JPEG decoding
    → ``Mul`` [1, size, size, 3] → convolutions → ``pool_3`` → ``pool_3/_reshape`` [1, features]
    (a fixed batch of one, as the real graph) → ``softmax``."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    with tf.Graph().as_default() as graph:
        jpeg = tf.compat.v1.placeholder(tf.string, [], name="DecodeJpeg/contents")
        decoded = tf.cast(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
        resized = tf.compat.v1.image.resize_bilinear(decoded[None], [size, size])
        image = tf.multiply(resized - 128.0, 1 / 128.0, name="Mul")
        pooled = tf.nn.avg_pool2d(_convs(tf, image, rng, (8, features)), size // 4, 1, "VALID",
                                  name="pool_3")
        bottleneck = tf.reshape(pooled, [1, features], name="pool_3/_reshape")
        weights = rng.normal(0, 0.3, (features, 1008)).astype(np.float32)
        tf.nn.softmax(tf.matmul(bottleneck, tf.constant(weights)), name="softmax")
    return graph.as_graph_def().SerializeToString()


def poets_archive(folder: Path, graph: bytes, name: str = "mobilenet_v1_0.25_128_frozen.tgz",
                  member: str | None = None, quantized: bytes | None = None) -> Path:
    """``graph`` packed as retrain.py's download: ``<name>`` holding ``<member>`` (by default
    ``mobilenet_v1_<v>_<size>/frozen_graph.pb``), ``quantized_graph.pb`` beside it if given,
    and a checkpoint stand-in."""
    import io
    import tarfile

    stem = name.removesuffix("_frozen.tgz")
    files = [(member or f"{stem}/frozen_graph.pb", graph),
             (f"{stem}/{stem}.ckpt.index", b"not a graph")]
    if quantized is not None:
        files.append((f"{stem}/quantized_graph.pb", quantized))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with tarfile.open(path, "w:gz") as archive:
        for inner, data in files:
            info = tarfile.TarInfo(inner)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# --- hostile files -------------------------------------------------------------------------------


def operator_inputs_past_the_end(model: bytes) -> bytes:
    """``model`` (a ``.tflite``) with its first operator's ``inputs`` vector pointing 2 GB past
    the file: a file the inspector accepts (it does not read operators), on which TensorFlow
    Lite 2.13.1's interpreter segfaults (it follows offsets without verifying them)."""
    import struct

    from tensorflow.lite.python import schema_py_generated as schema

    data = bytearray(model)
    table = schema.Model.GetRootAsModel(data, 0).Subgraphs(0).Operators(0)._tab
    field = table.Offset(6)  # vtable entry of field 1, Operator.inputs (schema.fbs)
    assert field, "the first operator has no inputs"
    struct.pack_into("<I", data, table.Pos + field, 0x7FFF0000)
    return bytes(data)
