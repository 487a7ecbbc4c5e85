"""A ``.tflite`` read as data: the parts of the model flatbuffer the inspector needs, every offset
and length checked against the file before it is followed.

Why not ``tf.lite.Interpreter``: TensorFlow 2.13's Python interpreter builds the model without
verifying the flatbuffer (``FlatBufferModel::BuildFromBuffer``), so a truncated file, a fuzzed
header or a root offset past the end kills the process with SIGSEGV, with nothing printed.
``install`` and ``label`` read a stranger's file, and the inspector must say what is wrong in one
line instead. Why not TensorFlow's generated Python schema code either: it follows offsets
unchecked, and Python reads a negative offset from the end of the buffer instead of failing.

So this module reads with the flatbuffers format's own rules, as the C++ verifier checks them:
the root and every table inside the file, a table's vtable inside the file and at most its
declared size, each field inside its table, each vector's elements and each string (with its
terminating zero) inside the file. Anything else is a ModelError naming what is out of bounds.
Only the tables the inspector reads are followed: the model's version, its first subgraph's
tensors (shape, type, name, quantization) and inputs and outputs, its buffers and metadata
entries. Running the model stays with the interpreter, in a child process for files a user
passes (``toolchain.measure``).

Field numbers are those of TensorFlow Lite's ``schema.fbs`` (tensorflow/lite/schema).
Underscored so the target registry does not take it for a target.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from toolchain.errors import ModelError
from toolchain.untrusted import check_input_side

#: TensorType (schema.fbs) → NumPy dtype, for the types an image classifier's tensors have.
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_,
                7: np.int16, 9: np.int8, 10: np.float64, 12: np.uint64, 15: np.uint32,
                16: np.uint16}
_NAMES = {5: "string", 8: "complex64", 11: "complex128", 13: "resource", 14: "variant",
          17: "int4"}
# Field numbers (slots) of the tables read here, from schema.fbs.
_MODEL_VERSION, _MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 0, 2, 4, 6
_GRAPH_TENSORS, _GRAPH_INPUTS, _GRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_QUANT = 0, 1, 2, 3, 4
_QUANT_SCALE, _QUANT_ZERO = 2, 3
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_META_NAME, _META_BUFFER = 0, 1


@dataclass(frozen=True)
class Tensor:
    """One tensor as the interpreter's ``get_tensor_details`` describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: type
    #: (scale, zero point) of a per-tensor quantized tensor; (0.0, 0) when not quantized.
    quantization: tuple[float, int]


@dataclass(frozen=True)
class Model:
    """What the inspector reads of a ``.tflite``: the first subgraph's tensors, inputs and
    outputs, and the metadata buffers by name."""

    tensors: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    metadata: dict[str, bytes]


class _Reader:
    """Checked reads of a flatbuffer: every position is inside ``data``."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.where = memoryview(data), where

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.where} is not a valid TFLite model: {what}",
                          hint="the file is truncated or damaged; convert it again")

    def get(self, fmt: str, position: int, what: str):
        size = struct.calcsize(fmt)
        if position < 0 or position + size > len(self.data):
            raise self.fail(f"{what} at byte {position} lies outside the file "
                            f"({len(self.data)} bytes)")
        return struct.unpack_from(fmt, self.data, position)[0]

    def table(self, position: int, what: str) -> _Table:
        """The table at ``position``: its vtable inside the file, no larger than declared."""
        vtable = position - self.get("<i", position, what)
        vtable_size = self.get("<H", vtable, f"{what}'s vtable")
        object_size = self.get("<H", vtable + 2, f"{what}'s vtable")
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > len(self.data):
            raise self.fail(f"{what}'s vtable has size {vtable_size}")
        if object_size < 4 or position + object_size > len(self.data):
            raise self.fail(f"{what} of {object_size} bytes lies outside the file")
        return _Table(self, position, vtable, vtable_size, object_size, what)

    def offset_target(self, position: int, what: str) -> int:
        return position + self.get("<I", position, what)


class _Table:
    def __init__(self, reader: _Reader, position: int, vtable: int, vtable_size: int,
                 object_size: int, what: str) -> None:
        self.reader, self.position, self.what = reader, position, what
        self.vtable, self.vtable_size, self.object_size = vtable, vtable_size, object_size

    def _field(self, slot: int, size: int) -> int | None:
        """The position of field ``slot``, or None when absent; inside the table."""
        entry = 4 + 2 * slot
        if entry + 2 > self.vtable_size:
            return None
        offset = self.reader.get("<H", self.vtable + entry, f"{self.what}'s vtable")
        if not offset:
            return None
        if offset + size > self.object_size:
            raise self.reader.fail(f"field {slot} of {self.what} lies outside its table")
        return self.position + offset

    def scalar(self, slot: int, fmt: str, default=0):
        position = self._field(slot, struct.calcsize(fmt))
        return default if position is None else self.reader.get(fmt, position, self.what)

    def table(self, slot: int, what: str) -> _Table | None:
        position = self._field(slot, 4)
        if position is None:
            return None
        return self.reader.table(self.reader.offset_target(position, what), what)

    def vector(self, slot: int, element_size: int, what: str) -> tuple[int, int]:
        """(first element's position, length) of a vector field; (0, 0) when absent."""
        position = self._field(slot, 4)
        if position is None:
            return 0, 0
        start = self.reader.offset_target(position, what)
        length = self.reader.get("<I", start, what)
        if start + 4 + length * element_size > len(self.reader.data):
            raise self.reader.fail(f"{what} of {length} elements lies outside the file")
        return start + 4, length

    def numbers(self, slot: int, fmt: str, what: str) -> list:
        start, length = self.vector(slot, struct.calcsize(fmt), what)
        return list(struct.unpack_from(f"<{length}{fmt[-1]}", self.reader.data, start)) \
            if length else []

    def tables(self, slot: int, what: str) -> list[_Table]:
        start, length = self.vector(slot, 4, what)
        return [self.reader.table(self.reader.offset_target(start + 4 * i, what), what)
                for i in range(length)]

    def string(self, slot: int, what: str) -> str:
        start, length = self.vector(slot, 1, what)
        if start and self.reader.get("<B", start + length, what) != 0:
            raise self.reader.fail(f"{what} is not terminated")
        return bytes(self.reader.data[start:start + length]).decode("utf-8", "replace")

    def bytes_of(self, slot: int, what: str) -> bytes:
        start, length = self.vector(slot, 1, what)
        return bytes(self.reader.data[start:start + length])


def read(data: bytes, where: str) -> Model:
    """The inspector's view of a ``.tflite`` in ``data``; a ModelError naming what is out of
    bounds, or what an image classifier cannot be (no subgraph, a tensor index past the end)."""
    reader = _Reader(data, where)
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise reader.fail("it does not carry the TFLite file identifier TFL3")
    model = reader.table(reader.offset_target(0, "the root"), "the model")
    if model.scalar(_MODEL_VERSION, "<I") != 3:
        raise reader.fail(f"schema version {model.scalar(_MODEL_VERSION, '<I')}, not 3")
    graphs = model.tables(_MODEL_SUBGRAPHS, "the subgraphs")
    if not graphs:
        raise reader.fail("it has no subgraph")
    graph = graphs[0]
    tensors = tuple(_tensor(table, i) for i, table in
                    enumerate(graph.tables(_GRAPH_TENSORS, "the tensors")))

    def pick(slot: int, what: str) -> tuple[Tensor, ...]:
        indices = graph.numbers(slot, "<i", what)
        if any(not 0 <= index < len(tensors) for index in indices):
            raise reader.fail(f"{what} name a tensor past the {len(tensors)} it has")
        return tuple(tensors[index] for index in indices)

    inputs, outputs = pick(_GRAPH_INPUTS, "the inputs"), pick(_GRAPH_OUTPUTS, "the outputs")
    for tensor in inputs:
        if len(tensor.shape) == 4:
            check_input_side(max(tensor.shape[1], tensor.shape[2]), where)
    return Model(tensors, inputs, outputs, _metadata(reader, model))


def _tensor(table: _Table, index: int) -> Tensor:
    what = f"tensor {index}"
    code = table.scalar(_TENSOR_TYPE, "<b")
    if code not in TENSOR_TYPES:
        raise table.reader.fail(f"{what} is of type {_NAMES.get(code, code)}, which an image "
                                "classifier does not use")
    shape = tuple(table.numbers(_TENSOR_SHAPE, "<i", f"{what}'s shape"))
    if any(size < -1 for size in shape):
        raise table.reader.fail(f"{what} has shape {list(shape)}")
    quantization = (0.0, 0)
    quant = table.table(_TENSOR_QUANT, f"{what}'s quantization")
    if quant is not None:
        scales = quant.numbers(_QUANT_SCALE, "<f", f"{what}'s scales")
        zeros = quant.numbers(_QUANT_ZERO, "<q", f"{what}'s zero points")
        if scales and zeros:
            quantization = (float(scales[0]), int(zeros[0]))
    name = table.string(_TENSOR_NAME, f"{what}'s name")
    return Tensor(name, shape, TENSOR_TYPES[code], quantization)


def _metadata(reader: _Reader, model: _Table) -> dict[str, bytes]:
    """Each metadata entry's buffer, by name: in the flatbuffer, or (models over 2 GB) at an
    offset after it, inside the file either way."""
    buffers = model.tables(_MODEL_BUFFERS, "the buffers")
    found = {}
    for entry in model.tables(_MODEL_METADATA, "the metadata"):
        name = entry.string(_META_NAME, "a metadata name")
        index = entry.scalar(_META_BUFFER, "<I")
        if index >= len(buffers):
            raise reader.fail(f"metadata {name!r} names buffer {index} of {len(buffers)}")
        buffer = buffers[index]
        data = buffer.bytes_of(_BUFFER_DATA, f"buffer {index}")
        offset, size = buffer.scalar(_BUFFER_OFFSET, "<Q"), buffer.scalar(_BUFFER_SIZE, "<Q")
        if not data and offset > 1:
            if offset + size > len(reader.data):
                raise reader.fail(f"buffer {index} lies outside the file")
            data = bytes(reader.data[offset:offset + size])
        found[name] = data
    return found
