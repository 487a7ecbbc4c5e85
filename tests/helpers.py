"""Shared builders and constants of the test suite.

Conftest files hold fixtures only; everything a test imports by name lives here: the tiny
architecture, the labels and metadata of the shared test models, the tempered test models
themselves (:func:`make_source`), the held-out sample images, and the helpers that run real
``toolchain`` processes and read what they leave on disk.
"""

from __future__ import annotations

import functools
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


# --- the shared test models ----------------------------------------------------------------------


@functools.cache
def keras_model(architecture: str):
    """A random-weight backbone joined with a seeded random softmax head, tempered by
    :data:`HEAD_SCALE` (cached: one model per architecture and session)."""
    import tensorflow as tf

    from toolchain import backbones
    from toolchain.retrain import join

    backbone = backbones.load(backbones.get(architecture), backbones.WeightsChoice("none"))
    head = tf.keras.layers.Dense(len(LABELS), activation="softmax", name="final_result",
                                 kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1))
    head.build((None, backbone.bottleneck_size))
    kernel, bias = head.get_weights()
    head.set_weights([kernel * np.float32(HEAD_SCALE[architecture]), bias])
    return join(backbone, head)


def make_source(architecture: str, calibration=()):
    """A ``targets.Source`` for ``architecture``: the cached tempered model (a fresh Source
    object each call, so a test may replace its fields)."""
    from targets import Source
    from toolchain import backbones

    spec = backbones.get(architecture)
    return Source(labels=LABELS, input_size=spec.input_size, preprocessing=spec.preprocessing,
                  architecture=spec.name,
                  user_defined={"architecture": spec.name, "toolchain_version": "test",
                                "classes": str(len(LABELS)), "test_accuracy": "0.5000"},
                  calibration=tuple(calibration), keras_model=keras_model(architecture))


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


def start(home: Path, *args: object, log: Path) -> subprocess.Popen:
    """Start ``toolchain ARGS`` in its own process group (as a shell runs a job; Ctrl-C in a
    terminal signals the whole group), stdout and stderr to ``log``."""
    handle = open(log, "w", encoding="utf-8")
    try:
        return subprocess.Popen(command(*args), env=cli_env(home), stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=drop_in_child)
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
    """Send ``signum`` to the run's process group and wait for it to end; its exit code."""
    os.killpg(process.pid, signum)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the run did not stop within {timeout} s of signal {signum}")


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
