"""Fixtures for target tests: a convertible Source for each architecture family.

Conversion does not care whether the head was trained, so these Sources join a random-weight
backbone with a seeded random softmax head: fast, deterministic, and every family covered.
Labels include non-ASCII text, spaces and a comma, as real folder names do.
"""

from __future__ import annotations

import functools

import pytest

from targets import ArtifactMetadata

LABELS = ("crème brûlée", "daisy", "roses, red", "sun flower", "tulips")
#: Written into the shared Core ML exports (tests/conftest.py ``coreml_export``).
METADATA = ArtifactMetadata(name="Flowers", description="Tells flowers apart.", author="QA Team",
                            license="MIT", version="2.3")
#: One small member of every family in the backbone registry.
FAMILY_ARCHS = ("mobilenet_0.25_128", "mobilenet_v2_0.35_96", "mobilenet_v3_small_96",
                "mobilenet_v3_large_96", "inception_v3_75")


@functools.cache
def _keras_model(architecture: str):
    import tensorflow as tf

    from toolchain import backbones
    from toolchain.training import join

    backbone = backbones.load(backbones.get(architecture), backbones.WeightsChoice("none"))
    head = tf.keras.layers.Dense(len(LABELS), activation="softmax", name="final_result",
                                 kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1))
    head.build((None, backbone.bottleneck_size))
    return join(backbone, head)


def make_source(architecture: str, calibration=()):
    """A targets.Source for ``architecture`` (cached model; fresh Source object each call)."""
    from targets import Source
    from toolchain import backbones

    spec = backbones.get(architecture)
    return Source(labels=LABELS, input_size=spec.input_size, preprocessing=spec.preprocessing,
                  architecture=spec.name,
                  user_defined={"architecture": spec.name, "toolchain_version": "test",
                                "classes": str(len(LABELS)), "test_accuracy": "0.5000"},
                  calibration=tuple(calibration), keras_model=_keras_model(architecture))


@pytest.fixture(scope="session")
def calibration_images(sample_dir):
    """Training-split images of the sample data (the only images calibration may use)."""
    from toolchain.dataset import scan

    return tuple(entry.path for entry in scan(sample_dir).subset("training"))
