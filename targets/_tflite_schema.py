"""The TFLite metadata schema as data, and a flatbuffers codec for it: ours, on every platform.

Why our own: tflite-support, whose generated Python code and writers are the usual way to
write this metadata, has wheels only for x86-64 and Python ≤ 3.11 (no Apple Silicon), and it
pins protobuf below 4, which keeps Core ML's ``.mlmodel`` serialisation on pure-Python protobuf.
The metadata itself is a plain flatbuffer (file identifier ``M001``) described by
``metadata_schema.fbs``, which the Android Task Library, MediaPipe Tasks and LiteRT all read; the
``flatbuffers`` package (a TensorFlow dependency) is all it takes to write and read it.

:data:`TABLES` lists each table's fields in declaration order (a union takes two slots: its type,
then its value). :func:`encode` packs a document in the order the generated ``Pack`` methods use,
so the bytes are the bytes tflite-support writes (tests/targets/test_tflite_schema.py compares
them); :func:`decode` reads one back into the JSON form tflite-support's ``MetadataDisplayer``
prints (snake_case names, enum names, ``<union>_type`` keys), ignoring fields a newer schema may
add. See docs/ARCHITECTURE.md, "TFLite metadata".
"""

from __future__ import annotations

import struct

import flatbuffers
from flatbuffers import number_types as N
from flatbuffers.table import Table

FILE_IDENTIFIER = b"M001"
#: What the TFLite model's ``metadata`` entry that points at this buffer is called.
METADATA_FIELD = "TFLITE_METADATA"
#: The oldest parser that reads every field :func:`encode` is given by this project's writer
#: (tflite-support computes it per document; everything we write is in schema version 1.0.0).
MIN_PARSER_VERSION = "1.0.0"

ENUMS: dict[str, tuple[str, ...]] = {
    "AssociatedFileType": ("UNKNOWN", "DESCRIPTIONS", "TENSOR_AXIS_LABELS",
                           "TENSOR_VALUE_LABELS", "TENSOR_AXIS_SCORE_CALIBRATION", "VOCABULARY",
                           "SCANN_INDEX_FILE"),
    "ColorSpaceType": ("UNKNOWN", "RGB", "GRAYSCALE"),
    "BoundingBoxType": ("UNKNOWN", "BOUNDARIES", "UPPER_LEFT", "CENTER"),
    "CoordinateType": ("RATIO", "PIXEL"),
    "ScoreTransformationType": ("IDENTITY", "LOG", "INVERSE_LOGISTIC"),
}
#: Union members, by type value (0 is NONE).
UNIONS: dict[str, tuple[str, ...]] = {
    "ContentProperties": ("NONE", "FeatureProperties", "ImageProperties",
                          "BoundingBoxProperties", "AudioProperties"),
    "ProcessUnitOptions": ("NONE", "NormalizationOptions", "ScoreCalibrationOptions",
                           "ScoreThresholdingOptions", "BertTokenizerOptions",
                           "SentencePieceTokenizerOptions", "RegexTokenizerOptions"),
}
#: Field kinds: "string", "uint", "int", "float", "enum:<Enum>", "table:<Table>",
#: "union:<Union>", and "[...]" for a vector of one of string, uint, float, ubyte, table.
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "AssociatedFile": (("name", "string"), ("description", "string"),
                       ("type", "enum:AssociatedFileType"), ("locale", "string"),
                       ("version", "string")),
    "FeatureProperties": (),
    "ImageSize": (("width", "uint"), ("height", "uint")),
    "ImageProperties": (("color_space", "enum:ColorSpaceType"),
                        ("default_size", "table:ImageSize")),
    "AudioProperties": (("sample_rate", "uint"), ("channels", "uint")),
    "BoundingBoxProperties": (("index", "[uint]"), ("type", "enum:BoundingBoxType"),
                              ("coordinate_type", "enum:CoordinateType")),
    "ValueRange": (("min", "int"), ("max", "int")),
    "Content": (("content_properties", "union:ContentProperties"),
                ("range", "table:ValueRange")),
    "NormalizationOptions": (("mean", "[float]"), ("std", "[float]")),
    "ScoreCalibrationOptions": (("score_transformation", "enum:ScoreTransformationType"),
                                ("default_score", "float")),
    "ScoreThresholdingOptions": (("global_score_threshold", "float"),),
    "BertTokenizerOptions": (("vocab_file", "[table:AssociatedFile]"),),
    "SentencePieceTokenizerOptions": (("sentencePiece_model", "[table:AssociatedFile]"),
                                      ("vocab_file", "[table:AssociatedFile]")),
    "RegexTokenizerOptions": (("delim_regex_pattern", "string"),
                              ("vocab_file", "[table:AssociatedFile]")),
    "ProcessUnit": (("options", "union:ProcessUnitOptions"),),
    "Stats": (("max", "[float]"), ("min", "[float]")),
    "TensorGroup": (("name", "string"), ("tensor_names", "[string]")),
    "TensorMetadata": (("name", "string"), ("description", "string"),
                       ("dimension_names", "[string]"), ("content", "table:Content"),
                       ("process_units", "[table:ProcessUnit]"), ("stats", "table:Stats"),
                       ("associated_files", "[table:AssociatedFile]")),
    "CustomMetadata": (("name", "string"), ("data", "[ubyte]")),
    "SubGraphMetadata": (("name", "string"), ("description", "string"),
                         ("input_tensor_metadata", "[table:TensorMetadata]"),
                         ("output_tensor_metadata", "[table:TensorMetadata]"),
                         ("associated_files", "[table:AssociatedFile]"),
                         ("input_process_units", "[table:ProcessUnit]"),
                         ("output_process_units", "[table:ProcessUnit]"),
                         ("input_tensor_groups", "[table:TensorGroup]"),
                         ("output_tensor_groups", "[table:TensorGroup]"),
                         ("custom_metadata", "[table:CustomMetadata]")),
    "ModelMetadata": (("name", "string"), ("description", "string"), ("version", "string"),
                      ("subgraph_metadata", "[table:SubGraphMetadata]"), ("author", "string"),
                      ("license", "string"), ("associated_files", "[table:AssociatedFile]"),
                      ("min_parser_version", "string")),
}
_SCALARS = {"uint": N.Uint32Flags, "int": N.Int32Flags, "float": N.Float32Flags,
            "enum": N.Int8Flags, "ubyte": N.Uint8Flags}
_PREPEND = {"uint": "PrependUint32", "float": "PrependFloat32", "ubyte": "PrependUint8"}


class SchemaError(ValueError):
    """A document or buffer that does not fit the metadata schema."""


def _slots(table: str):
    """(name, kind, slot) per field; a union's type takes the slot before its value's."""
    slot = 0
    for name, kind in TABLES[table]:
        if kind.startswith("union:"):
            yield name, kind, slot + 1
            slot += 2
        else:
            yield name, kind, slot
            slot += 1


def _slot_count(table: str) -> int:
    return sum(2 if kind.startswith("union:") else 1 for _, kind in TABLES[table])


def encode(document: dict, table: str = "ModelMetadata") -> bytes:
    """``document`` (the displayer's JSON form) as a finished metadata flatbuffer."""
    builder = flatbuffers.Builder(0)
    builder.Finish(_pack(builder, table, document), FILE_IDENTIFIER)
    return bytes(builder.Output())


def _pack(builder: flatbuffers.Builder, table: str, value: dict) -> int:
    if not isinstance(value, dict):
        raise SchemaError(f"{table} must be an object, not {type(value).__name__}")
    unknown = set(value) - {name for name, _ in TABLES[table]} - {
        f"{name}_type" for name, kind in TABLES[table] if kind.startswith("union:")}
    if unknown:
        raise SchemaError(f"{table} has no field {', '.join(sorted(unknown))}")
    offsets: dict[str, int] = {}
    for name, kind, _ in _slots(table):  # children first, in declaration order, as Pack does
        if value.get(name) is not None:
            offset = _child(builder, name, kind, value)
            if offset is not None:
                offsets[name] = offset
    builder.StartObject(_slot_count(table))
    for name, kind, slot in _slots(table):
        item = value.get(name)
        if kind.startswith("union:"):
            builder.PrependUint8Slot(slot - 1, _union_type(kind[6:], value, name), 0)
        elif item is None:
            continue
        if name in offsets:
            builder.PrependUOffsetTRelativeSlot(slot, offsets[name], 0)
        elif kind.startswith("enum:"):
            builder.PrependInt8Slot(slot, _enum_value(kind[5:], item), 0)
        elif kind in ("uint", "int", "float"):
            getattr(builder, {"uint": "PrependUint32Slot", "int": "PrependInt32Slot",
                              "float": "PrependFloat32Slot"}[kind])(slot, item, 0)
    return builder.EndObject()


def _child(builder: flatbuffers.Builder, name: str, kind: str, value: dict) -> int | None:
    """The offset of a field stored out of line (string, table, vector); None for a scalar."""
    item = value[name]
    if kind == "string":
        return builder.CreateString(item)
    if kind.startswith("table:"):
        return _pack(builder, kind[6:], item)
    if kind.startswith("union:"):
        member = UNIONS[kind[6:]][_union_type(kind[6:], value, name)]
        return _pack(builder, member, item)
    if not kind.startswith("[") or not isinstance(item, list):
        return None  # a scalar: added in place
    element = kind[1:-1]
    if element == "string" or element.startswith("table:"):
        offsets = [builder.CreateString(x) if element == "string" else
                   _pack(builder, element[6:], x) for x in item]
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()
    size = 1 if element == "ubyte" else 4
    builder.StartVector(size, len(item), 16 if element == "ubyte" else size)
    for number in reversed(item):
        getattr(builder, _PREPEND[element])(number)
    return builder.EndVector()


def _union_type(union: str, value: dict, name: str) -> int:
    said = value.get(f"{name}_type", "NONE" if value.get(name) is None else None)
    if said not in UNIONS[union]:
        raise SchemaError(f"{name}_type must be one of {', '.join(UNIONS[union][1:])}")
    return UNIONS[union].index(said)


def _enum_value(enum: str, item) -> int:
    if item not in ENUMS[enum]:
        raise SchemaError(f"{item!r} is not a {enum} ({', '.join(ENUMS[enum])})")
    return ENUMS[enum].index(item)


def decode(buffer: bytes, table: str = "ModelMetadata") -> dict:
    """A metadata flatbuffer as the displayer's JSON form; SchemaError when it is not one."""
    buffer = bytes(buffer)
    if len(buffer) < 8 or buffer[4:8] != FILE_IDENTIFIER:
        raise SchemaError("the metadata buffer does not carry the file identifier M001")
    try:
        root = flatbuffers.encode.Get(N.UOffsetTFlags.packer_type, buffer, 0)
        return _unpack(Table(buffer, root), table)
    except (IndexError, UnicodeDecodeError, ValueError, TypeError, struct.error) as error:
        raise SchemaError(f"the metadata buffer is corrupt ({error})") from error


def _unpack(tab: Table, table: str) -> dict:
    out: dict = {}
    for name, kind, slot in _slots(table):
        offset = tab.Offset(4 + 2 * slot)
        if kind.startswith("union:"):
            type_offset = tab.Offset(4 + 2 * (slot - 1))
            member = tab.Get(N.Uint8Flags, type_offset + tab.Pos) if type_offset else 0
            if member:
                members = UNIONS[kind[6:]]
                out[f"{name}_type"] = members[member] if member < len(members) else member
            if offset and member and member < len(UNIONS[kind[6:]]):
                out[name] = _unpack(_table_at(tab, offset + tab.Pos), UNIONS[kind[6:]][member])
            continue
        if not offset:
            continue
        if kind == "string":
            out[name] = tab.String(offset + tab.Pos).decode("utf-8")
        elif kind.startswith("table:"):
            out[name] = _unpack(_table_at(tab, offset + tab.Pos), kind[6:])
        elif kind.startswith("["):
            out[name] = _vector(tab, offset, kind[1:-1])
        else:
            number = tab.Get(_SCALARS[kind.split(":")[0]], offset + tab.Pos)
            if kind.startswith("enum:"):
                names = ENUMS[kind[5:]]
                number = names[number] if 0 <= number < len(names) else number
            out[name] = number
    return out


def _table_at(tab: Table, position: int) -> Table:
    return Table(tab.Bytes, tab.Indirect(position))


def _vector(tab: Table, offset: int, element: str) -> list:
    start, length = tab.Vector(offset), tab.VectorLen(offset)
    if element == "string":
        return [tab.String(start + 4 * i).decode("utf-8") for i in range(length)]
    if element.startswith("table:"):
        return [_unpack(_table_at(tab, start + 4 * i), element[6:]) for i in range(length)]
    size = 1 if element == "ubyte" else 4
    return [tab.Get(_SCALARS[element], start + size * i) for i in range(length)]
