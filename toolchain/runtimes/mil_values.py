"""Reading ML Program values: immediate tensors and lists, and tensors in the weights file.

An ML Program (``spec.mlProgram``) keeps small constants inline in the spec and large ones in
the package's blob file (``Data/com.apple.CoreML/weights/weight.bin``), read here through
coremltools' ``BlobStorageReader``. Values come back as NumPy arrays of the declared dtype and
shape (strings as str / object arrays, lists as lists), float16 still float16: what the
constants mean for compute (float32, rounded or not) is the lowering's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes.registry import unsupported

_NUMPY = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "BOOL": np.bool_,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
_BLOB_READ = {"FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data",
              "INT8": "read_int8_data", "UINT8": "read_uint8_data", "INT16": "read_int16_data",
              "UINT16": "read_uint16_data", "INT32": "read_int32_data",
              "UINT32": "read_uint32_data"}


def dims(tensor_type) -> tuple:
    """The declared shape of a MIL tensor type: sizes, None where a dimension is not fixed."""
    return tuple(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None
                 for d in tensor_type.dimensions)


class Values:
    """Reads MIL values: immediate tensors, lists, and tensors stored in the weights blob file."""

    def __init__(self, weights_dir: Path | None) -> None:
        self.weights_dir, self._readers = weights_dir, {}

    def read(self, value, op_type: str, name: str) -> Any:
        from coremltools.proto import MIL_pb2

        kind = value.type.WhichOneof("type")
        if kind == "listType":
            return [self.read(item, op_type, name) for item in value.immediateValue.list.values]
        if kind != "tensorType":
            raise unsupported("op", op_type, name, f"a {kind} value")
        tensor_type = value.type.tensorType
        dtype = MIL_pb2.DataType.Name(tensor_type.dataType)
        shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
        if dtype == "STRING":
            strings = list(value.immediateValue.tensor.strings.values)
            return strings[0] if not shape else np.array(strings, dtype=object).reshape(shape)
        if dtype not in _NUMPY:
            raise unsupported("op", op_type, name, f"{dtype.lower()} values")
        if value.WhichOneof("value") == "blobFileValue":
            data = self._blob(value.blobFileValue, dtype, op_type, name)
        else:
            tensor = value.immediateValue.tensor
            source = tensor.WhichOneof("value")
            if source == "bytes":
                data = np.frombuffer(tensor.bytes.values, _NUMPY[dtype])
            else:
                data = np.array(getattr(tensor, source).values if source else [], _NUMPY[dtype])
        return data.astype(_NUMPY[dtype], copy=False).reshape(shape)

    def _blob(self, blob, dtype: str, op_type: str, name: str) -> np.ndarray:
        if dtype not in _BLOB_READ:
            raise unsupported("op", op_type, name, f"{dtype.lower()} weights in the blob file")
        name = blob.fileName.split("/")[-1]
        path = Path(self.weights_dir or "") / name
        if path not in self._readers:
            # a plain file name inside the package's weights folder (checked: files.check_package)
            if self.weights_dir is None or name in ("", ".", "..") or not path.is_file():
                raise ModelError(f"the ML Program's weights file {path.name} is missing "
                                 f"(op {name!r} needs it)")
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._readers[path] = _BlobStorageReader(str(path))
        data = getattr(self._readers[path], _BLOB_READ[dtype])(blob.offset)
        # A copy: the reader's arrays may point into its memory, which ends with it.
        return np.frombuffer(data.tobytes(), _NUMPY[dtype]).copy()


def weights_dir(path) -> Path | None:
    """The package's weights folder (found as coremltools' MLModel finds it)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        return None
    from coremltools.models.utils import _try_get_weights_dir_path

    found = _try_get_weights_dir_path(str(path))
    return Path(found) if found else path / "Data" / "com.apple.CoreML" / "weights"
