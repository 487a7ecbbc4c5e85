"""Untrusted files: loading never runs code from a data file, and a dataset cannot make the
toolchain write outside the output and cache folders."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY_ARCH, cli_env, command, no_traceback, run
from tests.privileges import drop_in_child

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "toolchain").rglob("*.py"), *(ROOT / "targets").rglob("*.py")])


def _calls(name: str):
    """Every call of ``<anything>.name(...)`` or ``name(...)`` in the toolchain's sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return "absent"


def test_the_scan_sees_the_sources():
    assert len(SOURCES) > 20 and any(path.name == "measure.py" for path in SOURCES)


def test_every_numpy_load_refuses_pickles():
    loads = list(_calls("load"))
    numpy = [(path, node) for path, node in loads
             if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "np"]
    assert numpy, "no np.load found: the scan is broken"
    for path, node in numpy:
        assert _keyword(node, "allow_pickle") is False, f"{path}:{node.lineno}"


def test_keras_models_load_in_safe_mode_and_nothing_unpickles():
    loads = list(_calls("load_model"))
    assert loads, "no load_model found: the scan is broken"
    for path, node in loads:
        assert _keyword(node, "safe_mode") is True, f"{path}:{node.lineno}"
    for forbidden in ("loads", "load"):
        for path, node in _calls(forbidden):
            owner = getattr(getattr(node.func, "value", None), "id", "")
            assert owner not in ("pickle", "marshal", "dill", "joblib", "yaml"), \
                f"{path}:{node.lineno}"
    for builtin in ("eval", "exec"):
        assert not list(_calls(builtin)), builtin


@pytest.mark.slow
def test_a_model_file_carrying_code_is_refused_without_running_it(tmp_path, retrained,
                                                                   sample_dir):
    import tensorflow as tf

    marker = tmp_path / "the code ran"
    folder = tmp_path / "model"
    shutil.copytree(retrained.output_dir, folder)

    def payload(x, path=str(marker)):
        open(path, "w").close()
        return x

    model = tf.keras.models.load_model(folder / "model.keras", compile=False)
    evil = tf.keras.Model(model.input, tf.keras.layers.Lambda(payload)(model.output))
    (folder / "model.keras").unlink()
    evil.save(folder / "model.keras", save_format="keras_v3")
    marker.unlink(missing_ok=True)  # building the model ran it once, here, in the test

    image = next(sample_dir.glob("ocean/*.jpg"))
    result = run(tmp_path / "home", "label", "--model", folder, "--image", image)
    no_traceback(result)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot load {folder / 'model.keras'}" in result.stderr
    assert not marker.exists()


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames:
            path = here / name
            info = path.lstat()
            state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return state


@pytest.mark.slow
def test_a_build_writes_only_into_its_output_and_cache(tmp_path, sample_dir):
    photos = tmp_path / "photos"
    for label, name in (("desert", "~"), ("forest", "-rf"), ("ocean", "%s %n $HOME")):
        shutil.copytree(sample_dir / label, photos / name)
    outside = tmp_path / "outside"
    shutil.copytree(sample_dir / "sunset", outside)
    (photos / "-rf" / "link to outside").symlink_to(outside, target_is_directory=True)
    (photos / "-rf" / "outside photo.jpg").symlink_to(next(outside.glob("*.jpg")))
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = _snapshot(tmp_path, (out, cache))

    env = {**cli_env(home), "TMPDIR": str(scratch)}
    result = subprocess.run(
        command("build", "--image-dir", photos, "--weights", "none", "--architecture",
                TINY_ARCH, "--bottleneck-dir", cache, "--output-dir", out,
                "--how-many-training-steps", 50, "--target", "tflite", "--tflite-variant",
                "float32", "--accept-small-set"), env=env, capture_output=True, text=True,
        timeout=900, stdin=subprocess.DEVNULL, preexec_fn=drop_in_child, cwd=photos)
    no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "model_float32.tflite").is_file() and list(cache.rglob("*.bn"))
    after = _snapshot(tmp_path, (out, cache))
    changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
    # Keras writes its own settings file, ~/.keras/keras.json, the first time it is imported
    # by a user, and matplotlib its font cache (MediaPipe Tasks' vision package imports
    # matplotlib.pyplot; MPLCONFIGDIR is home/.mpl here); nothing else may change outside the
    # output and the cache, but the output folder's lock beside it (toolchain/atomic.py).
    first_use = {path for path in changed if re.fullmatch(r"home/\.mpl/fontlist-v\d+\.json", path)}
    assert changed - first_use <= {"home/.keras/keras.json", ".out.lock"}, sorted(changed)
    assert not list(scratch.iterdir()), "temporary files left in TMPDIR"
    assert (out / "labels.txt").read_text().splitlines() == ["%s %n $HOME", "-rf", "~"]
