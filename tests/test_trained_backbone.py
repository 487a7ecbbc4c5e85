"""Quantization on a real frozen backbone: trained here, frozen into a GraphDef, retrained on, and
built with the default int8, as a user with a foreign TF for Poets graph builds it
(docs/ARCHITECTURE.md, "Quantization: diagnosis and repair").

Random weights are no guide to quantization (a random MobileNet amplifies every rounding error),
and ImageNet weights cannot be downloaded here. So a MobileNet v2 0.35 at 96 px is trained from
its seeded start on sample photos of another seed for :data:`EPOCHS` epochs (about 20 s here),
its pooled features are frozen into a ``.pb`` (image input ``input``), and ``toolchain build
--weights model.pb`` retrains a head on new photos and writes full-integer TFLite (the default)
and Core ML int8. What the issue asks of such a build: each quantized family gives an artifact
that passes verification at 0.98 within its size budget, or the build says exactly why not;
the tuning set never touches a testing image.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARCHITECTURE = "mobilenet_v2_0.35_96"
EPOCHS = 8
PER_CLASS = 40


def _train_and_freeze(folder: Path) -> tuple[Path, str]:
    """The trained backbone as a frozen graph, and its bottleneck tensor's name."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from toolchain import backbones
    from toolchain.dataset import scan
    from toolchain.images import load_rgb
    from toolchain.sample_photos import write_sample_data

    spec = backbones.get(ARCHITECTURE)
    photos = folder / "pretraining"
    write_sample_data(photos, per_class=PER_CLASS, seed=7)
    data = scan(photos)
    labels = list(data.labels)
    pixels = np.stack([load_rgb(entry.path, spec.input_size) for entry in data.entries])
    truth = np.array([labels.index(entry.label) for entry in data.entries])
    backbone = spec.build(seed=0)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([backbone, tf.keras.layers.Dense(len(labels),
                                                                 activation="softmax")])
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy")
    model.fit(spec.preprocessing.apply(pixels), truth, batch_size=32, epochs=EPOCHS, verbose=0)
    size = spec.input_size
    serve = tf.function(lambda image: backbone(image, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(serve)
    path = folder / "trained_backbone.pb"
    path.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return path, frozen.outputs[0].name.split(":")[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``toolchain build`` on the frozen trained backbone: (exit code, stdout, out dir)."""
    from toolchain import cli
    from toolchain.sample_photos import write_sample_data

    root = tmp_path_factory.mktemp("trained-backbone")
    graph, bottleneck = _train_and_freeze(root)
    photos = root / "photos"
    write_sample_data(photos, per_class=PER_CLASS, seed=0)
    out_dir = root / "out"
    text = io.StringIO()
    with redirect_stdout(text):
        code = cli.main(["build", "--image-dir", str(photos), "--weights", str(graph),
                         "--bottleneck-tensor", bottleneck, "--input-tensor", "input",
                         "--bottleneck-dir", str(root / "cache"), "--output-dir", str(out_dir),
                         "--target", "tflite", "--target", "coreml",
                         "--coreml-precision", "int8", "--accept-small-set"])
    return code, text.getvalue(), out_dir


def _report(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("plain, runtime", [("model_int8.tflite", "tflite-interpreter"),
                                            ("model_int8.mlmodel", "coreml-numpy")])
def test_default_int8_passes_or_says_exactly_why(built, plain, runtime):
    code, out, out_dir = built
    report = _report(out_dir)
    record = report["quantization"][plain]
    assert record["precision"] == "int8" and record["tuning_from"]["validation"] > 0
    mixed = record["repaired_artifact"]
    rows = {entry["path"].rsplit("/", 1)[-1]: entry for entry in report["artifacts"]
            if entry["runtime"] == runtime}
    assert plain in rows and (mixed is None or mixed in rows), sorted(rows)
    passing = [name for name, entry in rows.items() if entry["status"] == "passed"]
    if mixed is not None:  # within the budget, by the record and on disk
        from targets import artifact_bytes
        from targets._repair import chosen

        kept = chosen(record["steps"])
        assert kept["bytes"] <= record["budget_bytes"]
        assert artifact_bytes(out_dir / mixed) <= record["budget_bytes"]
        assert kept["top1_agreement"] >= record["target_top1_agreement"]
    if not passing:  # then the build says why, in its output and in the report
        assert code == 1
        (why,) = [line for line in report["warnings"] if line.startswith(f"{plain}: ")]
        assert f"{record['int8']['top1_agreement']:.4f} of {record['tuning_images']} tuning " \
               "images" in why
        if mixed is not None:
            assert f"-> {mixed}, which still fails on the held-out images" in why
        elif record["needed"]:
            assert why.endswith(f"not repaired: {record['reason']}") and record["reason"]
        else:
            assert "tuning images cannot promise" in why
        assert f"warning: {why}" in out
    else:  # a note only when the plain model failed here, saying the repaired one passes
        notes = [line for line in report["warnings"] if line.startswith(f"{plain}: ")]
        assert len(notes) == (rows[plain]["status"] == "failed"), notes
        assert all(line.endswith(f"-> {mixed}, which passes") for line in notes), notes


def test_no_testing_image_tunes_either_family(built):
    _, _, out_dir = built
    split = json.loads((out_dir / "model" / "split.json").read_text(encoding="utf-8"))
    root, testing = Path(split["image_dir"]), set(split["sets"]["testing"])
    validation = set(split["sets"]["validation"])
    records = _report(out_dir)["quantization"].values()
    assert testing and len(records) == 2
    for record in records:
        tuned = {Path(path).relative_to(root).as_posix() for path in record["tuning"]}
        assert tuned and not tuned & testing
        assert len(tuned & validation) == record["tuning_from"]["validation"] > 0


def test_the_repaired_int8_holds_on_photos_ten_times_its_tuning_set(built, tmp_path):
    """The repair decided on the validation split alone (29 images here, too few to show 0.98):
    so it aimed at none disagreeing, then spent its size budget on float layers. On 300 other
    photos, over ten times its tuning set and never seen by it, the repaired int8 Core ML model
    still agrees with the original on the verifier's int8 threshold (measured on 600 such
    photos: 0.9950, where the first repaired candidate, 3 layers in float, gave 0.9617).

    Full-integer TFLite cannot get there through a uint8 input: the preprocessing's mean of
    127.5 puts every raw pixel half a step off, which alone changed 25 of 600 decisions, and its
    repair agreed on 0.9517 of 600 such photos. Its repaired model takes a float input instead
    (measured: 0.9767 of those 600; 0.9792 and 0.9850 of 1200 photos each of two seeds drawn
    after the change was designed), so it is held here to clearly better than the uint8 one,
    not to 0.98: 300 photos cannot tell 0.985 from 0.98."""
    from targets._tflite_repair import FLOAT_INPUT
    from toolchain import cli
    from toolchain.sample_photos import write_sample_data

    _, _, out_dir = built
    records = _report(out_dir)["quantization"]
    for record in records.values():
        assert record["aim_top1_agreement"] == 1.0 and record["tuning_images"] < 100
        assert record["tuning_shows"].startswith(
            f"{record['tuning_images']} tuning images cannot show 0.98")
    mixed = {plain: record["repaired_artifact"] for plain, record in records.items()}
    assert mixed == {"model_int8.mlmodel": "model_int8_mixed.mlmodel",
                     "model_int8.tflite": "model_int8_mixed.tflite"}, records
    assert records["model_int8.tflite"]["float_layers"][0] == FLOAT_INPUT
    others = tmp_path / "others"
    write_sample_data(others, per_class=50, seed=23)  # not the seed the repair was designed on
    text = io.StringIO()
    with redirect_stdout(text):
        code = cli.main(["verify", "--model", str(out_dir), "--images", str(others),
                         "--artifact", *(str(out_dir / name) for name in mixed.values()),
                         "--report-dir", str(tmp_path / "reports"), "--quiet"])
    report = json.loads((tmp_path / "reports" / "report.json").read_text(encoding="utf-8"))
    assert report["held_out_images"] == 300 >= 10 * records["model_int8.tflite"]["tuning_images"]
    rows = {(Path(row["path"]).name, row["runtime"]): row for row in report["artifacts"]}
    row = rows["model_int8_mixed.mlmodel", "coreml-numpy"]
    assert row["top1_agreement"] >= 0.98, text.getvalue()
    assert row["status"] == "passed", row["reason"]  # 300 images can show 0.98
    for runtime in ("tflite-interpreter", "mediapipe-tasks"):  # as the Android app runs it
        assert rows["model_int8_mixed.tflite", runtime]["top1_agreement"] >= 0.965, \
            text.getvalue()
    assert code == (0 if report["verdict"] == "passed" else 1), report["verdict"]
