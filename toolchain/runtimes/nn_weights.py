"""Reading a NeuralNetwork layer's weights (``WeightParams`` of NeuralNetwork.proto).

A layer's weights arrive as float32 values, float16 bytes, or 1-8 bit codes with a linear
(scale, bias per output channel) or lookup-table quantization, as coremltools'
``quantize_weights`` writes them. Each builder reads them once, at load time, as float32 (rounded
to float16 when the executor emulates float16 compute): the plan then only does arithmetic.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes.plan import to_float16
from toolchain.runtimes.registry import unsupported


class Weights:
    """``weights(params, shape, what)``: one layer's WeightParams as a float32 array."""

    def __init__(self, layer, half: bool) -> None:
        self.layer, self.half = layer, half

    def __call__(self, params, shape, what: str = "weights") -> np.ndarray:
        count = int(np.prod(shape))
        if len(params.floatValue):
            # A slice is one list copy; iterating the pure-Python protobuf field is ~3x slower.
            values = np.array(params.floatValue[:], dtype=np.float32)
        elif len(params.float16Value):
            values = np.frombuffer(params.float16Value, dtype="<f2").astype(np.float32)
        elif len(params.rawValue):
            values = self._dequantize(params, count, what)
        else:
            raise ModelError(f"layer {self.layer.name!r} has no {what}")
        if values.size != count:
            raise ModelError(f"layer {self.layer.name!r} has {values.size} {what}, "
                             f"expected {count} for shape {tuple(shape)}")
        values = values.reshape(shape)
        return to_float16(values) if self.half else values

    def _dequantize(self, params, count: int, what: str) -> np.ndarray:
        quantization = params.quantization
        kind, bits = quantization.WhichOneof("QuantizationType"), int(quantization.numberOfBits)
        if kind is None or not 1 <= bits <= 8:
            raise unsupported("layer", self.layer.WhichOneof("layer"), self.layer.name,
                              f"{what} stored as raw bytes without 1-8 bit quantization")
        codes = np.frombuffer(params.rawValue, dtype=np.uint8)
        if bits < 8:  # coremltools packs codes most significant bit first
            bits_array = np.unpackbits(codes)[:count * bits].reshape(-1, bits)
            codes = bits_array @ (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)
        codes = codes[:count]
        if kind == "lookupTableQuantization":
            table = np.float32(quantization.lookupTableQuantization.floatValue)
            if table.size < 2 ** bits:
                raise ModelError(f"layer {self.layer.name!r}: lookup table of {table.size} "
                                 f"values for {bits}-bit {what}")
            return table[codes]
        linear = quantization.linearQuantization
        scale, bias = np.float32(linear.scale), np.float32(linear.bias)
        if scale.size != bias.size or scale.size == 0 or count % scale.size:
            raise ModelError(f"layer {self.layer.name!r}: {scale.size} scales and {bias.size} "
                             f"biases do not fit {count} {what}")
        codes = codes.astype(np.float32).reshape(scale.size, -1)  # one row per output channel
        return (codes * scale[:, None] + bias[:, None]).reshape(-1)
