"""The backbone registry, preprocessing spec and weights resolution."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain import backbones
from toolchain.errors import UnknownArchitecture, WeightsUnavailable

# One small member of every family in the registry.
FAMILIES = {
    "mobilenet_0.25_128": ("mobilenet_v1", 256),
    "mobilenet_v2_0.35_96": ("mobilenet_v2", 1280),
    "mobilenet_v3_small_96": ("mobilenet_v3_small", 576),
    "mobilenet_v3_large_96": ("mobilenet_v3_large", 960),
    "inception_v3_75": ("inception_v3", 2048),
}


@pytest.mark.parametrize("name, canonical, family, alpha, size", [
    ("mobilenet_0.50_224", "mobilenet_0.50_224", "mobilenet_v1", 0.5, 224),
    ("mobilenet_1.0_128", "mobilenet_1.0_128", "mobilenet_v1", 1.0, 128),
    ("MOBILENET_0.25_160", "mobilenet_0.25_160", "mobilenet_v1", 0.25, 160),
    ("mobilenet_v2_1.0_224", "mobilenet_v2_1.0_224", "mobilenet_v2", 1.0, 224),
    ("mobilenet_v2_0.35_96", "mobilenet_v2_0.35_96", "mobilenet_v2", 0.35, 96),
    ("mobilenet_v3_small_224", "mobilenet_v3_small_224", "mobilenet_v3_small", 1.0, 224),
    ("mobilenet_v3_large_128", "mobilenet_v3_large_128", "mobilenet_v3_large", 1.0, 128),
    ("inception_v3", "inception_v3", "inception_v3", 1.0, 299),
    ("inception_v3_139", "inception_v3_139", "inception_v3", 1.0, 139),
])
def test_names_parse(name, canonical, family, alpha, size):
    spec = backbones.get(name)
    assert (spec.name, spec.family, spec.alpha, spec.input_size) == (canonical, family, alpha, size)
    assert backbones.get(spec.name) == spec


@pytest.mark.parametrize("name", ["mobilenet_0.33_224", "mobilenet_0.50_100", "resnet50",
                                  "mobilenet_v2_2.0_224", "inception_v3_50", ""])
def test_unknown_names_are_one_line_errors(name):
    with pytest.raises(UnknownArchitecture) as raised:
        backbones.get(name)
    assert "mobilenet_0.50_224" in raised.value.hint


def test_preprocessing_is_one_object_with_both_conventions():
    pre = backbones.get("mobilenet_0.50_224").preprocessing
    assert pre.mean == (127.5, 127.5, 127.5) and pre.std == (127.5, 127.5, 127.5)
    pixels = np.array([[0, 127, 255]], dtype=np.uint8).reshape(1, 1, 3)
    # Core ML's scale/bias form and TFLite's (x - mean) / std form give the same input.
    np.testing.assert_allclose(pre.apply(pixels), (pixels - 127.5) / 127.5, atol=1e-6)
    assert all(backbones.get(n).preprocessing == pre for n in FAMILIES)


def test_imagenet_file_names_match_keras():
    assert backbones.get("mobilenet_0.50_224").imagenet_weights().filename == \
        "mobilenet_5_0_224_tf_no_top.h5"
    v2 = backbones.get("mobilenet_v2_1.0_224").imagenet_weights()
    assert v2.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert v2.url.endswith("/mobilenet_v2/" + v2.filename) and v2.md5 is None
    v3 = backbones.get("mobilenet_v3_small_128").imagenet_weights()
    assert v3.filename == "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" and v3.md5
    md5 = backbones.get("inception_v3").imagenet_weights().md5
    assert md5 == "bcbd6486424b2319ff4ef7d526e38f63"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_builds_with_usable_random_features(name, sample_dir):
    """Random weights are deterministic and give features with real spread across images."""
    from toolchain.images import load_rgb

    spec = backbones.get(name)
    first = backbones.load(spec, backbones.WeightsChoice("none"))
    assert (first.spec.family, first.bottleneck_size) == FAMILIES[name]
    again = backbones.load(spec, backbones.WeightsChoice("none"))
    assert again.fingerprint == first.fingerprint
    images = sorted(sample_dir.glob("*/*_00[0-1].jpg"))
    batch = np.stack([spec.preprocessing.apply(load_rgb(p, spec.input_size)) for p in images])
    features = first.model(batch, training=False).numpy()
    assert np.isfinite(features).all()
    # Uncalibrated random MobileNets give ~1e-17 here; the features must vary between images.
    assert features.std(axis=0).mean() > 1e-2 * np.abs(features).mean() > 0


def test_imagenet_weights_come_through_keras_cache(tmp_path, monkeypatch, tiny_backbone):
    """--weights imagenet reads the Keras cache through the same function that downloads."""
    spec = backbones.get("mobilenet_v2_0.35_96")  # Keras publishes no md5 for v2 checkpoints
    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    source = spec.build(seed=7)  # stands in for the published ImageNet checkpoint
    source.save_weights(models / spec.imagenet_weights().filename)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    loaded = backbones.load(spec, backbones.WeightsChoice("imagenet"))
    assert loaded.fingerprint == backbones.fingerprint(spec.name, source)
    random_init = backbones.load(spec, backbones.WeightsChoice("none"))
    assert loaded.fingerprint != random_init.fingerprint
    assert loaded.source.startswith("imagenet")


def test_checkpoint_failing_keras_md5_is_refused(tmp_path, monkeypatch, tiny_backbone):
    """MobileNet v3 and Inception checkpoints are md5-checked by Keras; a wrong file is named."""
    monkeypatch.setattr(backbones, "_KERAS_BASE", "http://127.0.0.1:9/")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = tiny_backbone.spec
    assert spec.imagenet_weights().md5
    (tmp_path / "models").mkdir()
    placed = tmp_path / "models" / spec.imagenet_weights().filename
    spec.build(seed=7).save_weights(placed)
    before = placed.read_bytes()
    with pytest.raises(WeightsUnavailable, match="does not match Keras' published md5"):
        backbones.load(spec, backbones.WeightsChoice("imagenet"))
    assert placed.read_bytes() == before  # the user's file is kept


def test_missing_imagenet_weights_name_the_file(tmp_path, monkeypatch):
    # A closed local port stands in for the unreachable download host, on any machine.
    monkeypatch.setattr(backbones, "_KERAS_BASE", "http://127.0.0.1:9/")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = backbones.get("mobilenet_v2_0.35_96")
    with pytest.raises(WeightsUnavailable) as raised:
        backbones.load(spec, backbones.WeightsChoice("imagenet"))
    assert spec.imagenet_weights().filename in raised.value.hint
    assert str(tmp_path / "models") in raised.value.message
    assert not list((tmp_path / "models").glob("*.h5"))


def test_weights_file(tmp_path, tiny_backbone):
    path = tmp_path / "mine.h5"
    tiny_backbone.spec.build(seed=3).save_weights(path)
    loaded = backbones.load(tiny_backbone.spec, backbones.WeightsChoice.parse(str(path)))
    assert loaded.fingerprint not in (tiny_backbone.fingerprint, "")
    assert loaded.weights.kind == "file"


def test_bad_weights_files_are_one_line_errors(tmp_path, tiny_backbone):
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        backbones.WeightsChoice.parse(str(tmp_path / "absent.h5"))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(WeightsUnavailable, match="cannot load weights"):
        backbones.load(tiny_backbone.spec, backbones.WeightsChoice.parse(str(garbage)))
    other = tmp_path / "other.h5"
    backbones.get("mobilenet_0.25_128").build().save_weights(other)
    with pytest.raises(WeightsUnavailable, match="cannot load weights"):
        backbones.load(tiny_backbone.spec, backbones.WeightsChoice.parse(str(other)))
