"""TFLite metadata: writing labels and normalisation into a ``.tflite``, and reading a file back.

Why metadata: the Android Task Library, MediaPipe Tasks and Android Studio's ML binding read the
labels, the input normalisation and the colour space from the model file itself, so an app
cannot pair the model with the wrong labels or the wrong preprocessing. Written with
tflite-support's metadata writers; read back with its ``MetadataDisplayer`` into the inspector's
record (:func:`record`), which the TFLite target's post-write check, ``install``, ``label`` and
the runners all use. Underscored so the target registry does not take it for a target.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from targets import ArtifactMetadata, ArtifactRecord, ImageInput, Source
from toolchain.backbones import Preprocessing
from toolchain.dataset import labels_text
from toolchain.errors import MissingSystemLibrary, ModelError, UsageError, first_line

LABEL_FILE = "labels.txt"
#: The model-level associated file that holds ``Source.user_defined`` (provenance), as JSON.
PROVENANCE_FILE = "provenance.json"
#: What the metadata names the input and output tensors (tflite-support's image classifier).
INPUT_NAME, OUTPUT_NAME = "image", "probability"


def support() -> SimpleNamespace:
    """tflite-support's modules; a missing libusb-1.0 becomes one line with a fix."""
    try:
        from tflite_support import metadata
        from tflite_support import metadata_schema_py_generated as schema
        from tflite_support.metadata_writers import image_classifier, metadata_info, writer_utils
        from tflite_support.task import core, processor, vision
    except (ImportError, OSError) as error:
        if "libusb" not in str(error):
            raise
        raise MissingSystemLibrary(
            "tflite-support needs the system library libusb-1.0-0, which is not installed",
            hint="on Debian/Ubuntu: apt-get install libusb-1.0-0") from error
    return SimpleNamespace(metadata=metadata, schema=schema, image_classifier=image_classifier,
                           info=metadata_info, writer_utils=writer_utils, core=core,
                           processor=processor, vision=vision)


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

    ``image_classifier.MetadataWriter.create_from_metadata_info`` cannot set name, description,
    version, author or license (its docstring points to ``create_from_metadata_info``) nor add a
    model-level file, so this builds the input and output metadata it would build, a
    ``GeneralMd``, and packs ``source.user_defined`` as ``provenance.json`` (a model-level
    DESCRIPTIONS file: the Task Library ignores it; Core ML keeps the same keys as its
    ``userDefined`` metadata). It holds, for a frozen graph, the normalisation used and where it
    came from.
    """
    lib, pre = support(), source.preprocessing
    info, classifier, types = lib.info, lib.image_classifier, lib.writer_utils
    with tempfile.TemporaryDirectory(prefix="tflite-labels-") as folder:
        labels_path = Path(folder) / LABEL_FILE  # the associated file takes this file's name
        labels_path.write_text(label_text(tuple(source.labels)), encoding="utf-8")
        provenance_path = Path(folder) / PROVENANCE_FILE
        provenance_path.write_text(json.dumps(
            {str(k): str(v) for k, v in sorted(source.user_defined.items())},
            ensure_ascii=False, indent=1), encoding="utf-8")
        model_md = info.GeneralMd(name=metadata.name, version=metadata.version,
                                  description=metadata.description, author=metadata.author,
                                  licenses=metadata.license).create_metadata()
        provenance = lib.schema.AssociatedFileT()
        provenance.name = PROVENANCE_FILE
        provenance.description = "Provenance: architecture, normalisation and its source."
        provenance.type = lib.schema.AssociatedFileType.DESCRIPTIONS
        model_md.associatedFiles = [provenance]
        input_md = info.InputImageTensorMd(
            name=INPUT_NAME, description=classifier.INPUT_DESCRIPTION,
            norm_mean=list(pre.mean), norm_std=list(pre.std),
            color_space_type=lib.schema.ColorSpaceType.RGB,
            tensor_type=types.get_input_tensor_types(model)[0])
        output_md = info.ClassificationTensorMd(
            name=OUTPUT_NAME, description=classifier.OUTPUT_DESCRIPTION,
            label_files=[info.LabelFileMd(file_path=str(labels_path))],
            tensor_type=types.get_output_tensor_types(model)[0])
        # the base class's create_from_metadata (tflite_support does not export its module)
        writer = classifier.MetadataWriter.create_from_metadata(
            bytearray(model), model_md, [input_md.create_metadata()],
            [output_md.create_metadata()],
            associated_files=[str(labels_path), str(provenance_path)])
        return bytes(writer.populate())


def record(path: Path, precision: str) -> ArtifactRecord:
    """The inspector's record of a ``.tflite`` file. A model without metadata is a record with
    no labels and no preprocessing (``install`` and the runners refuse it, each in one line)."""
    import tensorflow as tf

    lib = support()
    buffer = Path(path).read_bytes()
    interpreter = tf.lite.Interpreter(model_content=buffer)
    tensor = interpreter.get_input_details()[0]
    document, labels, packed, user_defined = _read_metadata(lib, buffer)
    subgraph = (document.get("subgraph_metadata") or [{}])[0]
    input_md = (subgraph.get("input_tensor_metadata") or [{}])[0]
    output_md = (subgraph.get("output_tensor_metadata") or [{}])[0]
    details = {"associated_files": sorted([f.get("name"), f.get("type")]
                                          for f in _associated_files(document)),
               "packed_files": sorted(packed)}
    if tensor["dtype"] in (np.uint8, np.int8):
        scale, zero = tensor["quantization"]
        details["input_quantization"] = {"scale": float(scale), "zero_point": int(zero)}
    shape = [int(d) for d in tensor["shape"]]
    color = (input_md.get("content", {}).get("content_properties", {}).get("color_space")
             or "RGB")
    image = (ImageInput(input_md.get("name") or tensor["name"], shape[2], shape[1], color,
                        np.dtype(tensor["dtype"]).name)
             if len(shape) == 4 and shape[3] == 3 else None)
    metadata = ({key: document.get(name) for key, name in
                 (("name", "name"), ("description", "description"), ("version", "version"),
                  ("author", "author"), ("license", "license"))} if document else {})
    return ArtifactRecord(
        target="tflite", format="tflite", precision=precision, labels=labels, input=image,
        preprocessing=_normalization(input_md),
        outputs=(output_md.get("name") or interpreter.get_output_details()[0]["name"],),
        metadata=metadata, user_defined=user_defined, details=details)


def _read_metadata(lib, buffer: bytes) -> tuple[dict, tuple[str, ...], tuple[str, ...], dict]:
    """(metadata document, labels, packed files, provenance); empty for a model without
    metadata."""
    from toolchain.dataset import parse_labels

    try:
        displayer = lib.metadata.MetadataDisplayer.with_model_buffer(buffer)
    except ValueError:  # "The model does not have metadata."
        return {}, (), (), {}
    try:
        document = json.loads(displayer.get_metadata_json())
        packed = tuple(displayer.get_packed_associated_file_list())
        labels = ()
        if LABEL_FILE in packed:
            labels = parse_labels(displayer.get_associated_file_buffer(LABEL_FILE)
                                  .decode("utf-8"))
        user_defined = {}
        if PROVENANCE_FILE in packed:
            user_defined = json.loads(displayer.get_associated_file_buffer(PROVENANCE_FILE)
                                      .decode("utf-8"))
            if not isinstance(user_defined, dict):
                raise ValueError(f"{PROVENANCE_FILE} is not a JSON object")
            user_defined = {str(k): str(v) for k, v in user_defined.items()}
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as error:
        raise ModelError(f"the TFLite metadata cannot be read ({first_line(error)})",
                         hint="convert the model with: toolchain convert") from error
    return document, labels, packed, user_defined


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
