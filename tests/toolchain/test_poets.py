"""Frozen-graph backbones: retrain.py's graphs (``.tgz``, ``.pb``, ``--weights poets``) retrain,
cache their bottlenecks by the graph's content, export and verify like any backbone.

The graphs are tiny stand-ins built by ``tests.helpers`` with retrain.py's tensor names and the
archive layout it downloads; ``--weights poets`` downloads through Keras' ``get_file`` from a
local ``file://`` folder, so the code that would download is the code tested.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    poets_archive,
    tiny_inception_graph,
    tiny_mobilenet_graph,
)
from toolchain import backbones, cli, poets
from toolchain.errors import ToolchainError


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """A MobileNet-named archive (batchable, 128 px), an Inception-named .pb (batch 1, 96 px)
    and a graph with names retrain.py never used."""
    root = tmp_path_factory.mktemp("graphs")
    inception = root / "classify_image_graph_def.pb"
    inception.write_bytes(tiny_inception_graph())
    other = root / "features.pb"
    other.write_bytes(tiny_mobilenet_graph(96, 16, seed=3, input_name="images",
                                           bottleneck_name="features"))
    return {"tgz": poets_archive(root / "download", tiny_mobilenet_graph()),
            "pb": inception, "other": other}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_is_retrain_py_s():
    """URLs, files inside the archives, tensor names, sizes and normalisation as in
    retrain.py's create_model_info."""
    row = poets.poets_model("mobilenet_0.50_224")
    assert row.url == "http://download.tensorflow.org/models/mobilenet_v1_0.50_224_frozen.tgz"
    assert row.member == "mobilenet_v1_0.50_224/frozen_graph.pb"
    assert (row.input_tensor, row.bottleneck_tensor, row.bottleneck_size, row.input_size,
            row.input_mean, row.input_std) == ("input", "MobilenetV1/Predictions/Reshape", 1001,
                                               224, 127.5, 127.5)
    quantized = poets.poets_model("mobilenet_1.0_128_quantized")
    assert quantized.filename == "mobilenet_v1_1.0_128_frozen.tgz"
    assert quantized.member == "mobilenet_v1_1.0_128/quantized_graph.pb"
    assert poets.poets_model("mobilenet_0.5_160").filename == "mobilenet_v1_0.50_160_frozen.tgz"
    inception = poets.poets_model("inception_v3")
    assert inception.url == ("http://download.tensorflow.org/models/image/imagenet/"
                             "inception-2015-12-05.tgz")
    assert (inception.member, inception.input_tensor, inception.bottleneck_tensor,
            inception.bottleneck_size, inception.input_size, inception.input_mean,
            inception.input_std) == ("classify_image_graph_def.pb", "Mul", "pool_3/_reshape",
                                     2048, 299, 128.0, 128.0)
    for name in ("mobilenet_0.50_96", "mobilenet_0.33_224", "mobilenet_v2_1.0_224"):
        assert poets.poets_model(name) is None  # retrain.py had no such graph


def test_archive_and_pb_load_with_retrain_py_s_tensors(graphs):
    mobilenet = backbones.BackboneOptions(weights=str(graphs["tgz"])).load()
    assert (mobilenet.spec.name, mobilenet.spec.input_size, mobilenet.bottleneck_size) == \
        ("mobilenet_0.25_128", 128, 40)
    assert mobilenet.graph.member == "mobilenet_v1_0.25_128/frozen_graph.pb"
    assert mobilenet.graph.bottleneck_tensor == "MobilenetV1/Predictions/Reshape"
    assert mobilenet.model.batched and mobilenet.spec.preprocessing.mean == (127.5,) * 3
    inception = backbones.BackboneOptions(weights=str(graphs["pb"])).load()
    assert (inception.spec.name, inception.spec.input_size, inception.bottleneck_size) == \
        ("inception_v3", 96, 48)
    assert (inception.graph.input_tensor, inception.graph.bottleneck_tensor) == \
        ("Mul", "pool_3/_reshape")
    assert not inception.model.batched  # pool_3/_reshape is a fixed [1, 2048]: image by image
    assert inception.spec.preprocessing.mean == (128.0,) * 3
    batch = inception.spec.preprocessing.apply(
        np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3)).astype(np.uint8))
    vectors = inception.model(batch).numpy()
    assert vectors.shape == (3, 48) and vectors.std(axis=0).mean() > 0


def test_any_graph_with_its_tensors_named_by_flag(graphs, capsys):
    with pytest.raises(ToolchainError, match="bottleneck tensor is unknown") as raised:
        backbones.BackboneOptions(weights=str(graphs["other"])).load()
    assert "features" in raised.value.message  # among the candidates
    loaded = backbones.BackboneOptions(weights=str(graphs["other"]), input_tensor="images",
                                       bottleneck_tensor="features", input_mean=0.0,
                                       input_std=255.0).load()
    assert (loaded.spec.name, loaded.spec.input_size, loaded.bottleneck_size) == \
        ("graph_features", 96, 16)
    assert loaded.spec.preprocessing.scale == pytest.approx(1 / 255)


def test_quantized_member_is_chosen_by_the_architecture(tmp_path):
    archive = poets_archive(tmp_path, tiny_mobilenet_graph(seed=0),
                            quantized=tiny_mobilenet_graph(seed=9))
    plain = backbones.BackboneOptions(weights=str(archive)).load()
    quantized = backbones.BackboneOptions(weights=str(archive),
                                          architecture="mobilenet_0.25_128_quantized").load()
    assert quantized.graph.member == "mobilenet_v1_0.25_128/quantized_graph.pb"
    assert quantized.fingerprint != plain.fingerprint


def test_poets_downloads_exactly_retrain_py_s_file(graphs, tmp_path, monkeypatch, capsys,
                                                   sample_dir):
    """--weights poets fetches the archive retrain.py names for --architecture, through
    Keras' get_file, into --weights-dir; once there it is used offline."""
    monkeypatch.setattr(poets, "POETS_BASE", graphs["tgz"].parent.as_uri() + "/")
    weights_dir = tmp_path / "models"
    argv = ["bottlenecks", "--image-dir", sample_dir, "--architecture", "mobilenet_0.25_128",
            "--weights", "poets", "--weights-dir", weights_dir,
            "--bottleneck-dir", tmp_path / "cache", "--quiet"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    assert [p.name for p in weights_dir.iterdir()] == ["mobilenet_v1_0.25_128_frozen.tgz"]
    assert (weights_dir / "mobilenet_v1_0.25_128_frozen.tgz").read_bytes() == \
        graphs["tgz"].read_bytes()
    assert "72 computed" in out
    monkeypatch.setattr(poets, "POETS_BASE", "http://127.0.0.1:9/")  # offline from now on
    code, out, err = _cli(capsys, *argv)
    assert code == 0 and "72 cached, 0 computed" in out, err
    code, out, err = _cli(capsys, *argv[:4], "mobilenet_0.50_224", *argv[5:])
    assert code == 2 and len(err.strip().splitlines()) == 2  # error and hint
    assert "mobilenet_v1_0.50_224_frozen.tgz is not in" in err
    assert "http://127.0.0.1:9/mobilenet_v1_0.50_224_frozen.tgz" in err


def test_bottlenecks_are_keyed_by_the_graph_s_content(tmp_path, sample_dir, capsys):
    """Same file name, other graph: every vector is computed again; same graph elsewhere: hit."""
    def run(archive: Path) -> str:
        code, out, err = _cli(capsys, "bottlenecks", "--image-dir", sample_dir, "--weights",
                              archive, "--bottleneck-dir", tmp_path / "cache", "--quiet")
        assert code == 0, err
        return re.search(r"\d+ cached, \d+ computed", out).group(0)

    first = poets_archive(tmp_path / "a", tiny_mobilenet_graph(seed=4))
    assert run(first) == "0 cached, 72 computed"
    assert run(first) == "72 cached, 0 computed"
    assert run(poets_archive(tmp_path / "b", tiny_mobilenet_graph(seed=4))) == \
        "72 cached, 0 computed"  # the content, not the path
    assert run(poets_archive(tmp_path / "a", tiny_mobilenet_graph(seed=5))) == \
        "0 cached, 72 computed"


@pytest.fixture(scope="module")
def graph_builds(graphs, sample_dir, tmp_path_factory):
    """``toolchain build`` on each frozen graph, Core ML and TFLite: {kind: (code, out, dir)}."""
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("graph-builds")
    done = {}
    for kind in ("tgz", "pb"):
        out_dir = root / kind
        text = io.StringIO()
        with redirect_stdout(text):
            code = cli.main(["build", "--image-dir", str(sample_dir), "--weights",
                             str(graphs[kind]), "--bottleneck-dir", str(root / "cache"),
                             "--output-dir", str(out_dir), "--how-many-training-steps", "150",
                             "--target", "tflite", "--tflite-variant", "float32",
                             "--target", "coreml", "--quiet", "--accept-small-set"])
        done[kind] = code, text.getvalue(), out_dir
    return done


@pytest.mark.parametrize("kind, architecture, input_tensor", [
    ("tgz", "mobilenet_0.25_128", "input"), ("pb", "inception_v3", "Mul")])
def test_a_build_on_a_frozen_graph_exports_and_verifies(graph_builds, kind, architecture,
                                                        input_tensor):
    code, out, out_dir = graph_builds[kind]
    assert code == 0, out
    assert "verification passed" in out
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["architecture"] == architecture
    assert {entry["runtime"] for entry in report["artifacts"]} >= {"tflite-interpreter",
                                                                    "coreml-numpy"}
    assert all(entry["top1_agreement"] == 1.0 for entry in report["artifacts"])
    model = out_dir / "model"
    assert sorted(p.name for p in model.iterdir() if p.is_file()) == \
        ["labels.txt", "model.json", "retrained_graph.pb", "split.json"]
    manifest = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert manifest["backbone"]["kind"] == "frozen_graph"
    assert manifest["backbone"]["input_tensor"] == input_tensor
    assert len(manifest["backbone"]["sha256"]) == 64


def test_the_retrained_graph_has_retrain_py_s_names(graph_builds):
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((graph_builds["tgz"][2] / "model" / "retrained_graph.pb")
                              .read_bytes())
    nodes = {node.name: node.op for node in graph_def.node}
    assert nodes["input_1/BottleneckInputPlaceholder"] == "PlaceholderWithDefault"
    assert nodes["final_training_ops/weights/final_weights"] == "Const"
    assert nodes["final_training_ops/biases/final_biases"] == "Const"
    assert nodes["final_result"] == "Softmax" and nodes["input"] == "Placeholder"


def test_label_and_verify_read_a_graph_backed_folder(graph_builds, sample_dir, capsys):
    _, _, out_dir = graph_builds["pb"]
    image = sorted(sample_dir.glob("*/*.jpg"))[0]
    code, out, err = _cli(capsys, "label", "--model", out_dir, "--image", image, "--top-k", "2")
    assert code == 0 and len(out.strip().splitlines()) == 2, err
    code, out, err = _cli(capsys, "verify", "--model", out_dir, "--image-dir", sample_dir,
                          "--artifact", out_dir / "model_float32.mlmodel",
                          "--report-dir", out_dir / "again", "--accept-small-set")
    assert code == 0, err + out


def test_a_second_build_computes_no_bottleneck(graph_builds, graphs, sample_dir, capsys):
    cache = graph_builds["tgz"][2].parent / "cache"
    code, out, err = _cli(capsys, "retrain", "--image-dir", sample_dir, "--weights", graphs["tgz"],
                          "--bottleneck-dir", cache, "--output-dir", cache.parent / "again",
                          "--how-many-training-steps", "10", "--quiet")
    assert code == 0 and "72 cached, 0 computed" in out, err


@pytest.mark.parametrize("make, argv, message", [
    (None, ["--weights", "{tmp}/absent.pb"], "weights file {tmp}/absent.pb does not exist"),
    ("garbage", ["--weights", "{tmp}/garbage.pb"], "garbage.pb is not a TensorFlow GraphDef"),
    ("wrong_member", ["--weights", "{tmp}/mobilenet_v1_0.25_128_frozen.tgz"],
     "holds no mobilenet_v1_0.25_128/frozen_graph.pb (its graphs: other/graph.pb)"),
    ("broken_tgz", ["--weights", "{tmp}/mobilenet_v1_0.25_128_frozen.tgz"], "cannot read"),
    ("pb", ["--weights", "{tmp}/classify_image_graph_def.pb", "--bottleneck-tensor", "nope"],
     "has no tensor 'nope' (candidates: "),
    ("pb", ["--weights", "{tmp}/classify_image_graph_def.pb", "--input-tensor", "softmax"],
     "not an image"),
    (None, ["--weights", "none", "--bottleneck-tensor", "x"],
     "--bottleneck-tensor apply to frozen-graph weights only"),
    ("pb", ["--weights", "{tmp}/classify_image_graph_def.pb", "--architecture",
            "mobilenet_0.25_128"], "does not match classify_image_graph_def.pb"),
    (None, ["--weights", "poets", "--architecture", "mobilenet_v2_1.0_224"],
     "retrain.py has no frozen graph for 'mobilenet_v2_1.0_224'"),
    (None, ["--weights", "poets", "--input-std", "0"], "--input-std must be positive"),
])
def test_every_frozen_graph_error_is_one_line(tmp_path, sample_dir, capsys, make, argv,
                                              message):
    if make == "garbage":
        (tmp_path / "garbage.pb").write_bytes(b"\x00\xffnot a protobuf at all")
    elif make == "wrong_member":
        poets_archive(tmp_path, tiny_mobilenet_graph(), member="other/graph.pb")
    elif make == "broken_tgz":
        (tmp_path / "mobilenet_v1_0.25_128_frozen.tgz").write_bytes(b"\x1f\x8b truncated")
    elif make == "pb":
        (tmp_path / "classify_image_graph_def.pb").write_bytes(tiny_inception_graph())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _cli(capsys, "bottlenecks", "--image-dir", sample_dir, "--bottleneck-dir",
                        tmp_path / "cache", "--quiet", *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.replace("{tmp}", str(tmp_path)) in errors[0], err
    assert "Traceback" not in err


def test_an_extracted_graph_takes_the_architecture_of_its_size(tmp_path):
    extracted = tmp_path / "frozen_graph.pb"
    extracted.write_bytes(tiny_mobilenet_graph())
    assert backbones.BackboneOptions(weights=str(extracted)).load().spec.name == \
        "graph_frozen_graph"
    named = backbones.BackboneOptions(weights=str(extracted),
                                      architecture="mobilenet_0.25_128").load()
    assert named.spec.name == "mobilenet_0.25_128" and named.graph.input_tensor == "input"
    with pytest.raises(ToolchainError, match="does not match frozen_graph.pb"):
        backbones.BackboneOptions(weights=str(extracted),
                                  architecture="mobilenet_1.0_224").load()


def test_a_graph_tflite_cannot_convert_is_computed_by_tensorflow(tmp_path, sample_dir,
                                                                 monkeypatch, toolchain_log):
    """retrain.py's quantized graphs hold ops outside TFLite's builtins: no engine, no failure."""
    from toolchain import engine
    from toolchain.cache import BottleneckCache, Job, extract

    def refuse(model):
        raise RuntimeError("ConverterError: 'QuantizedConv2D' op is neither a custom op "
                           "nor a flex op")

    monkeypatch.setattr(engine, "float_tflite_bytes", refuse)
    backbone = backbones.BackboneOptions(
        weights=str(poets_archive(tmp_path, tiny_mobilenet_graph(seed=6)))).load()
    jobs = [Job(path) for path in sorted(sample_dir.glob("*/*.jpg"))[:20]]
    result = extract(jobs, BottleneckCache(tmp_path / "cache", backbone), progress=False)
    assert (result.computed, result.runtime) == (20, "tensorflow")
    assert "no TFLite engine for mobilenet_0.25_128" in toolchain_log.text


def test_a_retrained_graph_as_weights_trains_a_new_head(graph_builds, sample_dir, tmp_path,
                                                        capsys):
    """The one graph a user often has is a retrained one: it carries its own head and
    ``final_result`` (6 classes here). Used as --weights, its head is cut away at the
    bottleneck and the new model answers with the new classes (3), not the old ones."""
    import shutil

    import tensorflow as tf

    retrained = graph_builds["tgz"][2] / "model" / "retrained_graph.pb"
    photos = tmp_path / "photos"
    for label in ("desert", "forest", "ocean"):
        shutil.copytree(sample_dir / label, photos / label)
    out = tmp_path / "model"
    code, _, err = _cli(capsys, "retrain", "--image-dir", photos, "--weights", retrained,
                        "--input-tensor", "input", "--bottleneck-tensor",
                        "MobilenetV1/Predictions/Reshape", "--bottleneck-dir", tmp_path / "c",
                        "--output-dir", out, "--how-many-training-steps", 50, "--quiet")
    assert code == 0, err
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString((out / "retrained_graph.pb").read_bytes())
    heads = [node.name for node in graph.node if node.name.startswith("final_result")]
    assert heads == ["final_result"], heads
    code, printed, err = _cli(capsys, "label", "--model", out, "--image",
                              next(photos.glob("ocean/*.jpg")), "--top-k", 10)
    assert code == 0, err
    assert sorted(line.split(" (score")[0] for line in printed.splitlines()) == \
        ["desert", "forest", "ocean"]


def test_retrain_pys_normalisation_is_one_table():
    """retrain.py's means and stds live in poets.py; the frozen-graph, original and backbone
    readers take their defaults from it, not from copies."""
    from toolchain import graphs, originals

    assert graphs.RETRAIN_DEFAULTS is poets.NORMALIZATION
    assert graphs.GUESS is originals.DEFAULT_MEAN_STD is poets.DEFAULT_NORMALIZATION
    for architecture, family in [("inception_v3", "inception_v3"),
                                 ("mobilenet_0.25_128", "mobilenet_v1"),
                                 ("mobilenet_1.0_224_quantized", "mobilenet_v1")]:
        row = poets.poets_model(architecture)
        assert (row.input_mean, row.input_std) == poets.NORMALIZATION[family]
