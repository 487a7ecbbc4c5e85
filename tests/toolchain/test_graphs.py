"""Frozen TensorFlow for Poets graphs (toolchain.graphs): retrain.py's exact structure in, every
target and variant out, each artifact computing what the graph computes and recording the
normalisation it applies and where that came from.

The graphs (tests/poets_graphs.py) are TF for Poets 2 on a TF-slim-named and on a frozen Keras
MobileNet v1 (``input`` → ... → ``input_1/BottleneckInputPlaceholder`` → ``final_result``) and
TF for Poets 1 on an Inception-V3-shaped stump (``DecodeJpeg/contents`` → ... → ``Mul`` → ... →
``input/BottleneckInputPlaceholder`` → ``final_result``). Each is converted once per variant
(module-scoped ``exports``); the reference is the untouched graph run in a TF1 session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import targets
from tests.helpers import agreement, held_out_paths, pixels_of
from tests.poets_graphs import (
    GRAPH_LABELS,
    graph_probabilities,
    inception_graph,
    keras_mobilenet_graph,
    slim_mobilenet_graph,
)
from toolchain import graphs
from toolchain.cli import main
from toolchain.conversion import GraphOptions, source_from_graph
from toolchain.errors import ModelError

#: Per graph: builder, image input, size, detected architecture, mean/std and their source.
GRAPHS = {
    "slim": (slim_mobilenet_graph, "input", 128, "mobilenet_v1_0.25_128", 127.5,
             "retrain.py's defaults for mobilenet_v1"),
    "keras": (keras_mobilenet_graph, "input", 128, "mobilenet_v1_0.25_128", 127.5,
              "retrain.py's defaults for mobilenet_v1"),
    "inception": (inception_graph, "Mul", 299, "inception_v3", 128.0,
                  "read from the graph's Sub/Mul nodes"),
}
#: Every target and variant: (target, Core ML format or "tflite", precision or variant).
VARIANTS = [("coreml", fmt, precision) for fmt in ("neuralnetwork", "mlprogram")
            for precision in ("float32", "float16", "int8")] + [
    ("tflite", "tflite", variant) for variant in ("float32", "float16", "dynamic", "int8")]
#: The frozen Keras MobileNet is the slowest to convert: its float32 of each format, and int8.
KERAS_VARIANTS = [("coreml", "neuralnetwork", "float32"), ("coreml", "mlprogram", "float32"),
                  ("tflite", "tflite", "float32"), ("tflite", "tflite", "int8")]
CASES = [(kind, *variant) for kind in ("slim", "inception") for variant in VARIANTS] + [
    ("keras", *variant) for variant in KERAS_VARIANTS]
#: Largest probability difference from the graph per (graph, target, precision), about 1.5x
#: the figure measured on the IMAGES held-out sample images (shown beside it; Core ML in the
#: NumPy executor, TFLite in both runners). Quantized variants may change one top-1 label.
TOLERANCE = {
    ("slim", "coreml", "float32"): 1e-6,       # 4.17e-7 neuralnetwork, 4.77e-7 mlprogram
    ("slim", "coreml", "float16"): 7e-4,       # 1.67e-4, 4.53e-4
    ("slim", "coreml", "int8"): 4.5e-3,        # 1.26e-3, 2.90e-3
    ("slim", "tflite", "float32"): 1.3e-6,     # 8.34e-7
    ("slim", "tflite", "float16"): 2.5e-4,     # 1.67e-4
    ("slim", "tflite", "dynamic"): 2.5e-3,     # 1.65e-3
    ("slim", "tflite", "int8"): 0.15,          # 0.0962
    ("inception", "coreml", "float32"): 1e-6,  # 1.19e-7, 1.19e-7 (1e-6: a float32 floor)
    ("inception", "coreml", "float16"): 5.5e-4,  # 9.57e-5, 3.54e-4
    ("inception", "coreml", "int8"): 2e-3,     # 1.22e-3, 1.13e-3
    ("inception", "tflite", "float32"): 1e-6,  # 4.17e-7 (1e-6: a float32 floor)
    ("inception", "tflite", "float16"): 1.5e-4,  # 9.57e-5
    ("inception", "tflite", "dynamic"): 1.8e-3,  # 1.15e-3
    ("inception", "tflite", "int8"): 0.075,    # 0.0492
    ("keras", "coreml", "float32"): 2.2e-5,    # 1.42e-5, 1.43e-5
    ("keras", "tflite", "float32"): 2.3e-5,    # 9.57e-6 interpreter, 1.52e-5 Task Library
    ("keras", "tflite", "int8"): 0.57,         # 0.375
    # The device row (coreml-numpy-float16) of float32 and float16 files; about 2x, as float16
    # rounding amplifies the CPU's last bits (tests/helpers.py). Its int8 rows stay within
    # int8's bounds above (measured 1.30e-3, 2.76e-3 slim; 1.18e-3, 1.45e-3 inception).
    ("slim", "coreml", "float16 compute"): 9e-4,       # 4.53e-4, both formats and files
    ("inception", "coreml", "float16 compute"): 7e-4,  # 3.54e-4, both formats and files
    ("keras", "coreml", "float16 compute"): 0.1,       # 0.0395 neuralnetwork, 0.046 mlprogram
}
#: Images the artifacts are compared with the graph on.
IMAGES = 6


@pytest.fixture(scope="module")
def poets(tmp_path_factory):
    """kind → the graph's path (each in its own folder, with retrained_labels.txt)."""
    built = {}
    for kind, (build, *_) in GRAPHS.items():
        folder = tmp_path_factory.mktemp(f"poets-{kind}")
        built[kind] = build(folder / "retrained_graph.pb")
    return built


@pytest.fixture(scope="module")
def pixels(sample_dir):
    """size → uint8 pixels of a few held-out sample images."""
    paths = held_out_paths(sample_dir)[:IMAGES]
    return {size: pixels_of(paths, size) for size in (128, 299)}


@pytest.fixture(scope="module")
def references(poets, pixels):
    """kind → the untouched graph's probabilities on ``pixels``, normalised as retrain.py did."""
    found = {}
    for kind, path in poets.items():
        _, _, size, _, mean, _ = GRAPHS[kind]
        raw = pixels[size].astype(np.float32)
        if kind == "inception":  # the graph normalises itself: feed the resized pixels
            found[kind] = graph_probabilities(path, "ResizeBilinear:0", raw)
        else:
            found[kind] = graph_probabilities(path, "input:0", (raw - mean) / mean)
    return found


@pytest.fixture(scope="module")
def exports(poets, sample_dir, tmp_path_factory):
    """``exports(kind, target, fmt, precision)`` → path: converted once per module."""
    from targets.coreml import CoreMLOptions
    from targets.tflite import TFLiteOptions
    from tests.helpers import CALIBRATION_IMAGES, METADATA

    done = {}

    def get(kind, target, fmt, precision):
        key = (kind, target, fmt, precision)
        if key not in done:
            source = source_from_graph(poets[kind], GraphOptions(), image_dir=sample_dir)
            options = (CoreMLOptions(format=fmt, precision=precision) if target == "coreml"
                       else TFLiteOptions(variant=precision, no_repair=True,  # the plain one
                                          calibration_images=CALIBRATION_IMAGES))
            chosen = targets.get(target)
            folder = tmp_path_factory.mktemp("-".join(key))
            done[key] = chosen.export(source, options, METADATA,
                                      folder / chosen.filename(options))
        return done[key]

    return get


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_the_graph_is_cut_to_one_image_input(poets, kind):
    _, image, size, architecture, mean, source = GRAPHS[kind]
    frozen = graphs.load(poets[kind])
    assert (frozen.input_name, frozen.input_size, frozen.architecture) == (
        image, size, architecture)
    assert (frozen.normalization.mean, frozen.normalization.std) == (mean, mean)
    assert frozen.normalization.source == source and not frozen.normalization.guess
    inputs = [node.name for node in frozen.graph_def.node if node.op in graphs.INPUT_OPS]
    assert inputs == [image]  # BottleneckInputPlaceholder is an Identity of its default now
    scope = "input_1" if image == "input" else "input"  # retrain.py's name_scope('input')
    assert frozen.removed_inputs == (f"{scope}/BottleneckInputPlaceholder",)
    assert not {"DecodeJpeg", "DecodeJpeg/contents", "ResizeBilinear"} & {
        node.name for node in frozen.graph_def.node}


@pytest.mark.parametrize("kind, target, fmt, precision", CASES,
                         ids=["-".join(case) for case in CASES])
def test_every_variant_computes_what_the_graph_computes(kind, target, fmt, precision, exports,
                                                        pixels, references):
    path = exports(kind, target, fmt, precision)
    _, _, size, architecture, mean, source = GRAPHS[kind]
    found = targets.get(target).inspect(path)
    assert (found.precision, found.input_size, found.labels) == (precision, size, GRAPH_LABELS)
    assert found.preprocessing.mean == pytest.approx((mean,) * 3)
    assert found.preprocessing.std == pytest.approx((mean,) * 3)
    assert {key: found.user_defined.get(key) for key in (
        "input_mean", "input_std", "normalization_source", "architecture")} == {
        "input_mean": f"{mean:g}", "input_std": f"{mean:g}", "normalization_source": source,
        "architecture": architecture}
    with targets.get(target).runners(path) as runners:
        for runner in runners:
            assert runner.labels == GRAPH_LABELS
            max_diff, top1 = agreement(np.asarray(runner(pixels[size])), references[kind])
            print(f"{kind} {fmt} {precision} {runner.runtime}: max diff {max_diff:.3g}, "
                  f"top-1 agreement {top1:.2f}")
            device = runner.compute and precision != "int8"
            bound = TOLERANCE[kind, target, "float16 compute" if device else precision]
            assert max_diff <= bound, (runner.runtime, max_diff)
            assert top1 >= (1.0 if precision in ("float32", "float16")
                            else 1 - 1 / IMAGES - 1e-9)


def test_convert_says_which_normalisation_it_used(poets, tmp_path, capsys):
    """Reproduces the user's report: Core ML from a graph with retrain.py's
    BottleneckInputPlaceholder failed with "Multiple inputs are found in graph"."""
    assert main(["convert", "--graph", str(poets["slim"]), "--target", "coreml",
                 "--output-dir", str(tmp_path)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "normalisation: mean 127.5 std 127.5 (retrain.py's defaults for mobilenet_v1)" in err
    assert "Multiple inputs" not in err
    assert (tmp_path / "model_float32.mlmodel").is_file()


def test_label_reads_tf_for_poets_1_normalisation_from_the_graph(poets, pixels, references,
                                                                 sample_dir, capsys):
    from tests.helpers import parse_label_lines

    image = held_out_paths(sample_dir)[0]
    assert main(["label", "--model", str(poets["inception"]), "--image", str(image),
                 "--top-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert "normalisation: mean 128 std 128 (read from the graph's Sub/Mul nodes)" in err
    printed = dict(parse_label_lines(out))
    expected = references["inception"][0]
    for column, label in enumerate(GRAPH_LABELS):
        assert printed[label] == pytest.approx(float(expected[column]), abs=2e-5)


def test_flags_override_the_detected_normalisation(poets, pixels, sample_dir, capsys):
    from tests.helpers import parse_label_lines

    image = held_out_paths(sample_dir)[0]
    assert main(["label", "--model", str(poets["slim"]), "--image", str(image), "--top-k", "3",
                 "--input-mean", "128", "--input-std", "128"]) == 0
    out, err = capsys.readouterr()
    assert "normalisation: mean 128 std 128 (flag)" in err
    expected = graph_probabilities(poets["slim"], "input:0",
                                   (pixels[128][:1].astype(np.float32) - 128) / 128)[0]
    printed = dict(parse_label_lines(out))
    for column, label in enumerate(GRAPH_LABELS):
        assert printed[label] == pytest.approx(float(expected[column]), abs=2e-5)
    source = source_from_graph(poets["slim"], GraphOptions(input_std=64.0))
    assert source.normalization_source == ("--input-std flag; mean retrain.py's defaults for "
                                           "mobilenet_v1")
    assert (source.user_defined["input_mean"], source.user_defined["input_std"]) == (
        "127.5", "64")


def test_flags_that_contradict_the_graphs_own_normalisation_are_warned(poets, caplog):
    source = source_from_graph(poets["inception"], GraphOptions(input_mean=127.5))
    assert source.normalization_source == "--input-mean flag; std read from the graph's " \
                                          "Sub/Mul nodes"
    assert source.preprocessing.mean == pytest.approx((127.5,) * 3)
    assert "the graph's Sub/Mul nodes say mean 128 std 128, but the flags override them" in \
        caplog.text
    caplog.clear()
    source_from_graph(poets["inception"], GraphOptions(input_mean=128.0, input_std=128.0))
    assert "override" not in caplog.text  # the same values: nothing to warn about


def test_an_unknown_architecture_is_a_warned_guess(tmp_path, sample_dir, capsys):
    graph = slim_mobilenet_graph(tmp_path / "retrained_graph.pb", scope="Backbone")
    image = held_out_paths(sample_dir)[0]
    assert main(["label", "--model", str(graph), "--image", str(image), "--top-k", "1"]) == 0
    err = capsys.readouterr().err
    assert ("normalisation: mean 127.5 std 127.5 (a guess: the architecture is unknown); "
            "retrained_graph.pb is not a known retrain.py architecture, so this is a guess"
            in err)
    assert "pass --input-mean and --input-std" in err
    source = source_from_graph(graph)
    assert source.user_defined["architecture"] == "unknown"
    assert source.normalization_source == "a guess: the architecture is unknown"


@pytest.mark.parametrize("options, message, hint", [
    (GraphOptions(output_name="softmax"), "has no tensor named 'softmax'", "--output-name"),
    (GraphOptions(input_name="image"), "has no tensor named 'image'",
     "candidate inputs: Mul, input/BottleneckInputPlaceholder"),
    (GraphOptions(input_name="input/BottleneckInputPlaceholder"),
     "input 'input/BottleneckInputPlaceholder' of retrained_graph.pb has shape [-1, 64]; an "
     "image input is [1, size, size, 3]", "--input-name"),
    (GraphOptions(input_name="DecodeJpeg/contents"),
     "input 'DecodeJpeg/contents' of retrained_graph.pb takes string, not float32 pixels",
     "Mul"),
    (GraphOptions(input_name="pool_3/_reshape"), "cannot tell the image size", "--input-name"),
])
def test_wrong_names_are_one_line_errors(poets, options, message, hint):
    with pytest.raises(ModelError) as raised:
        source_from_graph(poets["inception"], options)
    assert message in raised.value.message and "\n" not in raised.value.message
    assert hint in raised.value.hint


def test_a_graph_without_either_default_input_lists_candidates(tmp_path):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3], name="Placeholder")
        tf.nn.softmax(tf.reshape(image, [1, -1]), name="final_result")
    (tmp_path / "g.pb").write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(ModelError, match="neither 'input'") as raised:
        graphs.load(tmp_path / "g.pb")
    assert raised.value.hint == "pass --input-name; candidate inputs: Placeholder"
    assert graphs.load(tmp_path / "g.pb", input_name="Placeholder").input_size == 8


@pytest.mark.parametrize("content", [b"", b"\x00\x01 definitely not a graph"])
def test_junk_is_a_one_line_error(tmp_path, content, capsys):
    junk = tmp_path / "retrained_graph.pb"
    junk.write_bytes(content)
    (tmp_path / "retrained_labels.txt").write_text("a\nb\n")
    assert main(["convert", "--graph", str(junk), "--target", "tflite"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"toolchain: error: cannot read frozen graph {junk}")
    assert lines[1:] == ["hint: pass a frozen GraphDef, as retrain.py's --output_graph"]


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_the_test_graphs_tell_images_apart(references, kind):
    """A graph whose probabilities hardly move between images would pass any comparison."""
    probabilities = references[kind]
    print(kind, np.round(probabilities, 3).tolist())
    assert probabilities.std(axis=0).max() > 0.05
    assert 0.4 < float(np.median(probabilities.max(axis=1))) < 0.99


#: Golden records of graph-sourced artifacts (regenerate with UPDATE_GOLDEN=1, review the diff).
GOLDEN = Path(__file__).parent / "golden" / "graphs"
GOLDEN_CASES = [("inception", "coreml", "neuralnetwork", "float32"),
                ("inception", "tflite", "tflite", "float32"),
                ("slim", "coreml", "mlprogram", "int8"), ("slim", "tflite", "tflite", "int8")]
#: What changes from run to run or release to release.
VOLATILE = {"com.github.apple.coremltools.conversion_date": "<date of conversion>",
            "toolchain_version": "<toolchain version>"}


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=["-".join(case) for case in GOLDEN_CASES])
def test_inspected_record_matches_the_golden_file(case, exports):
    """What a graph's artifact says about itself, normalisation and its source included."""
    record = targets.get(case[1]).inspect(exports(*case)).record()
    for key, placeholder in VOLATILE.items():
        if key in record["user_defined"]:
            record["user_defined"][key] = placeholder
    golden = GOLDEN / f"{'-'.join(case)}.json"
    text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text, encoding="utf-8")
        pytest.fail(f"rewrote {golden.name}: review the diff, then run without UPDATE_GOLDEN")
    assert golden.is_file(), f"no golden file {golden.name}: run once with UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8")


def test_a_graph_that_never_saw_the_folder_tunes_on_every_image_but_the_calibrating_ones(
        poets, sample_dir):
    """A frozen graph's head was not fit on ``--image-dir``: its validation and testing splits
    tune the quantization repair first, then the training images after the calibrating ones,
    up to the count asked for (a retrained model's tuning set is its validation split alone:
    tests/targets/test_tflite_repair.py)."""
    from targets import _tuning
    from toolchain.dataset import scan

    kind = sorted(GRAPHS)[0]
    source = source_from_graph(poets[kind], GraphOptions(), image_dir=sample_dir)
    dataset = scan(sample_dir)
    split = {name: [entry.path for entry in dataset.subset(name)]
             for name in ("training", "validation", "testing")}
    assert source.fit_on_images is False
    assert list(source.tuning) == split["validation"] + split["testing"]
    assert list(source.calibration) == split["training"]
    paths, pixels, origin = _tuning.tuning_set(source, 10, 40)
    unseen = len(source.tuning)
    assert paths == [*source.tuning, *split["training"][10:10 + 40 - unseen]]
    assert origin == {"validation and testing": unseen, "training": 40 - unseen,
                      "calibration": 0}
    assert len(pixels) == 40 and not set(paths) & set(split["training"][:10])
