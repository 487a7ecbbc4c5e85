"""The command line: aliases, one-line errors, and each command end to end on tiny models."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers import TINY_ARCH
from toolchain import cli
from toolchain.cli import main


def test_retrain_py_underscore_spellings_are_aliases():
    argv = ["retrain", "--image_dir=photos", "--how_many_training_steps", "5",
            "--bottleneck_dir", "c", "--output_graph=g.pb", "--output-dir", "o", "--", "--x_y"]
    normal = cli._normalize(argv)
    assert normal == ["retrain", "--image-dir=photos", "--how-many-training-steps", "5",
                      "--bottleneck-dir", "c", "--output-graph=g.pb", "--output-dir", "o", "--",
                      "--x_y"]
    args = cli.build_parser().parse_args(normal[:-2])
    assert (str(args.image_dir), args.how_many_training_steps, str(args.output_graph)) == \
        ("photos", 5, "g.pb")
    assert cli._normalize(["--image-dir", "my_photos"]) == ["--image-dir", "my_photos"]


def test_help_is_instant_and_imports_no_heavy_library():
    code = ("import sys, contextlib, io\nfrom toolchain import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--help'])\n"
            "print(sorted(m for m in ('tensorflow', 'coremltools', 'tflite_support', 'PIL')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("toolchain: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return err


def test_errors_are_one_line_with_a_hint(tmp_path, capsys, sample_dir):
    err = _one_line_error(capsys, ["retrain", "--image-dir", str(tmp_path / "absent"),
                                   "--output-dir", str(tmp_path / "o")])
    assert "does not exist" in err and "hint:" in err
    err = _one_line_error(capsys, ["bottlenecks", "--image-dir", str(sample_dir),
                                   "--architecture", "mobilenet_9_224"])
    assert "unknown architecture" in err and "mobilenet_0.50_224" in err
    err = _one_line_error(capsys, ["bottlenecks", "--image-dir", str(sample_dir),
                                   "--weights", str(tmp_path / "w.h5")])
    assert "w.h5" in err
    err = _one_line_error(capsys, ["retrain", "--image-dir", str(sample_dir), "--output-dir",
                                   str(tmp_path / "o"), "--testing-percentage", "95"])
    assert "percentages" in err or "testing" in err
    err = _one_line_error(capsys, ["label", "--model", str(tmp_path), "--image", "x.jpg"])
    assert "no retrained model" in err


def test_debug_shows_the_traceback(tmp_path):
    from toolchain.errors import DatasetError

    with pytest.raises(DatasetError):
        main(["--debug", "bottlenecks", "--image-dir", str(tmp_path / "absent")])


def test_interrupt_is_one_line(monkeypatch, capsys):
    from toolchain import commands

    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "label", (commands.LabelCommand, interrupted))
    assert main(["label", "--model", "m", "--image", "i"]) == 130
    assert "interrupted" in capsys.readouterr().err


def _label_running(monkeypatch, run) -> None:
    from toolchain import commands

    monkeypatch.setitem(commands.COMMANDS, "label", (commands.LabelCommand, run))


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, as in a terminal. A job that a non-interactive shell starts
    in the background ignores SIGINT, and Python then installs no handler (nor does the CLI:
    seen when the suite ran that way)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_tensorflow_turned_into_its_own_error_is_still_an_interrupt(
        monkeypatch, capsys, python_ctrl_c):
    """TensorFlow's C code replaces an exception raised in a call back into Python with its own
    (seen: a TypeError from the EagerTensor constructor); a real SIGINT arrives here that way."""

    def swallowed(options):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise TypeError("Expected `context` argument in EagerTensor constructor") from None

    _label_running(monkeypatch, swallowed)
    assert main(["label", "--model", "m", "--image", "i"]) == 130
    out, err = capsys.readouterr()
    assert err == "toolchain: interrupted; everything written so far is complete and kept\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_without_a_ctrl_c_an_unknown_error_keeps_its_traceback(monkeypatch):
    def broken(options):
        raise TypeError("a bug")

    _label_running(monkeypatch, broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["label", "--model", "m", "--image", "i"])


def test_sample_data_command(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "s"), "--per-class", "3"]) == 0
    assert "wrote 18 images in 6 classes" in capsys.readouterr().out
    assert main(["sample-data", str(tmp_path / "s"), "--per-class", "3"]) == 0
    assert "already up to date" in capsys.readouterr().out


def _messy_copy(sample_dir, tmp_path):
    """The sample data plus the junk a real photo folder holds."""
    data = tmp_path / "messy"
    shutil.copytree(sample_dir, data)
    (data / "forest" / "zero.jpg").write_bytes(b"")
    (data / "ocean" / "notes.jpg").write_text("not a picture")
    good = next((data / "desert").glob("*.jpg")).read_bytes()
    (data / "desert" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (data / "empty class").mkdir()
    (data / "README.txt").write_text("stray file")
    return data


def test_retrain_command_on_messy_data(tmp_path, sample_dir, session_cache, capsys):
    data = _messy_copy(sample_dir, tmp_path)
    out = tmp_path / "out"
    code = main(["retrain", "--image_dir", str(data), "--architecture", TINY_ARCH,
                 "--weights", "none", "--bottleneck_dir", str(session_cache),
                 "--output_dir", str(out), "--how_many_training_steps", "60",
                 "--print_misclassified_test_images", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    for name in ("zero.jpg", "notes.jpg", "cut.jpg", "README.txt"):
        assert name in captured.err, name  # a warning names each skipped file
    assert "empty class" in captured.err
    skipped = {item["path"] for item in json.loads((out / "split.json").read_text())["skipped"]}
    assert {str(data / "forest" / "zero.jpg"), str(data / "ocean" / "notes.jpg"),
            str(data / "desert" / "cut.jpg"), str(data / "README.txt")} <= skipped
    assert "skipped 4 file(s)" in captured.out
    assert "final test accuracy" in captured.out
    labels = (out / "labels.txt").read_text().splitlines()
    assert "empty class" not in labels and len(labels) == 6
    misclassified = [line for line in captured.out.splitlines() if line.startswith("misclassified")]
    info = json.loads((out / "model.json").read_text())
    expected_wrong = round((1 - info["test_accuracy"]) * info["test_images"])
    assert len(misclassified) == expected_wrong


def test_one_usable_class_is_a_one_line_error(tmp_path, sample_dir, capsys):
    data = tmp_path / "one"
    shutil.copytree(sample_dir / "forest", data / "forest")
    (data / "junk").mkdir()
    (data / "junk" / "a.jpg").write_text("text")
    err = _one_line_error(capsys, ["bottlenecks", "--image-dir", str(data), "--weights", "none",
                                   "--architecture", TINY_ARCH])
    assert "at least 2" in err


def test_bottlenecks_and_label_commands(retrained, sample_dir, session_cache, capsys):
    assert main(["bottlenecks", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH,
                 "--weights", "none", "--bottleneck-dir", str(session_cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{len(list(sample_dir.glob('*/*.*')))} cached, 0 computed" in out
    image = next((sample_dir / "night_sky").glob("*.jpg"))
    assert main(["label", "--model", str(retrained.output_dir), "--image", str(image),
                 "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    scores = [float(line.rsplit("= ", 1)[1].rstrip(")")) for line in lines]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    labels = retrained.info.labels
    assert all(line.split(" (score")[0] in labels for line in lines)


def test_label_on_a_broken_image_is_one_line(retrained, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    err = _one_line_error(capsys, ["label", "--model", str(retrained.output_dir),
                                   "--image", str(broken)])
    assert "broken.jpg" in err
