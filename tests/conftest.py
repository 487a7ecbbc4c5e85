"""Shared fixtures: tiny sample data and one tiny retrained model per test session.

Models are small (alpha 0.35, 96 px) and use ``--weights none``: the machines that run these
tests are offline, and the point is the pipeline's behaviour, not ImageNet accuracy.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from tests import machine
from tests.helpers import CALIBRATION_IMAGES, METADATA, TINY_ARCH, make_source

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: A hung test fails with every thread's stack instead of stalling the suite; the executor's
#: op coverage is judged across pytest-xdist's processes.
pytest_plugins = ["tests.watchdog", "tests.op_coverage"]


def pytest_report_header(config) -> str:
    """The CPU first: quantized kernels differ between CI's CPUs (tests/machine.py)."""
    return machine.describe()


@pytest.fixture(autouse=True)
def no_runner_left_open(request):
    """Runners cannot leak: after every test no MediaPipe classifier is open, and no collection
    found one unclosed. A classifier left to the garbage collector hangs the process
    (toolchain/patches.py, mediapipe_finalisers_never_wait), so each caller closes its runners
    with ``with``; one the test left open is closed here and fails the test."""
    from toolchain import patches

    before = patches.mediapipe_classifiers_left_open()
    yield
    runners = sys.modules.get("targets._tflite_runners")
    still_open = 0 if runners is None else runners.MediaPipeRunner.still_open()
    if still_open:
        runners._close_all()
    collected = patches.mediapipe_classifiers_left_open() - before
    if still_open or collected:
        pytest.fail(f"{request.node.nodeid} left {still_open} MediaPipe runner(s) open and "
                    f"{collected} unclosed for the garbage collector: open runners with "
                    "`with target.runners(path) as runners:`", pytrace=False)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The built-in sample data, 12 images per class (6 classes)."""
    from toolchain.sample_photos import write_sample_data

    out = tmp_path_factory.mktemp("data") / "photos"
    write_sample_data(out, per_class=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_backbone():
    from toolchain import backbones

    return backbones.load(backbones.get(TINY_ARCH), backbones.WeightsChoice("none"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bottlenecks")


@pytest.fixture(scope="session")
def retrained(tmp_path_factory, sample_dir, tiny_backbone, session_cache):
    """One retrain run (300 steps) on the sample data; returns its RetrainResult."""
    from toolchain.dataset import scan
    from toolchain.training import OutputOptions, TrainingOptions, retrain

    out = tmp_path_factory.mktemp("retrained") / "model"
    return retrain(scan(sample_dir), tiny_backbone, cache_dir=session_cache, output_dir=out,
                   training=TrainingOptions(how_many_training_steps=300, eval_step_interval=50),
                   outputs=OutputOptions(summaries_dir=out / "summaries",
                                         output_graph=out.parent / "retrained_graph.pb",
                                         output_labels=out.parent / "retrained_labels.txt"),
                   progress=False)


@pytest.fixture(scope="session")
def coreml_export(tmp_path_factory):
    """``coreml_export(arch, format, precision)`` → (path, seconds): the Core ML export of
    ``tests.helpers.make_source(arch)``, made once per session and shared by the target's
    tests, the NumPy executor's, ``label``'s and the sample apps' (conversions dominate them;
    protobuf is slow here). Callers only read the artifacts."""
    import time

    from targets.coreml import CoreMLOptions, CoreMLTarget

    done: dict[tuple, tuple] = {}

    def get(arch: str, fmt: str = "neuralnetwork", precision: str = "float32"):
        key = (arch, fmt, precision)
        if key not in done:
            target, options = CoreMLTarget(), CoreMLOptions(format=fmt, precision=precision)
            folder = tmp_path_factory.mktemp("-".join(key))
            start = time.perf_counter()
            path = target.export(make_source(arch), options, METADATA,
                                 folder / target.filename(options))
            done[key] = path, time.perf_counter() - start
        return done[key]

    return get


@pytest.fixture(scope="session")
def tflite_export(tmp_path_factory, sample_dir):
    """``tflite_export(arch, variant)`` → path: the TFLite export (metadata and labels embedded,
    int8 calibrated on CALIBRATION_IMAGES training images) of ``tests.helpers.make_source(arch)``,
    once per session, alone in its folder with its ``labels.txt``; callers only read it."""
    from targets.tflite import TFLiteOptions, TFLiteTarget
    from toolchain.dataset import scan

    done: dict[tuple, Path] = {}

    def get(arch: str, variant: str = "float32") -> Path:
        if (arch, variant) not in done:
            # The plain int8 artifact: its repair is tested in tests/targets/test_tflite_repair.py.
            target, options = TFLiteTarget(), TFLiteOptions(variant=variant, no_repair=True,
                                                          calibration_images=CALIBRATION_IMAGES)
            # Training images only for int8 (its calibration): with none, the weight-only
            # variants' tuning-set measurement (tests/targets/test_tflite_weights.py) is
            # skipped, which keeps these shared exports fast and alone in their folders.
            calibration = ([entry.path for entry in scan(sample_dir).subset("training")]
                           if variant == "int8" else [])
            folder = tmp_path_factory.mktemp(f"{arch}-{variant}")
            done[(arch, variant)] = target.export(make_source(arch, calibration), options,
                                                  METADATA, folder / target.filename(options))
        return done[(arch, variant)]

    return get


@pytest.fixture(scope="session")
def retrained_tflite(retrained, tmp_path_factory):
    """``retrained_tflite(variant)`` → path: the TFLite export of the session's retrained model
    (calibrated on its recorded training split), once per session; shared by the verifier's and
    the measuring tests. Callers only read it."""
    from targets import ArtifactMetadata
    from targets.tflite import TFLiteOptions, TFLiteTarget
    from toolchain.conversion import source_from_model

    done: dict[str, Path] = {}

    def get(variant: str = "float32") -> Path:
        if variant not in done:
            target, options = TFLiteTarget(), TFLiteOptions(variant=variant, no_repair=True)
            folder = tmp_path_factory.mktemp(f"retrained-{variant}")
            done[variant] = target.export(source_from_model(retrained.output_dir), options,
                                          ArtifactMetadata(), folder / target.filename(options))
        return done[variant]

    return get


@pytest.fixture
def toolchain_log(caplog):
    """Capture the toolchain logger's warnings (the CLI gives it its own handler)."""
    logger = logging.getLogger("toolchain")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="toolchain")
    return caplog
