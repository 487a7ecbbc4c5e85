"""The README's Python example runs as printed, and the API behaves as the README says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import toolchain

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    """The fenced block after the ``python-example`` marker."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its Python example"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, session_cache):
    monkeypatch.chdir(tmp_path)
    # The default cache, pointed at the session's: the example's photos are the sample_dir
    # fixture's (same seed and count), so their bottlenecks and engine are reused.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "toolchain").mkdir(parents=True)
    (tmp_path / "cache" / "toolchain" / "bottlenecks").symlink_to(session_cache)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_example(), str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.passed is True
    assert [path.name for path in result.artifacts] == ["model_float32.mlmodel",
                                                        "model_float16.tflite"]
    assert all(path.exists() for path in result.artifacts)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "passed"
    assert lines[1] == "['model_float32.mlmodel', 'model_float16.tflite']"
    record = namespace["record"]
    assert record == result.report.record() and record["passed"] is True
    import json

    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["held_out_images"] == record["held_out_images"] > 0
    assert [a["top1_agreement"] for a in on_disk["artifacts"]] == [
        a["top1_agreement"] for a in record["artifacts"]]
    top = namespace["top"]
    assert len(top) == 1 and top[0].label in result.retrained.info.labels
    assert lines[-1] == f"{top[0].label} {round(top[0].score, 3)}"


def test_a_misspelt_keyword_suggests_the_right_one():
    with pytest.raises(toolchain.UnknownOption) as raised:
        toolchain.build("photos", "out", targets=["tflite"], learning_rat=0.1)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, toolchain.UsageError)
    assert "'learning_rat'" in str(raised.value) and "learning_rate" in raised.value.hint


def test_values_are_checked_before_any_work(tmp_path):
    with pytest.raises(toolchain.UsageError, match="takes a number, not '0.1'"):
        toolchain.build(tmp_path / "absent", targets=["tflite"], learning_rate="0.1")
    with pytest.raises(toolchain.UsageError, match="unknown target 'onnx'"):
        toolchain.convert(tmp_path, targets=["onnx"])
    with pytest.raises(toolchain.DatasetError, match="does not exist"):
        toolchain.retrain(tmp_path / "absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keywords_name_every_option_with_its_default():
    found = toolchain.keywords("build")
    assert found["how_many_training_steps"][0] == 4000
    assert found["coreml_format"][0] == "neuralnetwork" and found["tflite_variant"][0] == "int8"
    assert found["float32_agreement"][0] == 0.999 and found["model_version"][0] == "1.0"
    assert "targets" in found and "progress" in found
    assert all(isinstance(text, str) and text for _, text in found.values())
    # A required keyword says so, not <dataclasses._MISSING_TYPE object at 0x...>.
    assert found["image_dir"][0] is toolchain.REQUIRED
    assert repr(found["image_dir"][0]) == "toolchain.REQUIRED"


def test_import_loads_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, toolchain\n"
            "print(sorted(m for m in ('tensorflow', 'coremltools', 'tflite_support', 'PIL',"
            " 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def _shell_commands() -> list[str]:
    """Every ``toolchain ...`` line of the README's ``sh`` blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("toolchain "):
                found.append(line)
    return found


def test_every_command_line_in_the_readme_is_accepted_as_written():
    import shlex

    from toolchain import cli

    lines = _shell_commands()
    assert len(lines) >= 10, "README.md lost its command lines"
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] in ("--help", "-h"):
            continue
        try:
            cli.options_for(argv)
        except SystemExit as error:
            pytest.fail(f"README command refused by the parser: {line} ({error})")
        except toolchain.UsageError as error:
            pytest.fail(f"README command refused: {line}: {error.message}")
