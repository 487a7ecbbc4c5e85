"""The verifier's reports (``toolchain.report``): every section, byte for byte.

The reports are what a pull request, a CI summary and a JUnit reader show, so a change in any
section must be seen. Two fixed synthetic reports (built from ``Report``/``Check`` objects with
fixed numbers, no model) are written and compared with golden files in ``golden/``: ``mixed``
has a passed, a failed, a skipped and a crashed check, a failed check with more disagreements
than report.md lists ("…and N more"), a label containing ``|``, unreadable held-out images, and
thresholds with and without a max diff; ``passed`` is a run where everything passed;
``unlabelled`` is a frozen-graph original on a folder without labels, with a full-size row, a
set too small for its thresholds (warnings) and below ``min_images`` (a failure of the run).

When a change to a report is meant, regenerate the golden files with ``UPDATE_GOLDEN=1`` (the
test then fails, saying so, so that a regeneration is never silent) and review their diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from toolchain import report as report_io
from toolchain.statistics import wilson
from toolchain.verification import (
    FAILED,
    FULL_SIZE,
    MEASURED,
    PASSED,
    REPORT_SCHEMA_VERSION,
    SKIPPED,
    Check,
    Report,
    Threshold,
    VerifyOptions,
    confusion_matrix,
)

GOLDEN = Path(__file__).parent / "golden"
FILES = (report_io.MARKDOWN, report_io.JSON, report_io.JUNIT)
#: A label with the table separator in it: report.md must escape it.
LABELS = ("cat", "dog", "a|b")
#: 24 held-out images, 8 per class (rows of ``_truth``).
IMAGES = tuple(f"{label}/photo {index:02d}.jpg" for label in LABELS for index in range(8))
#: Thresholds with a max diff (float32's default, a float16 one set by hand) and without.
FLOAT32 = Threshold(top1_agreement=0.999, max_abs_diff=1e-3)
FLOAT16 = Threshold(top1_agreement=0.995, max_abs_diff=0.01)
INT8 = Threshold(top1_agreement=0.98)
#: What the verifier uses when an artifact's precision cannot be read.
UNKNOWN = Threshold(top1_agreement=1.0)


def _truth() -> np.ndarray:
    return np.repeat(np.arange(3), 8)


def _original() -> np.ndarray:
    """The original model: 0.75 on its guess, 0.125 elsewhere; every fourth image misclassified
    (accuracy 18/24 = 0.75). Binary fractions, so every figure prints exactly."""
    truth = _truth()
    guess = np.where(np.arange(24) % 4 == 3, (truth + 1) % 3, truth)
    probabilities = np.full((24, 3), 0.125, np.float32)
    probabilities[np.arange(24), guess] = 0.75
    return probabilities


def _disagreement(index: int, artifact: int) -> dict:
    original = _original()
    ours = int(original[index].argmax())
    return {"image": IMAGES[index], "label": LABELS[_truth()[index]],
            "original": LABELS[ours], "original_score": float(original[index, ours]),
            "artifact": LABELS[artifact], "artifact_score": 0.5}


def _passed_check() -> Check:
    return Check("tflite", Path("out/model_float32.tflite"), "tflite-interpreter", "float32",
                 FLOAT32, status=PASSED, top1_agreement=1.0,
                 max_abs_diff=2.384185791015625e-07, mean_abs_diff=5.960464477539063e-08,
                 accuracy=0.75, per_class_agreement={label: 1.0 for label in LABELS},
                 confusion=confusion_matrix(_truth(), _original().argmax(1), 3), seconds=0.25,
                 shown="model_float32.tflite", images=24,
                 top1_agreement_interval=wilson(24, 24), accuracy_interval=wilson(18, 24))


def _mixed() -> Report:
    # 12 disagreements (cat 4, dog 6, a|b 2), more than report.md lists.
    many = [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 16, 17]
    int8 = Check("tflite", Path("out/model_int8.tflite"), "tflite-task-library", "int8",
                 INT8, status=FAILED, reason="top-1 agreement 0.5000 < 0.98",
                 top1_agreement=0.5, max_abs_diff=0.625, mean_abs_diff=0.1875, accuracy=0.375,
                 per_class_agreement={"cat": 0.5, "dog": 0.25, "a|b": 0.75},
                 disagreements=[_disagreement(i, (int(_original()[i].argmax()) + 2) % 3)
                                for i in many],
                 confusion=np.array([[3, 2, 3], [2, 2, 4], [1, 1, 6]]), seconds=1.5,
                 shown="model_int8.tflite", images=24, top1_agreement_interval=wilson(12, 24),
                 accuracy_interval=wilson(9, 24))
    float16 = Check("coreml", Path("out/model_float16.mlpackage"), "coreml-numpy", "float16",
                    FLOAT16, status=FAILED,
                    reason="top-1 agreement 0.9583 < 0.995; max abs diff 3.12e-02 > 0.01",
                    top1_agreement=0.9583333333333334, max_abs_diff=0.03125,
                    mean_abs_diff=0.00390625, accuracy=0.75,
                    per_class_agreement={"cat": 1.0, "dog": 1.0, "a|b": 0.875},
                    disagreements=[_disagreement(17, 0)],
                    confusion=np.array([[6, 2, 0], [0, 6, 2], [3, 0, 5]]), seconds=2.0,
                    shown="model_float16.mlpackage", images=24,
                    top1_agreement_interval=wilson(23, 24), accuracy_interval=wilson(18, 24))
    skipped = Check("coreml", Path("out/model_float32.mlmodel"), "none", "float32",
                    FLOAT32, status=SKIPPED,
                    reason="no runtime on this machine can run .mlmodel models",
                    shown="model_float32.mlmodel")
    crashed = Check("tflite", Path("out/broken.tflite"), "none", "unknown", UNKNOWN,
                    status=FAILED, reason="its runtime crashed the process (SIGSEGV)",
                    shown="broken.tflite")
    return Report(Path("out/model"), "mobilenet_v3_small_96", LABELS, Path("photos"), IMAGES,
                  _truth(), _original(), [_passed_check(), int8, float16, skipped, crashed],
                  VerifyOptions(allow_skip=True),
                  unreadable=(("cat/broken.jpg", "corrupt or truncated image"),
                              ("a|b/empty.jpg", "empty file (0 bytes)")),
                  quantization={"model_int8.tflite": _not_repaired()},
                  files=_files("out/model_float32.tflite", "out/model_int8.tflite",
                               "out/model_float16.mlpackage", "out/model_float32.mlmodel",
                               "out/broken.tflite"))


def _files(*paths: str) -> dict[str, tuple[str, int]]:
    """Each artifact's (digest, size) as the verifier records them: fixed made-up values."""
    return {path: (f"{index:x}" * 64, 1000 * (index + 1)) for index, path in enumerate(paths)}


def _layer(index: int, harm: float) -> dict:
    return {"name": f"net/block_{index}/Conv2D;net/block_{index}/Relu6", "op": "CONV_2D",
            "rmse_per_step": 0.25 + index / 8, "harm": harm}


def _not_repaired() -> dict:
    """A repair record (targets/_tflite_repair.py) that stopped at its size budget, with more
    layers than report.md lists and a layer name with the table separator in it."""
    layers = [_layer(index, 0.5 / (index + 1)) for index in range(12)]
    layers[3]["name"] = "net/a|b/Add"
    steps = [{"float_layers": 1, "layer": layers[0]["name"], "kept": True,
              "top1_agreement": 0.625, "mean_distance": 0.25, "max_abs_diff": 0.5,
              "bytes": 1250000}]
    return {"artifact": "model_int8.tflite", "repaired_artifact": None, "tuning_images": 32,
            "tuning": [f"cat/train {index}.jpg" for index in range(32)],
            "tuning_from": {"validation": 24, "training": 8, "calibration": 0},
            "target_top1_agreement": 0.98, "aim_top1_agreement": 1.0,
            "tuning_shows": "32 tuning images cannot show 0.98 (100 would allow two "
                            "disagreements), so the repair aimed at none of them disagreeing; "
                            "the verifier's held-out images decide",
            "float32_bytes": 4000000, "budget_bytes": 2000000,
            "int8": {"float_layers": 0, "layer": "", "top1_agreement": 0.5,
                     "max_abs_diff": 0.75, "bytes": 1000000},
            "needed": True, "repaired": False, "float_layers": [],
            "reason": "12 layer(s) tried in float one at a time, 1 kept (each made it agree "
                      "better), 11 passed over: each would have taken the model over the "
                      "budget of 0.50 of float32's size; the best agreed on 0.6250 of 32 "
                      "tuning images (aiming at no disagreement (32 tuning images cannot "
                      "show 0.98))",
            "layers": layers, "steps": steps}


def _passed() -> Report:
    return Report(Path("out/model"), "mobilenet_v3_small_96", LABELS, Path("photos"), IMAGES,
                  _truth(), _original(), [_passed_check()], VerifyOptions(accept_small_set=True),
                  files=_files("out/model_float32.tflite"))


#: What ``Original.record()`` gives for a frozen graph (retrain.py's normalisation).
GRAPH = {"kind": "frozen-graph", "path": "old/retrained_graph.pb",
         "architecture": "frozen graph retrained_graph.pb", "input_size": 224,
         "preprocessing": {"mean": [127.5] * 3, "std": [127.5] * 3, "scale": 1 / 127.5,
                           "offset": [-1.0] * 3},
         "preprocessing_source": "--input-mean 127.5 --input-std 127.5"}


def _unlabelled() -> Report:
    """A frozen graph checked on a folder of unlabelled photos: rows are the original's
    predictions; a judged full-size row disagrees on one image, and so does a measured one (not
    judged: a run without --full-size-agreement); 24 < --min-images 30."""
    guesses = _original().argmax(1)
    same = Check("tflite", Path("old/model_float32.tflite"), "tflite-task-library", "float32",
                 FLOAT32, status=PASSED, top1_agreement=1.0, max_abs_diff=1.1920928955078125e-07,
                 mean_abs_diff=2.9802322387695312e-08,
                 per_class_agreement={label: 1.0 for label in LABELS},
                 confusion=confusion_matrix(guesses, guesses, 3), seconds=0.5,
                 shown="model_float32.tflite", images=24,
                 top1_agreement_interval=wilson(24, 24))
    moved = guesses.copy()
    moved[5] = (moved[5] + 1) % 3
    full = Check("tflite", Path("old/model_float32.tflite"), "tflite-task-library-full-size",
                 "float32", Threshold(top1_agreement=0.999), status=FAILED,
                 reason="top-1 agreement 0.9583 < 0.999", top1_agreement=0.9583333333333334,
                 max_abs_diff=0.5, mean_abs_diff=0.03125,
                 per_class_agreement={"cat": 0.875, "dog": 1.0, "a|b": 1.0},
                 disagreements=[{"image": "IMG_0005.jpg", "label": None, "original": "cat",
                                 "original_score": 0.75, "artifact": "dog",
                                 "artifact_score": 0.5}],
                 confusion=confusion_matrix(guesses, moved, 3), seconds=0.75,
                 shown="model_float32.tflite", images=24,
                 top1_agreement_interval=wilson(23, 24), input=FULL_SIZE)
    measured = Check("tflite", Path("old/model_float16.tflite"), "tflite-task-library-full-size",
                     "float16", Threshold(top1_agreement=0.995), status=MEASURED,
                     reason="below the float16 agreement threshold 0.995: the app's resize "
                            "changes predictions our resize does not; not judged "
                            "(--full-size-agreement judges it)",
                     top1_agreement=0.9583333333333334, max_abs_diff=0.5,
                     mean_abs_diff=0.03125,
                     per_class_agreement={"cat": 0.875, "dog": 1.0, "a|b": 1.0},
                     disagreements=full.disagreements, confusion=full.confusion, seconds=0.75,
                     shown="model_float16.tflite", images=24,
                     top1_agreement_interval=wilson(23, 24), input=FULL_SIZE)
    photos = tuple(f"IMG_{index:04d}.jpg" for index in range(24))
    return Report(Path("old/retrained_graph.pb"), "frozen graph retrained_graph.pb", LABELS,
                  Path("photos"), photos, None, _original(), [same, full, measured],
                  VerifyOptions(min_images=30, full_size_agreement=0.999), original_model=GRAPH,
                  held_out_from="folder",
                  unlabelled_because="24 image(s) are not in a class folder (e.g. IMG_0000.jpg)",
                  files=_files("old/model_float32.tflite", "old/model_float16.tflite"))


REPORTS = {"mixed": _mixed, "passed": _passed, "unlabelled": _unlabelled}


def _written(report: Report, folder: Path) -> dict[str, bytes]:
    written = report_io.write(report, folder)
    assert written == {"json": folder / report_io.JSON, "markdown": folder / report_io.MARKDOWN,
                       "junit": folder / report_io.JUNIT,
                       "confusion": folder / report_io.CONFUSION_DIR}
    return {name: (folder / name).read_bytes() for name in FILES}


@pytest.mark.parametrize("case", sorted(REPORTS))
def test_reports_match_their_golden_files(case, tmp_path):
    """report.md, report.json and junit.xml as written, byte for byte; markdown(), junit() and
    record() are what was written."""
    report = REPORTS[case]()
    produced = _written(report, tmp_path)
    assert produced[report_io.MARKDOWN] == report_io.markdown(report).encode("utf-8")
    assert produced[report_io.JUNIT] == report_io.junit(report)
    record = json.loads(produced[report_io.JSON])
    assert set(record.pop("confusion_png")) == ({"original"} if report.labelled else set()) | {
        check.name for check in report.checks if check.confusion is not None}
    assert record == json.loads(json.dumps(report.record()))
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in produced.items():
            (folder / name).write_bytes(data)
        pytest.fail(f"UPDATE_GOLDEN=1: regenerated {', '.join(FILES)} in {folder}; review the "
                    "diff, then run again without UPDATE_GOLDEN")
    for name, data in produced.items():
        golden = folder / name
        assert golden.is_file(), f"{golden} is missing: generate it with UPDATE_GOLDEN=1"
        assert data.decode("utf-8") == golden.read_text(encoding="utf-8"), (
            f"{name} differs from {golden}; if the change is meant, regenerate with "
            "UPDATE_GOLDEN=1 and review the diff")


def test_report_json_carries_its_schema_version():
    assert REPORT_SCHEMA_VERSION == 3
    record = _mixed().record()
    assert record["schema_version"] == 3 and next(iter(record)) == "schema_version"


def test_markdown_sections():
    """What the golden file holds, said in words: a reader of a failed run sees these."""
    text = report_io.markdown(_mixed())
    assert text.startswith("# Verification: ❌ FAILED\n")
    assert ("**24 held-out images** from `photos` (its recorded testing split); original "
            "accuracy 0.7500 (95% CI 0.55–0.88, n=24).") in text
    # Every agreement beside its interval and the number of images.
    assert "| 0.5000 (95% CI 0.31–0.69, n=24) | ≥ 0.98 |" in text
    assert ("⚠️ 24 images are too few for the agreement threshold 0.98 (int8): it allows 0 "
            "disagreement(s) (one in 24 is 0.9583); 100 images would allow two.") in text
    assert ("2 held-out image(s) could not be read and were left out: `cat/broken.jpg`, "
            "`a|b/empty.jpg`") in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    # 5 checks; 10 int8 layers; 10 disagreements of the int8, 1 of the float16.
    assert len(rows) == 5 + 10 + 10 + 1
    # Every | inside a cell is escaped: each row has exactly its columns' separators.
    separators = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
    assert separators == [10] * 5 + [6] * 10 + [5] * 11, separators
    # The int8 artifact's quantization: tuning figures, why it was not repaired, its layers.
    assert "## Quantization: `model_int8.tflite`" in text
    assert ("int8 agreed with the original on 0.5000 of 32 tuning images (24 validation, 8 "
            "training; never a testing image; target 0.98), 1.00 MB.") in text
    assert "Not repaired: 12 layer(s) tried in float one at a time, 1 kept" in text
    assert rows[5] == "| `net/block_0/Conv2D` | CONV_2D | 0.5000 | 0.250 |  |"
    assert rows[8].startswith("| `net/a\\|b/Add` |")
    assert "\n…and 2 more layers in report.json.\n" in text
    assert "| ≥ 0.999, diff ≤ 0.001 |" in rows[0] and "| ≥ 0.98 |" in rows[1]
    assert rows[3].endswith("| ⚠️ skipped: no runtime on this machine can run .mlmodel models |")
    assert "| — | ≥ 1 | — | — | — | ❌ failed: its runtime crashed the process (SIGSEGV) |" \
        in rows[4]
    assert "## model_int8.tflite [tflite-task-library]: 12 disagreement(s)" in text
    assert "\n…and 2 more in report.json.\n" in text
    assert "## model_float16.mlpackage [coreml-numpy]: 1 disagreement(s)" in text
    assert "| `a\\|b/photo 01.jpg` | a\\|b | a\\|b (0.750) | cat (0.500) |" in text
    assert report_io.markdown(_passed()).startswith("# Verification: ✅ passed\n")
    assert "could not be read" not in report_io.markdown(_passed())


def test_a_repaired_int8_says_where_the_repaired_model_is():
    found = {**_not_repaired(), "repaired": True, "reason": "",
             "repaired_artifact": "model_int8_mixed.tflite"}
    found["float_layers"] = [found["layers"][0]["name"]]
    report = _passed()
    report.quantization["model_int8.tflite"] = found
    text = report_io.markdown(report)
    assert ("Repaired: 1 layer(s) kept in float → `model_int8_mixed.tflite`, 0.6250 on the "
            "tuning images, 1.25 MB (0.31 of float32).") in text
    rows = [line for line in text.splitlines() if line.startswith("| `net/")]
    assert rows[0].endswith("| yes |") and not rows[1].endswith("| yes |")
    assert report.record()["quantization"] == {"model_int8.tflite": found}


def test_a_repair_by_a_run_from_the_input_says_so_and_names_the_kept_step():
    """A full-integer repair whose kept step is a run of 3 from the input, measured before a
    shorter run (of 2) that did not meet the target: report.md quotes the kept one."""
    run = {"float_layers": 3, "layer": "net/block_2/Conv2D", "trial": "run", "kept": True,
           "top1_agreement": 1.0, "mean_distance": 0.125, "max_abs_diff": 0.25,
           "bytes": 1010000}
    shorter = {**run, "float_layers": 2, "layer": "net/block_1/Conv2D", "kept": False,
               "top1_agreement": 0.75, "bytes": 1005000}
    found = {**_not_repaired(), "repaired": True, "reason": "",
             "repaired_artifact": "model_int8_mixed.tflite", "float_run": 3,
             "float_layers": ["net/block_0/Conv2D", "net/block_1/Conv2D", "net/block_2/Conv2D"],
             "steps": [run, shorter]}
    report = _passed()
    report.quantization["model_int8.tflite"] = found
    text = report_io.markdown(report)
    assert ("Repaired: 3 layer(s) kept in float (the first 3 from the input) → "
            "`model_int8_mixed.tflite`, 1.0000 on the tuning images, 1.01 MB (0.25 of "
            "float32).") in text
    assert ("Runs of float layers from the input, as tried (layers: agreement on the tuning "
            "images, share of float32's size): 3: 1.0000, 0.25, 2: 0.7500, 0.25.") in text
    assert "Runs of float layers" not in report_io.markdown(_mixed())  # none tried there


def test_junit_cases_failures_and_skips():
    suite = ET.fromstring(report_io.junit(_mixed()))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"),
            suite.get("errors"), suite.get("time")) == ("5", "3", "1", "0", "3.750")
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    notes = {name: value for name, value in properties.items() if name.startswith("note_")}
    assert {name: value for name, value in properties.items() if name not in notes} == {
        "verdict": "failed", "held_out_images": "24", "architecture": "mobilenet_v3_small_96",
        "original_accuracy": "0.7500"}
    assert list(notes.values()) == _mixed().warnings and len(notes) == 4
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [
        "model_float32.tflite [tflite-interpreter]", "model_int8.tflite [tflite-task-library]",
        "model_float16.mlpackage [coreml-numpy]", "model_float32.mlmodel [none]",
        "broken.tflite [none]"]
    assert [case.get("classname") for case in cases] == [
        "verify.tflite", "verify.tflite", "verify.coreml", "verify.coreml", "verify.tflite"]
    assert [child.tag for case in cases for child in case] == [
        "system-out", "failure", "failure", "skipped", "failure"]
    assert cases[3].find("skipped").get("message") == (
        "no runtime on this machine can run .mlmodel models")
    failure = cases[1].find("failure")
    assert failure.get("message") == "top-1 agreement 0.5000 (95% CI 0.31–0.69, n=24) < 0.98"
    assert failure.text.count("disagrees on ") == 12  # JUnit lists every one


def test_write_writes_every_file_and_the_confusion_pngs(tmp_path):
    from PIL import Image

    report = _mixed()
    _written(report, tmp_path)
    pngs = sorted(p.name for p in (tmp_path / report_io.CONFUSION_DIR).iterdir())
    # The original's, and one per check that has numbers (the skipped and crashed have none).
    assert pngs == ["01-model_float32.tflite_tflite-interpreter.png",
                    "02-model_int8.tflite_tflite-task-library.png",
                    "03-model_float16.mlpackage_coreml-numpy.png", "original.png"]
    mapping = json.loads((tmp_path / report_io.JSON).read_text(encoding="utf-8"))["confusion_png"]
    assert sorted(mapping.values()) == [f"{report_io.CONFUSION_DIR}/{name}" for name in pngs]
    assert mapping["original"] == f"{report_io.CONFUSION_DIR}/original.png"
    for name in pngs:
        with Image.open(tmp_path / report_io.CONFUSION_DIR / name) as image:
            assert image.format == "PNG" and image.width >= 3 * 36 and image.height >= 3 * 36
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*FILES, report_io.CONFUSION_DIR])  # and nothing else: no temporary file left


def test_an_unlabelled_run_says_so_and_fails_below_min_images():
    report = _unlabelled()
    assert report.failures == ["24 held-out images, fewer than --min-images 30"]
    assert not report.passed and report.exit_code == 1
    text = report_io.markdown(report)
    assert "unlabelled (24 image(s) are not in a class folder (e.g. IMG_0000.jpg))" in text
    assert ("Original: frozen-graph `old/retrained_graph.pb`, input 224 px, mean 127.5, std "
            "127.5 (from --input-mean 127.5 --input-std 127.5).") in text
    assert "❌ 24 held-out images, fewer than --min-images 30." in text
    rows = [line for line in text.splitlines() if line.startswith("| `model")]
    assert rows[1].startswith("| `model_float32.tflite` | tflite-task-library-full-size | "
                              "float32 | 0.9583 (95% CI 0.80–0.99, n=24) | ≥ 0.999 |")
    assert all("| n/a |" in row for row in rows)  # no accuracy without labels
    assert rows[2].endswith("| ℹ️ measured: below the float16 agreement threshold 0.995: the "
                            "app's resize changes predictions our resize does not; not judged "
                            "(--full-size-agreement judges it) |")
    assert "| `IMG_0005.jpg` | — | cat (0.750) | dog (0.500) |" in text
    record = report.record()
    assert (record["labelled"], record["held_out_from"]) == (False, "folder")
    assert record["confusion_rows"] == "original's prediction"
    assert record["original"]["accuracy"] is None and record["original"]["kind"] == "frozen-graph"
    assert record["original"]["confusion_matrix"] is None
    assert record["artifacts"][1]["input"] == "full-size"
    assert record["artifacts"][1]["threshold"] == {"top1_agreement": 0.999, "max_abs_diff": None}
    properties = {p.get("name"): p.get("value")
                  for p in ET.fromstring(report_io.junit(report)).find("properties")}
    assert properties["original_accuracy"] == "n/a"
    assert properties["note_1"] == "24 held-out images, fewer than --min-images 30"


def test_a_failed_quantized_artifact_gets_one_line_on_why_its_tuning_did_not_hold():
    """Repaired on the tuning images yet failing here, or not needing repair there yet failing
    here: either way the warning names the tuning figure and why it was no promise; an
    artifact that passed gets no line."""
    report = _mixed()
    repaired = {**_not_repaired(), "repaired_artifact": "model_int8_mixed.tflite",
                "repaired": True, "reason": "",
                "steps": [{**_not_repaired()["steps"][0], "top1_agreement": 1.0}]}
    mixed = dataclasses.replace(report.checks[1], path=Path("out/model_int8_mixed.tflite"),
                                shown="model_int8_mixed.tflite")
    report.checks.append(mixed)
    report.quantization = {"model_int8.tflite": repaired}
    (line,) = [w for w in report.warnings if w.startswith("model_int8.tflite: ")]
    assert line == ("model_int8.tflite: int8 agreed with the original on 0.5000 of 32 tuning "
                    "images; with 1 layer(s) kept in float, 1.0000 -> model_int8_mixed.tflite, "
                    "which still fails on the held-out images: 32 tuning images cannot promise "
                    "0.98 on others; more validation images (--validation-percentage) make a "
                    "better yardstick")
    report.checks.pop()
    agreed = {**_not_repaired(), "needed": False, "reason": "", "steps": [],
              "int8": {**_not_repaired()["int8"], "top1_agreement": 1.0}}
    report.quantization = {"model_int8.tflite": agreed}
    (line,) = [w for w in report.warnings if w.startswith("model_int8.tflite: ")]
    assert line.startswith("model_int8.tflite: int8 agreed with the original on 1.0000 of 32 "
                           "tuning images (target 0.98), so it was not repaired; 32 tuning "
                           "images cannot promise 0.98 on others")
    report.checks[1].status = PASSED
    assert not [w for w in report.warnings if w.startswith("model_int8.tflite: ")]
