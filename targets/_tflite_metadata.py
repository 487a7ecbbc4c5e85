"""TFLite metadata: writing labels and normalisation into a ``.tflite``, and reading a file back.

Why metadata: the Android Task Library, MediaPipe Tasks and Android Studio's ML binding read the
labels, the input normalisation and the colour space from the model file itself, so an app
cannot pair the model with the wrong labels or the wrong preprocessing.

Written and read by this project's own codec (:mod:`targets._tflite_schema`, on the
``flatbuffers`` package), on every platform: tflite-support, whose writers did this before, has no
Apple Silicon wheel and pins protobuf below 4. What it writes is what tflite-support's image
classifier writer writes, byte for byte in the metadata buffer (tests/targets/test_tflite_schema.py
proves it where tflite-support is installed, and against a committed golden where it is not);
the associated files are packed as the same zip appended to the model, with a fixed timestamp
so that a build is reproducible. The inspector's record (:func:`record`) is read back the same
way; the TFLite target's post-write check, ``install``, ``label`` and the runners all use it.
tflite-support stays an optional reader: its Task Library runs the artifact in the verifier where
it is installed (:func:`support`). Underscored so the target registry does not take it for a
target. See docs/ARCHITECTURE.md, "TFLite metadata".
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from targets import (
    ArtifactMetadata,
    ArtifactRecord,
    ImageInput,
    Source,
    _tflite_model,
    _tflite_schema,
)
from toolchain.backbones import Preprocessing
from toolchain.dataset import labels_text
from toolchain.errors import (
    ConversionError,
    MissingSystemLibrary,
    ModelError,
    UnsafeModel,
    UsageError,
    first_line,
)
from toolchain.untrusted import LIMITS, check_labels, shown, size_text
from toolchain.untrusted.files import load_json, read_limited

LABEL_FILE = "labels.txt"
#: The model-level associated file that holds ``Source.user_defined`` (provenance), as JSON.
PROVENANCE_FILE = "provenance.json"
#: What the metadata names the input and output tensors (tflite-support's image classifier).
INPUT_NAME, OUTPUT_NAME = "image", "probability"
#: The descriptions tflite-support's image classifier writer gives; apps show them.
INPUT_DESCRIPTION = "Input image to be classified."
OUTPUT_DESCRIPTION = "Probabilities of the labels respectively."
LABEL_DESCRIPTION = "Labels for categories that the model can recognize."
PROVENANCE_DESCRIPTION = "Provenance: architecture, normalisation and its source."
#: A packed file's zip timestamp: fixed, so the same model and labels give the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: tflite's TensorType values for the two input/output types the metadata writer knows.
FLOAT32, UINT8 = 0, 3


def support() -> SimpleNamespace:
    """tflite-support's Task Library (optional: installed where it has wheels, x86-64); a
    missing package is an ImportError the caller turns into "not run here", a missing libusb-1.0
    one line with a fix."""
    try:
        from tflite_support.task import core, processor, vision
    except (ImportError, OSError) as error:
        if "libusb" not in str(error):
            raise
        raise MissingSystemLibrary(
            "tflite-support needs the system library libusb-1.0-0, which is not installed",
            hint="on Debian/Ubuntu: apt-get install libusb-1.0-0") from error
    return SimpleNamespace(core=core, processor=processor, vision=vision)


def label_text(labels: tuple[str, ...]) -> str:
    """One label per line, UTF-8, as ``labels.txt`` and the Task Library expect."""
    if not labels or any(not label or "\n" in label or "\r" in label for label in labels):
        raise UsageError("labels must be non-empty and free of line breaks to fit labels.txt")
    if len(set(labels)) != len(labels):
        raise UsageError("the labels are not unique: " + ", ".join(
            sorted({label for label in labels if labels.count(label) > 1})))
    return labels_text(labels)


def with_metadata(model: bytes, source: Source, metadata: ArtifactMetadata) -> bytes:
    """``model`` with general info, input normalization, ``labels.txt`` and the provenance.

    The document is the one tflite-support's ``image_classifier.MetadataWriter`` builds, plus
    name, description, version, author and license (its ``create_for_inference`` cannot set
    them) and ``source.user_defined`` packed as ``provenance.json``: a model-level DESCRIPTIONS
    file (the Task Library ignores it; Core ML keeps the same keys as its ``userDefined``
    metadata). It holds, for a frozen graph, the normalisation used and where it came from.
    """
    labels = label_text(tuple(source.labels)).encode("utf-8")
    provenance = json.dumps({str(k): str(v) for k, v in sorted(source.user_defined.items())},
                            ensure_ascii=False, indent=1).encode("utf-8")
    found = document(source.preprocessing, metadata, *_io_types(model))
    return populate(model, _tflite_schema.encode(found),
                    {LABEL_FILE: labels, PROVENANCE_FILE: provenance})


def document(pre: Preprocessing, metadata: ArtifactMetadata, input_type: int,
             output_type: int) -> dict:
    """The metadata of an image classifier whose input and output tensors have these
    TensorTypes (:data:`FLOAT32` or :data:`UINT8`), in the displayer's JSON form."""
    return {
        "name": metadata.name, "description": metadata.description,
        "version": metadata.version,
        "subgraph_metadata": [{
            "input_tensor_metadata": [_input_metadata(pre, input_type)],
            "output_tensor_metadata": [_output_metadata(output_type)]}],
        "author": metadata.author, "license": metadata.license,
        "associated_files": [{"name": PROVENANCE_FILE, "description": PROVENANCE_DESCRIPTION,
                              "type": "DESCRIPTIONS"}],
        "min_parser_version": _tflite_schema.MIN_PARSER_VERSION}


def _input_metadata(pre: Preprocessing, tensor_type: int) -> dict:
    """The image input as tflite-support's ``InputImageTensorMd`` describes it: RGB, the
    normalisation, and the value range the tensor takes (0..255 for uint8)."""
    mean, std = list(pre.mean), list(pre.std)
    tensor = {"name": INPUT_NAME, "description": INPUT_DESCRIPTION,
              "content": {"content_properties_type": "ImageProperties",
                          "content_properties": {"color_space": "RGB"}},
              "process_units": [{"options_type": "NormalizationOptions",
                                 "options": {"mean": mean, "std": std}}],
              "stats": {}}
    if tensor_type == UINT8:
        tensor["stats"] = {"max": [255.0], "min": [0.0]}
    elif tensor_type == FLOAT32:
        tensor["stats"] = {"max": [(255.0 - m) / s for m, s in zip(mean, std)],
                           "min": [(0.0 - m) / s for m, s in zip(mean, std)]}
    return tensor


def _output_metadata(tensor_type: int) -> dict:
    """The probabilities as tflite-support's ``ClassificationTensorMd`` describes them, with
    ``labels.txt`` as their axis labels."""
    stats = ({"max": [255.0], "min": [0.0]} if tensor_type == UINT8 else
             {"max": [1.0], "min": [0.0]} if tensor_type == FLOAT32 else {})
    return {"name": OUTPUT_NAME, "description": OUTPUT_DESCRIPTION,
            "content": {"content_properties_type": "FeatureProperties",
                        "content_properties": {}},
            "stats": stats,
            "associated_files": [{"name": LABEL_FILE, "description": LABEL_DESCRIPTION,
                                  "type": "TENSOR_AXIS_LABELS"}]}


def _schema():
    """TensorFlow's generated code for the TFLite model schema (the converter's own version)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def _io_types(model: bytes) -> tuple[int, int]:
    """The TensorType of the one input and the one output; the metadata describes exactly one
    of each, as the Task Library's image classifier expects."""
    fb = _schema()
    graph = fb.Model.GetRootAsModel(model, 0).Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise ConversionError(f"the TFLite model has {graph.InputsLength()} inputs and "
                              f"{graph.OutputsLength()} outputs; an image classifier's metadata "
                              "describes one of each")
    return (graph.Tensors(graph.Inputs(0)).Type(), graph.Tensors(graph.Outputs(0)).Type())


def populate(model: bytes, metadata_buffer: bytes, files: dict[str, bytes]) -> bytes:
    """``model`` with ``metadata_buffer`` as its ``TFLITE_METADATA`` (replacing one it had) and
    ``files`` packed after it as a zip, as tflite-support's ``MetadataPopulator`` does: the
    model is rebuilt with TensorFlow's own schema code, one buffer added, one metadata entry
    pointing at it. Files a model already packed are dropped (this writes fresh converter
    output)."""
    import flatbuffers

    fb = _schema()
    tree = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(model, 0))
    buffer = fb.BufferT()
    buffer.data = np.frombuffer(metadata_buffer, dtype=np.uint8)
    tree.buffers = tree.buffers or []
    tree.metadata = tree.metadata or []
    entry = next((m for m in tree.metadata
                  if m.name and m.name.decode("utf-8") == _tflite_schema.METADATA_FIELD), None)
    if entry is None:
        entry = fb.MetadataT()
        entry.name = _tflite_schema.METADATA_FIELD
        entry.buffer = len(tree.buffers)
        tree.buffers.append(buffer)
        tree.metadata.append(entry)
    else:
        tree.buffers[entry.buffer] = buffer
    builder = flatbuffers.Builder(0)
    builder.Finish(tree.Pack(builder), b"TFL3")
    out = io.BytesIO()
    out.write(builder.Output())
    with zipfile.ZipFile(out, "a") as packed:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o600 << 16  # what writestr gives a file named by a string
            packed.writestr(info, data)
    return out.getvalue()


def metadata_buffer(buffer: bytes, where: str = "the model") -> bytes | None:
    """The ``TFLITE_METADATA`` flatbuffer of a model, or None when it has none (read with
    bounds checks: :mod:`targets._tflite_model`)."""
    return _tflite_model.read(buffer, where).metadata.get(_tflite_schema.METADATA_FIELD)


def packed_files(buffer: bytes, limits=LIMITS) -> dict[str, bytes]:
    """The files packed after the model (its zip), by name; empty when there are none. Each is
    checked against the limits by its declared size before it is decompressed: a few kilobytes
    of zip can unpack to gigabytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(buffer)) as packed:
            infos = packed.infolist()
            if len(infos) > limits.packed_files:
                raise UnsafeModel(f"the model packs {len(infos)} files, more than the limit of "
                                  f"{limits.packed_files}")
            for info in infos:
                if info.file_size > limits.packed_file_bytes:
                    raise UnsafeModel(f"{shown(info.filename)} packed in the model unpacks to "
                                      f"{size_text(info.file_size)}, more than the limit of "
                                      f"{size_text(limits.packed_file_bytes)}; it is not read")
            return {info.filename: packed.read(info) for info in infos}
    except zipfile.BadZipFile:
        return {}


def read_metadata(buffer: bytes, where: str = "the model") -> dict:
    """The metadata document of a model (the displayer's JSON form); {} when it has none."""
    found = metadata_buffer(buffer, where)
    if found is None:
        return {}
    return _tflite_schema.decode(found)


def read_model(path: Path) -> tuple[bytes, _tflite_model.Model]:
    """The bytes of a ``.tflite`` (within the size limit) and its checked structure."""
    path = Path(path)
    try:
        buffer = read_limited(path, LIMITS.model_bytes, "TFLite model")
    except OSError as error:
        raise ModelError(f"cannot read {shown(str(path))}: {error.strerror or error}") from error
    return buffer, _tflite_model.read(buffer, shown(str(path)))


def precision(model: _tflite_model.Model) -> str:
    """From the tensors, as the converter leaves them: a quantized input or output is
    full-integer ``int8`` (a repaired int8 model may take a float input, never a float output:
    ``_tflite_repair.FLOAT_INPUT``); int8 weights with float input and output are ``dynamic``;
    float16 weights ``float16``; otherwise ``float32``."""
    if any(tensor.dtype in (np.uint8, np.int8) for tensor in (*model.inputs, *model.outputs)):
        return "int8"
    stored = {tensor.dtype for tensor in model.tensors}
    if np.int8 in stored:
        return "dynamic"
    return "float16" if np.float16 in stored else "float32"


def record(path: Path) -> ArtifactRecord:
    """The inspector's record of a ``.tflite`` file, read as data (no interpreter). A model
    without metadata is a record with no labels and no preprocessing (``install`` and the
    runners refuse it, each in one line)."""
    buffer, model = read_model(path)
    if not model.inputs or not model.outputs:
        raise ModelError(f"{shown(str(path))} has {len(model.inputs)} inputs and "
                         f"{len(model.outputs)} outputs; an image classifier has one of each")
    tensor = model.inputs[0]
    document, labels, packed, user_defined = _read_metadata(buffer, shown(str(path)))
    subgraph = (document.get("subgraph_metadata") or [{}])[0]
    input_md = (subgraph.get("input_tensor_metadata") or [{}])[0]
    output_md = (subgraph.get("output_tensor_metadata") or [{}])[0]
    details = {"associated_files": sorted([f.get("name"), f.get("type")]
                                          for f in _associated_files(document)),
               "packed_files": sorted(packed)}
    if tensor.dtype in (np.uint8, np.int8):
        scale, zero = tensor.quantization
        details["input_quantization"] = {"scale": float(scale), "zero_point": int(zero)}
    shape = list(tensor.shape)
    color = (input_md.get("content", {}).get("content_properties", {}).get("color_space")
             or "RGB")
    image = (ImageInput(input_md.get("name") or tensor.name, shape[2], shape[1], color,
                        np.dtype(tensor.dtype).name)
             if len(shape) == 4 and shape[3] == 3 else None)
    metadata = ({key: document.get(name) for key, name in
                 (("name", "name"), ("description", "description"), ("version", "version"),
                  ("author", "author"), ("license", "license"))} if document else {})
    return ArtifactRecord(
        target="tflite", format="tflite", precision=precision(model), labels=labels,
        input=image, preprocessing=_normalization(input_md),
        outputs=(output_md.get("name") or model.outputs[0].name,),
        metadata=metadata, user_defined=user_defined, details=details)


def _read_metadata(buffer: bytes, where: str) -> tuple[dict, tuple[str, ...], tuple[str, ...],
                                                        dict]:
    """(metadata document, labels, packed files, provenance); empty for a model without
    metadata."""
    from toolchain.dataset import parse_labels

    try:
        document = read_metadata(buffer, where)
        if not document:
            return {}, (), (), {}
        files = packed_files(buffer)
        labels = ()
        if LABEL_FILE in files:
            labels = check_labels(parse_labels(files[LABEL_FILE].decode("utf-8")), where)
        user_defined = {}
        if PROVENANCE_FILE in files:
            user_defined = load_json(files[PROVENANCE_FILE], f"{PROVENANCE_FILE} in {where}")
            if not isinstance(user_defined, dict):
                raise ValueError(f"{PROVENANCE_FILE} is not a JSON object")
            user_defined = {str(k): str(v) for k, v in user_defined.items()}
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, struct.error,
            zipfile.BadZipFile) as error:  # SchemaError is a ValueError
        raise ModelError(f"the TFLite metadata of {where} cannot be read ({first_line(error)})",
                         hint="convert the model with: toolchain convert") from error
    return document, labels, tuple(files), user_defined


def _normalization(tensor: dict) -> Preprocessing | None:
    """NormalizationOptions as the one Preprocessing object (None if absent or per-channel std,
    which one scale cannot express)."""
    for unit in tensor.get("process_units", []):
        if unit.get("options_type") == "NormalizationOptions":
            mean, std = unit["options"]["mean"], unit["options"]["std"]
            if len(std) == 1:
                std = std * 3
            if len(mean) == 1:
                mean = mean * 3
            if len(set(std)) != 1 or not std[0] > 0:
                return None
            scale = 1.0 / std[0]
            return Preprocessing(scale, tuple(-m * scale for m in mean))
    return None


def _associated_files(node) -> list:
    """Every ``associated_files`` entry anywhere in a metadata JSON document."""
    if isinstance(node, list):
        return [file for item in node for file in _associated_files(item)]
    if not isinstance(node, dict):
        return []
    return [file for key, value in node.items()
            for file in (value if key == "associated_files" else _associated_files(value))]
