"""Hostile model files: each is built here, small, as an attacker would make it, and each must
end in one line and exit 2 (or work, where the file is legitimate), with nothing written or
read outside the paths given, no process killed by a signal outside ``verify``'s children, and
memory bounded where the file was a bomb (toolchain.untrusted, docs/ARCHITECTURE.md "Files
from strangers")."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import toolchain
from tests.helpers import (
    TINY_ARCH,
    cli_env,
    command,
    no_traceback,
    operator_inputs_past_the_end,
    run,
)
from tests.privileges import drop_in_child
from toolchain.errors import ModelError, UnsafeModel
from toolchain.untrusted import LIMITS

#: Peak resident memory a refused bomb may cost a command: the refusals peaked at 0.21 GB
#: (bottlenecks) to 0.51 GB (label of a Core ML model) here; the same bombs took 1.5 to 6.7 GB
#: before the limits.
PEAK_BYTES = 1_000_000_000
LABELS = ("cat", "dog")


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, one error line (and at most a hint), holding every fragment."""
    out = result.stdout + result.stderr
    no_traceback(result)
    assert result.returncode == 2, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("toolchain: error:")]
    assert len(errors) == 1, out
    others = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith(("toolchain: error:", "hint:"))]
    assert not others, out
    for fragment in fragments:
        assert fragment in errors[0], out
    return errors[0]


def _peak(home: Path, *args) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``toolchain ARGS``; its result and its peak resident memory in bytes (wait4)."""
    with open(home.parent / "out.log", "w+") as out, open(home.parent / "err.log", "w+") as err:
        child = subprocess.Popen(command(*args), env=cli_env(home), stdout=out, stderr=err,
                                 stdin=subprocess.DEVNULL, text=True, preexec_fn=drop_in_child)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, child.returncode, out.read(), err.read())
    return result, usage.ru_maxrss * 1024


# --- frozen graphs -------------------------------------------------------------------------------


def _graph(path: Path, extra=None, size: int = 32) -> Path:
    """A frozen classifier ``input`` [1, size, size, 3] → ``final_result`` over LABELS;
    ``extra(tf, features)`` may change the features on the way (an attacker's op)."""
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        image = tf.compat.v1.placeholder(tf.float32, [1, size, size, 3], name="input")
        features = tf.reduce_mean(image, [1, 2], name="feat")
        if extra is not None:
            features = extra(tf, features)
        weights = np.arange(3 * len(LABELS), dtype=np.float32).reshape(3, -1) / 10
        tf.nn.softmax(tf.matmul(features, tf.constant(weights, name="weights")),
                      name="final_result")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    (path.parent / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return path


def _writes(marker: Path):
    def extra(tf, features):
        secret = tf.io.read_file("/etc/hostname")
        written = tf.io.write_file(str(marker), secret)
        with tf.control_dependencies([written]):
            return tf.identity(features) + tf.cast(tf.strings.length(secret), tf.float32) * 0
    return extra


@pytest.fixture
def photo(sample_dir) -> Path:
    return next(sample_dir.glob("ocean/*.jpg"))


@pytest.fixture
def evil_graph(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "outside" / "written by the graph"
    marker.parent.mkdir()
    return _graph(tmp_path / "evil.pb", _writes(marker)), marker


@pytest.mark.slow
def test_a_graph_that_writes_files_is_refused_by_every_command(evil_graph, tmp_path, photo,
                                                               tflite_export):
    graph, marker = evil_graph
    artifact = tflite_export(TINY_ARCH, "float32")
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(graph, "evil/frozen_graph.pb")
    home = tmp_path / "home"
    runs = {
        "label": ("label", "--model", graph, "--labels", tmp_path / "labels.txt",
                  "--image", photo),
        "verify": ("verify", "--model", graph, "--labels", tmp_path / "labels.txt",
                   "--images", photo.parent, "--artifact", artifact),
        "convert": ("convert", "--graph", graph, "--labels", tmp_path / "labels.txt",
                    "--target", "tflite", "--output-dir", tmp_path / "out"),
        "bottlenecks .pb": ("bottlenecks", "--image-dir", photo.parent.parent, "--weights", graph,
                            "--input-tensor", "input", "--bottleneck-tensor", "feat",
                            "--bottleneck-dir", tmp_path / "cache"),
        "bottlenecks .tgz": ("bottlenecks", "--image-dir", photo.parent.parent, "--weights",
                             archive, "--input-tensor", "input", "--bottleneck-tensor", "feat",
                             "--bottleneck-dir", tmp_path / "cache"),
    }
    for name, args in runs.items():
        line = _one_line(run(home, *args), "holds op ", "which is not one a frozen image "
                                                        "classifier is made of")
        assert "'ReadFile'" in line or "ReadFile" in line, (name, line)
        assert not marker.exists(), name
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyfunc", "function library", "content", "padding", "input"])
def test_a_graph_that_is_not_plain_data_is_refused_in_one_line(kind, tmp_path, photo):
    import tensorflow as tf

    path = tmp_path / "graph.pb"
    if kind == "pyfunc":
        _graph(path, lambda tf, f: tf.compat.v1.py_func(lambda x: x, [f], tf.float32))
        fragment = "holds op PyFunc"
    elif kind == "function library":
        @tf.function
        def twice(x):
            return x * 2.0

        _graph(path, lambda tf, f: twice(f))
        fragment = "holds a function library"
    elif kind == "content":
        _graph(path)
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString(path.read_bytes())
        node = next(n for n in graph.node if n.name == "weights")
        node.attr["value"].tensor.tensor_content = node.attr["value"].tensor.tensor_content[:8]
        path.write_bytes(graph.SerializeToString())
        fragment = "holds 8 bytes for shape [3, 2] (24 expected)"
    elif kind == "padding":
        _graph(path, lambda tf, f: tf.reduce_mean(
            tf.pad(f[:, None, None, :], [[0, 0], [0, 20000], [0, 20000], [0, 0]]), [1, 2]))
        fragment = "more than the limit of 268,435,456; it is not run"
    else:
        _graph(path, size=60000)
        fragment = "declares a 60000x60000 image input, larger than the limit of 8192"
    with pytest.raises(UnsafeModel) as caught:
        toolchain.label(model=path, image=photo, labels=tmp_path / "labels.txt")
    assert fragment in caught.value.message and "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_constant_bomb_is_refused_before_it_is_allocated(tmp_path, photo):
    """563 bytes that declare a 40000x40000 float constant of one value (6.4 GB when
    materialised): refused from its declared size."""
    import tensorflow as tf

    path = _graph(tmp_path / "bomb.pb")
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(path.read_bytes())
    node = graph.node.add()
    node.name, node.op = "bomb", "Const"
    node.attr["dtype"].type = 1
    tensor = node.attr["value"].tensor
    tensor.dtype = 1
    tensor.tensor_shape.dim.add().size = 40000
    tensor.tensor_shape.dim.add().size = 40000
    tensor.float_val.append(1.0)
    path.write_bytes(graph.SerializeToString())
    assert path.stat().st_size < 1000
    result, peak = _peak(tmp_path / "home", "label", "--model", path, "--labels",
                         tmp_path / "labels.txt", "--image", photo)
    _one_line(result, "constant 'bomb' of ", "declares shape [40000, 40000] (5.96 GiB), more "
                                             "than the limit of 512 MiB")
    assert peak < PEAK_BYTES, peak


@pytest.mark.slow
def test_an_archive_member_past_the_limit_is_not_extracted(tmp_path, photo):
    """A .tgz whose graph unpacks to more than the graph limit: refused from its header."""
    archive = tmp_path / "big.tgz"
    size = LIMITS.graph_bytes + (1 << 20)
    with gzip.open(archive, "wb", compresslevel=1) as raw, \
            tarfile.open(fileobj=raw, mode="w") as packed:
        info = tarfile.TarInfo("big/frozen_graph.pb")
        info.size = size
        packed.addfile(info, _Zeros(size))
    result, peak = _peak(tmp_path / "home", "bottlenecks", "--image-dir", photo.parent.parent,
                         "--weights", archive, "--input-tensor", "input", "--bottleneck-tensor",
                         "feat", "--bottleneck-dir", tmp_path / "cache")
    _one_line(result, "big/frozen_graph.pb in ", "is 513 MiB unpacked, more than the limit of "
                                                  "512 MiB; it is not extracted")
    assert peak < PEAK_BYTES, peak


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in chunks (never held whole)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


# --- Keras files ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_hdf5_file_named_keras_is_refused_before_keras_opens_it(retrained, tmp_path, photo,
                                                                   tflite_export):
    """HDF5 is loaded by Keras' legacy path, where safe_mode does not apply: a Lambda's code
    would run. Refused from its first bytes, as a file and as a model folder's model.keras."""
    import shutil

    import tensorflow as tf

    marker = tmp_path / "the code ran"

    def payload(x, path=str(marker)):
        open(path, "w").close()
        return x

    model = tf.keras.models.load_model(retrained.output_dir / "model.keras", compile=False)
    evil = tf.keras.Model(model.input, tf.keras.layers.Lambda(payload)(model.output))
    lone = tmp_path / "x.keras"
    evil.save(tmp_path / "x.h5", save_format="h5")
    (tmp_path / "x.h5").rename(lone)
    folder = tmp_path / "model"
    shutil.copytree(retrained.output_dir, folder)
    (folder / "model.keras").unlink()
    shutil.copyfile(lone, folder / "model.keras")
    marker.unlink(missing_ok=True)  # building the model ran it once, here, in the test
    (tmp_path / "labels.txt").write_text("\n".join(retrained.info.labels) + "\n")

    result = run(tmp_path / "home", "verify", "--model", lone, "--labels",
                 tmp_path / "labels.txt", "--images", photo.parent, "--artifact",
                 tflite_export(TINY_ARCH, "float32"))
    _one_line(result, "is an HDF5 file, not the Keras v3 .keras format")
    with pytest.raises(UnsafeModel, match="is an HDF5 file, not the Keras v3 .keras format"):
        toolchain.label(model=folder, image=photo)
    assert not marker.exists()


# --- Core ML packages ----------------------------------------------------------------------------


def _package(coreml_export, tmp_path: Path) -> Path:
    import shutil

    source, _ = coreml_export(TINY_ARCH, "mlprogram", "float32")
    copy = tmp_path / "pkg.mlpackage"
    shutil.copytree(source, copy)
    return copy


def _manifest(package: Path, change, weights: str | None = None) -> None:
    """The package's manifest with its model's path changed (and its weights', if given)."""
    path = package / "Manifest.json"
    document = json.loads(path.read_text())
    for entry in document["itemInfoEntries"].values():
        if entry["path"].endswith(".mlmodel"):
            entry["path"] = change(entry["path"])
        elif weights is not None and entry["path"].endswith("weights"):
            entry["path"] = weights
    path.write_text(json.dumps(document))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["relative", "absolute", "weights"])
def test_a_package_manifest_pointing_outside_is_refused(coreml_export, tmp_path, photo, where):
    package = _package(coreml_export, tmp_path / "in")
    outside = _package(coreml_export, tmp_path / "other")  # a model the manifest must not reach
    if where == "weights":  # the weights folder's entry, pointed at /etc
        _manifest(package, lambda path: path, weights=os.path.relpath("/etc", package / "Data"))
    else:
        target = (os.path.relpath(outside / "Data/com.apple.CoreML/model.mlmodel",
                                  package / "Data") if where == "relative" else "/etc/passwd")
        _manifest(package, lambda _: target)
    with pytest.raises(UnsafeModel, match="points outside the package"):
        toolchain.label(model=package, image=photo)
    with pytest.raises(UnsafeModel, match="points outside the package"):
        toolchain.install(app="ios", source=package, apps_dir=_apps(tmp_path))


def _apps(tmp_path: Path) -> Path:
    apps = tmp_path / "apps"
    for app in ("ios", "android"):
        (apps / app).mkdir(parents=True, exist_ok=True)
    return apps


@pytest.mark.slow
@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_package_holding_a_link_is_neither_read_nor_installed(coreml_export, tmp_path, photo,
                                                               link):
    package = _package(coreml_export, tmp_path / "in")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_text("root:secret\n")
    data = package / "Data" / "com.apple.CoreML"
    if link == "file":
        (data / "shadow").symlink_to(secret / "shadow")
    else:
        (data / "outside").symlink_to(secret, target_is_directory=True)
    apps = _apps(tmp_path)
    result = run(tmp_path / "home", "install", "--app", "ios", "--from", package,
                 "--apps-dir", apps)
    _one_line(result, "holds a link", "a package holds files only")
    assert not [p for p in apps.rglob("*") if p.is_file()], "something was installed"
    with pytest.raises(UnsafeModel, match="holds a link"):
        toolchain.label(model=package, image=photo)


# --- TFLite files --------------------------------------------------------------------------------


def _model_and_labels(tflite_export) -> tuple[bytes, bytes]:
    """The tiny float32 .tflite's bytes, and its packed labels.txt."""
    model = tflite_export(TINY_ARCH, "float32").read_bytes()
    with zipfile.ZipFile(io.BytesIO(model)) as packed:
        return model, packed.read("labels.txt")


def _unpacked(model: bytes) -> bytes:
    """A toolchain .tflite without its packed zip: the flatbuffer alone."""
    with zipfile.ZipFile(io.BytesIO(model)) as packed:
        return model[:min(info.header_offset for info in packed.infolist())]


def _repacked(model: bytes, files: dict[str, bytes], compress=zipfile.ZIP_DEFLATED) -> bytes:
    """``model`` (a toolchain .tflite) with its packed zip replaced by ``files``."""
    out = io.BytesIO(_unpacked(model))
    out.seek(0, 2)
    with zipfile.ZipFile(out, "a", compression=compress) as packed:
        for name, data in files.items():
            packed.writestr(name, data)
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("member, mib, size", [("provenance.json", 1024, "1 GiB"),
                                               ("labels.txt", 300, "300 MiB")])
def test_a_zip_bomb_inside_a_tflite_is_not_unpacked(tflite_export, tmp_path, photo, member, mib,
                                                    size):
    """A packed file of 1 GiB of zeros (or 300 MiB of one label a line), a megabyte packed."""
    model, labels = _model_and_labels(tflite_export)
    bomb = tmp_path / "bomb.tflite"
    bomb.write_bytes(_unpacked(model))
    chunk = bytes(1 << 20) if member == "provenance.json" else b"cat\n" * (1 << 18)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as packed:
        if member != "labels.txt":
            packed.writestr("labels.txt", labels)
        with packed.open(member, "w") as written:
            for _ in range(mib):
                written.write(chunk)
    assert bomb.stat().st_size < 5_000_000
    apps = _apps(tmp_path)
    for args in (("label", "--model", bomb, "--image", photo),
                 ("install", "--app", "android", "--from", bomb, "--apps-dir", apps)):
        result, peak = _peak(tmp_path / "home", *args)
        _one_line(result, f"{member} packed in the model unpacks to {size}, more than the "
                          "limit of 16 MiB")
        assert peak < PEAK_BYTES, (args[0], peak)
    assert not list((apps / "android").rglob("*.tflite"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "identifier", "root offset", "operator"])
def test_a_damaged_tflite_is_one_line_never_a_signal(tflite_export, tmp_path, photo, kind):
    model = tflite_export(TINY_ARCH, "float32").read_bytes()
    damaged = tmp_path / "damaged.tflite"
    if kind == "truncated":
        damaged.write_bytes(model[:5000])
        fragment = "is not a valid TFLite model: "
    elif kind == "identifier":
        damaged.write_bytes(model[:4] + b"XXXX" + model[8:])
        fragment = "it does not carry the TFLite file identifier TFL3"
    elif kind == "root offset":
        damaged.write_bytes((len(model) + 1000).to_bytes(4, "little") + model[4:])
        fragment = "lies outside the file"
    else:  # read as data it is fine; the interpreter dies on it, in label's child
        damaged.write_bytes(operator_inputs_past_the_end(model))
        fragment = "its runtime crashed the process (SIGSEGV)"
    apps = _apps(tmp_path)
    result = run(tmp_path / "home", "label", "--model", damaged, "--image", photo)
    _one_line(result, fragment)
    if kind != "operator":
        _one_line(run(tmp_path / "home", "install", "--app", "android", "--from", damaged,
                      "--apps-dir", apps), fragment)
    for _ in range(2):  # the Python API, twice: the process survives the first
        with pytest.raises(ModelError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            toolchain.label(model=damaged, image=photo)


@pytest.mark.slow
def test_deeply_nested_provenance_is_one_line(tflite_export, tmp_path, photo):
    model, labels = _model_and_labels(tflite_export)
    nested = tmp_path / "nested.tflite"
    nested.write_bytes(_repacked(model, {"labels.txt": labels,
                                         "provenance.json": b"[" * 100_000 + b"]" * 100_000}))
    for args in (("label", "--model", nested, "--image", photo),
                 ("install", "--app", "android", "--from", nested, "--apps-dir",
                  _apps(tmp_path))):
        _one_line(run(tmp_path / "home", *args), "nests more than 32 deep")


@pytest.mark.slow
def test_too_many_labels_are_refused(tflite_export, tmp_path):
    model = tflite_export(TINY_ARCH, "float32").read_bytes()
    many = tmp_path / "many.tflite"
    labels = "".join(f"label {i}\n" for i in range(LIMITS.labels + 1)).encode()
    many.write_bytes(_repacked(model, {"labels.txt": labels}))
    with pytest.raises(UnsafeModel, match="holds 100,001 labels, more than the limit of 100,000"):
        toolchain.install(app="android", source=many, apps_dir=_apps(tmp_path))


# --- Core ML inputs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_core_ml_model_declaring_a_huge_input_is_refused(coreml_export, tmp_path, photo):
    import coremltools as ct

    source, _ = coreml_export(TINY_ARCH, "neuralnetwork", "float32")
    spec = ct.utils.load_spec(str(source))
    image = spec.description.input[0].type.imageType
    image.width = image.height = 60000
    huge = tmp_path / "huge.mlmodel"
    ct.utils.save_spec(spec, str(huge))
    result, peak = _peak(tmp_path / "home", "label", "--model", huge, "--image", photo)
    _one_line(result, "declares a 60000x60000 image input, larger than the limit of 8192")
    assert peak < PEAK_BYTES, peak


# --- what is printed -----------------------------------------------------------------------------


@pytest.mark.slow
def test_labels_with_escape_sequences_are_printed_escaped(tflite_export, tmp_path, photo):
    """A label is a stranger's text: one that clears the screen, or reverses what follows it,
    is printed as its escapes by label and install."""
    from tests.helpers import LABELS as MODEL_LABELS

    model = tflite_export(TINY_ARCH, "float32").read_bytes()
    with zipfile.ZipFile(io.BytesIO(model)) as packed:
        provenance = packed.read("provenance.json")
    # (labels.txt ends a label at a line break, so a line break cannot be inside one here)
    labels = ["\x1b[2J\x1b[Hall clear", "rtl\u202eexe.txt", *MODEL_LABELS[2:]]
    hostile = tmp_path / "hostile.tflite"
    hostile.write_bytes(_repacked(model, {"labels.txt": "\n".join(labels).encode() + b"\n",
                                          "provenance.json": provenance}))
    for args in (("label", "--model", hostile, "--image", photo, "--top-k", 5),
                 ("install", "--app", "android", "--from", hostile, "--apps-dir",
                  _apps(tmp_path), "--allow-unverified")):
        result = run(tmp_path / "home", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "\x1b" not in result.stdout and "\u202e" not in result.stdout, result.stdout
        assert "\\x1b[2J\\x1b[Hall clear" in result.stdout, result.stdout
        assert "rtl\\u202eexe.txt" in result.stdout, result.stdout
