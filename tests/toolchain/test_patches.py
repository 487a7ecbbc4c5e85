"""``toolchain.patches``: every workaround of a library's internals still applies to the pinned
versions, changes only what it says, and undoes itself."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from tests.helpers import TINY_ARCH
from toolchain import patches


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: f"{p.module}.{p.attribute}")
def test_every_patched_attribute_exists_in_the_installed_version(patch):
    """An upgrade that renames or removes one would switch its fix off silently: fail instead."""
    assert patch.why and patch.upstream
    if patch.module.startswith("mediapipe."):
        pytest.importorskip("mediapipe", reason="the mediapipe extra is not installed here")
    module = importlib.import_module(patch.module)
    assert hasattr(module, patch.attribute), f"{patch.module} has no {patch.attribute}"
    assert patch.resolve() is module


def test_a_missing_attribute_only_switches_its_patch_off():
    gone = patches.Patch("coremltools.models.model", "_no_such_attribute", "why", "none")
    assert gone.resolve() is None
    assert patches.Patch("no_such_module_here", "x", "why", "none").resolve() is None


def test_progress_bars_are_off_inside_and_restored_after():
    modules = [(importlib.import_module(p.module), p.attribute) for p in patches.PROGRESS_BARS]
    originals = [getattr(module, name) for module, name in modules]
    with patches.without_progress_bars():
        for (module, name), original in zip(modules, originals):
            swapped = getattr(module, name)
            assert swapped is not original and swapped.keywords == {"disable": True}
            assert swapped.func is original
    assert [getattr(module, name) for module, name in modules] == originals


def test_quantize_weights_prints_nothing(coreml_export, capsys):
    import coremltools as ct

    path, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    model = ct.models.MLModel(str(path), skip_model_load=True)
    quantized = patches.quantize_weights(model, nbits=16, quantization_mode="linear")
    assert capsys.readouterr().out == ""
    layers = quantized.get_spec().neuralNetworkClassifier.layers
    assert any(len(layer.convolution.weights.float16Value) for layer in layers)


def _undated(spec: bytes) -> bytes:
    """An .mlmodel's bytes with coremltools' conversion date (YYYY-MM-DD) made one fixed day."""
    return re.sub(rb"(conversion_date\x12\n)\d{4}-\d\d-\d\d", rb"\g<1>0000-00-00", spec)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "darwin", reason="the round trips are skipped off macOS only")
def test_skipping_spec_round_trips_changes_no_byte(coreml_export, tmp_path, monkeypatch):
    """without_spec_round_trips only saves time: the .mlmodel written with it is byte for byte
    the one coremltools writes when it saves and re-parses every spec."""
    import contextlib

    from coremltools.models import model as ct_model
    from coremltools.models import utils as ct_utils

    from targets.coreml import CoreMLOptions, CoreMLTarget
    from tests.helpers import METADATA, make_source

    fast, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    monkeypatch.setattr(patches, "without_spec_round_trips", contextlib.nullcontext)
    target, options = CoreMLTarget(), CoreMLOptions(format="neuralnetwork", precision="float32")
    slow = target.export(make_source(TINY_ARCH), options, METADATA,
                         tmp_path / target.filename(options))
    # coremltools stamps the day of conversion: the shared export may be from before midnight.
    assert _undated(slow.read_bytes()) == _undated(fast.read_bytes())
    # coremltools' own functions are back in place after the exports.
    assert (ct_model._save_spec, ct_model._load_spec) == (ct_utils.save_spec, ct_utils.load_spec)


def test_spec_round_trips_are_skipped_during_a_conversion_and_restored():
    from coremltools.models import model as ct_model

    save, load = ct_model._save_spec, ct_model._load_spec
    with patches.without_spec_round_trips():
        assert (ct_model._save_spec, ct_model._load_spec) != (save, load)
    assert (ct_model._save_spec, ct_model._load_spec) == (save, load)


def test_the_quantized_input_warning_alone_is_filtered():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with patches.quantized_input_warning_off():
            warnings.warn("Statistics for quantized inputs were expected, but not specified",
                          stacklevel=1)
            warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_the_quantizers_chatter_alone_is_dropped_from_stderr(capfd):
    """Written to descriptor 2 as TFLite's C++ writes it; what else arrived is kept."""
    import os

    with patches.quantizer_chatter_off():
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8\n")
        os.write(2, b"error: a real message\n")
    assert capfd.readouterr().err == "error: a real message\n"


def test_the_quantizers_chatter_filter_restores_stderr_after_an_error(capfd):
    import os

    with pytest.raises(RuntimeError), patches.quantizer_chatter_off():
        os.write(2, b"why it failed\n")
        raise RuntimeError("the quantizer broke")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "why it failed\nafter\n"


@pytest.mark.slow
def test_mediapipe_finalisers_never_wait_inside_a_collection(tflite_export, monkeypatch):
    """Outside a collection the finaliser closes as MediaPipe's own does; inside one it leaves
    the classifier open and warns (the hang it avoids: tests/targets/test_runners.py)."""
    pytest.importorskip("mediapipe", reason="the mediapipe extra is not installed here")
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    patches.mediapipe_finalisers_never_wait()
    patches.mediapipe_finalisers_never_wait()  # idempotent: wrapped once
    assert vision.ImageClassifier.__del__.never_waits
    options = vision.ImageClassifierOptions(base_options=base_options.BaseOptions(
        model_asset_path=str(tflite_export(TINY_ARCH, "float32"))))
    with vision.ImageClassifier.create_from_options(options) as closed:
        closed.__del__()
        assert not closed._handle
    with vision.ImageClassifier.create_from_options(options) as left:
        before = patches.mediapipe_classifiers_left_open()
        # restored after the test: the suite's leak check (tests/conftest.py) reads the count
        monkeypatch.setattr(patches._Collecting, "left_open", before)
        monkeypatch.setattr(patches._Collecting, "active", True)
        with pytest.warns(ResourceWarning, match="never closed and reached the garbage"):
            left.__del__()
        monkeypatch.setattr(patches._Collecting, "active", False)
        assert left._handle and patches.mediapipe_classifiers_left_open() == before + 1
    assert not left._handle  # the with block closed it
