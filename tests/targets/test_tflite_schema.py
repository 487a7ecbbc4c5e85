"""Our TFLite metadata writer and reader (targets/_tflite_schema.py, targets/_tflite_metadata.py)
against tflite-support's, and against committed golden buffers where tflite-support is absent.

The chain of proof: where tflite-support is installed, its image classifier writer and our
encoder give the same bytes for the same model and labels, and those bytes are the committed
golden files; where it is not (macOS arm64, the suite's run without it), our encoder still gives
the golden bytes. So the metadata is the same on every platform.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from targets import _tflite_metadata as md
from targets import _tflite_schema as schema
from targets.tflite import TFLiteTarget
from tests.helpers import METADATA
from toolchain.backbones import Preprocessing
from toolchain.errors import ModelError

GOLDEN = Path(__file__).parent / "golden"
#: MobileNet's [-1, 1] normalisation (mean 127.5, std 127.5), and Inception's per-channel-free
#: [0, 1] one, so both a centred and a zero mean are written.
PREPROCESSINGS = {"mobilenet": Preprocessing(1 / 127.5, (-1.0, -1.0, -1.0)),
                  "unit": Preprocessing(1 / 255.0, (0.0, 0.0, 0.0))}
TYPES = {"float32": (md.FLOAT32, md.FLOAT32), "uint8": (md.UINT8, md.UINT8)}
CASES = [(pre, kind) for pre in PREPROCESSINGS for kind in TYPES]


def _golden(pre: str, kind: str) -> Path:
    return GOLDEN / f"tflite-metadata-{pre}-{kind}.bin"


def _tflite_support():
    return pytest.importorskip(
        "tflite_support.metadata_writers",
        reason="tflite-support is not installed here (it has wheels only for x86-64); the "
               "golden files stand for it")


@pytest.fixture(scope="module")
def tiny_model() -> bytes:
    """A float32 TFLite model with one image input and one output, without metadata."""
    import tensorflow as tf

    function = tf.function(lambda x: tf.reduce_mean(x, axis=[1, 2])).get_concrete_function(
        tf.TensorSpec([1, 8, 8, 3], tf.float32))
    return tf.lite.TFLiteConverter.from_concrete_functions([function]).convert()


def _theirs(model: bytes, pre: Preprocessing, input_type: int, output_type: int,
            folder: Path) -> bytes:
    """What tflite-support's image classifier writer writes for the same model and metadata:
    the writer this project used before its own (kept here as the reference)."""
    _tflite_support()
    from tflite_support import metadata_schema_py_generated as fb
    from tflite_support.metadata_writers import image_classifier
    from tflite_support.metadata_writers import metadata_info as info

    labels = folder / md.LABEL_FILE
    labels.write_text("daisy\nrose\n", encoding="utf-8")
    provenance = folder / md.PROVENANCE_FILE
    provenance.write_text("{}", encoding="utf-8")
    model_md = info.GeneralMd(name=METADATA.name, version=METADATA.version,
                              description=METADATA.description, author=METADATA.author,
                              licenses=METADATA.license).create_metadata()
    packed = fb.AssociatedFileT()
    packed.name = md.PROVENANCE_FILE
    packed.description = md.PROVENANCE_DESCRIPTION
    packed.type = fb.AssociatedFileType.DESCRIPTIONS
    model_md.associatedFiles = [packed]
    input_md = info.InputImageTensorMd(
        name=md.INPUT_NAME, description=image_classifier.INPUT_DESCRIPTION,
        norm_mean=list(pre.mean), norm_std=list(pre.std),
        color_space_type=fb.ColorSpaceType.RGB, tensor_type=input_type)
    output_md = info.ClassificationTensorMd(
        name=md.OUTPUT_NAME, description=image_classifier.OUTPUT_DESCRIPTION,
        label_files=[info.LabelFileMd(file_path=str(labels))], tensor_type=output_type)
    writer = image_classifier.MetadataWriter.create_from_metadata(
        bytearray(model), model_md, [input_md.create_metadata()],
        [output_md.create_metadata()], associated_files=[str(labels), str(provenance)])
    return bytes(writer.populate())


@pytest.mark.parametrize(("pre", "kind"), CASES)
def test_our_metadata_is_the_committed_golden(pre, kind):
    """Runs with or without tflite-support: the golden bytes are tflite-support's (next test)."""
    ours = schema.encode(md.document(PREPROCESSINGS[pre], METADATA, *TYPES[kind]))
    assert ours == _golden(pre, kind).read_bytes()


@pytest.mark.parametrize(("pre", "kind"), CASES)
def test_tflite_support_writes_the_same_metadata_bytes(pre, kind, tiny_model, tmp_path):
    _tflite_support()
    theirs = _theirs(tiny_model, PREPROCESSINGS[pre], *TYPES[kind], tmp_path)
    from tflite_support import metadata

    displayer = metadata.MetadataDisplayer.with_model_buffer(theirs)
    their_buffer = bytes(displayer.get_metadata_buffer())
    ours = schema.encode(md.document(PREPROCESSINGS[pre], METADATA, *TYPES[kind]))
    assert ours == their_buffer == _golden(pre, kind).read_bytes()
    assert schema.decode(their_buffer) == json.loads(displayer.get_metadata_json())


def test_a_model_we_write_is_read_by_tflite_support_as_one_it_wrote(tiny_model, tmp_path):
    """The whole file: the same metadata, the same packed files with the same bytes, and the
    same model otherwise (tensors, operators, buffers)."""
    _tflite_support()
    from tflite_support import metadata

    pre = PREPROCESSINGS["mobilenet"]
    theirs = _theirs(tiny_model, pre, md.FLOAT32, md.FLOAT32, tmp_path)
    ours = md.populate(tiny_model, schema.encode(md.document(pre, METADATA, md.FLOAT32,
                                                             md.FLOAT32)),
                       {md.LABEL_FILE: b"daisy\nrose\n", md.PROVENANCE_FILE: b"{}"})
    read = [metadata.MetadataDisplayer.with_model_buffer(model) for model in (theirs, ours)]
    assert read[0].get_metadata_json() == read[1].get_metadata_json()
    assert read[0].get_packed_associated_file_list() == read[1].get_packed_associated_file_list()
    for name in (md.LABEL_FILE, md.PROVENANCE_FILE):
        assert (read[0].get_associated_file_buffer(name)
                == read[1].get_associated_file_buffer(name) == md.packed_files(ours)[name])
    assert _model_part(ours) == _model_part(theirs)


def _model_part(model: bytes) -> bytes:
    """The flatbuffer without the zip appended to it."""
    with zipfile.ZipFile(io.BytesIO(model)) as packed:
        first = min(info.header_offset for info in packed.infolist())
    return model[:first] if first else model[:model.index(b"PK\x03\x04")]


def test_the_same_model_gives_the_same_bytes(tiny_model):
    """A fixed zip timestamp: two builds of one model and labels are byte-identical."""
    buffer = schema.encode(md.document(PREPROCESSINGS["unit"], METADATA, md.FLOAT32, md.FLOAT32))
    files = {md.LABEL_FILE: b"a\nb\n"}
    assert md.populate(tiny_model, buffer, files) == md.populate(tiny_model, buffer, files)


def test_every_kind_of_field_survives_a_round_trip():
    document = {
        "name": "n", "description": "", "version": "v1",
        "subgraph_metadata": [{
            "name": "graph",
            "input_tensor_metadata": [{
                "name": "boxes", "dimension_names": ["batch", "box"],
                "content": {"content_properties_type": "BoundingBoxProperties",
                            "content_properties": {"index": [1, 0, 3, 2], "type": "CENTER",
                                                   "coordinate_type": "PIXEL"},
                            "range": {"min": -2, "max": 5}},
                "process_units": [{"options_type": "ScoreCalibrationOptions",
                                   "options": {"score_transformation": "LOG",
                                               "default_score": 0.25}}],
                "stats": {"max": [0.5], "min": [-0.5]}}],
            "output_tensor_metadata": [{
                "content": {"content_properties_type": "ImageProperties",
                            "content_properties": {"color_space": "GRAYSCALE",
                                                   "default_size": {"width": 7, "height": 9}}},
                "associated_files": [{"name": "l.txt", "type": "TENSOR_VALUE_LABELS",
                                      "locale": "fr", "version": "2"}]}],
            "input_tensor_groups": [{"name": "g", "tensor_names": ["boxes"]}],
            "custom_metadata": [{"name": "c", "data": [0, 255, 7]}]}],
        "min_parser_version": "1.0.0"}
    assert schema.decode(schema.encode(document)) == document


def test_a_document_that_does_not_fit_the_schema_is_refused():
    with pytest.raises(schema.SchemaError, match="ModelMetadata has no field colour"):
        schema.encode({"colour": "red"})
    with pytest.raises(schema.SchemaError, match="'PURPLE' is not a ColorSpaceType"):
        schema.encode({"subgraph_metadata": [{"input_tensor_metadata": [{"content": {
            "content_properties_type": "ImageProperties",
            "content_properties": {"color_space": "PURPLE"}}}]}]})


def test_a_corrupt_metadata_buffer_is_one_line(tiny_model, tmp_path):
    good = schema.encode(md.document(PREPROCESSINGS["unit"], METADATA, md.FLOAT32, md.FLOAT32))
    with pytest.raises(schema.SchemaError, match="file identifier M001"):
        schema.decode(good[:4] + b"XXXX" + good[8:])
    with pytest.raises(schema.SchemaError, match="corrupt"):
        schema.decode(good[:8] + b"\xff" * 64)
    path = tmp_path / "model_float32.tflite"
    path.write_bytes(md.populate(tiny_model, good[:4] + b"XXXX" + good[8:],
                                 {md.LABEL_FILE: b"a\nb\n"}))
    with pytest.raises(ModelError) as info:
        TFLiteTarget().inspect(path)
    assert str(info.value) == (f"the TFLite metadata of {path} cannot be read (the metadata "
                               "buffer does not carry the file identifier M001)")
