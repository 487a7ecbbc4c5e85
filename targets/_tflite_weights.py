"""Diagnosis of TFLite's weight-only variants, ``dynamic`` (int8 weights) and ``float16``
(the TFLite target's stage for them; docs/ARCHITECTURE.md, "Quantization: diagnosis and
repair").

TFLite's ``QuantizationDebugger`` handles full-integer models only, and the converter has no
per-layer switch for these two variants, so the layers are diagnosed on the float32 model
instead: one layer at a time, its weights are replaced in the flatbuffer by what the variant
stores for them (the int8 codes and scales read from the dynamic model itself, expanded; or the
float16 rounding), and the model is run. On TFLite's CPU kernels that is exactly what a float16
model computes (its weights are expanded to float32 at load); for ``dynamic`` it leaves out the
on-the-fly int8 rounding of activations that the hybrid kernels add, so its "harm alone" is the
weights' share. The plain artifact itself is what is measured on the tuning set. There is no
repair: no per-layer float fallback exists for these variants (``model_int8_mixed.tflite`` is
the int8 one), and the record says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from targets import Source
from targets._repair import Repair, rmse_per_step, search
from targets._tflite_repair import float32_model, probabilities
from targets._tuning import original, tuning_set
from toolchain.errors import ConversionError, first_line

#: The ops whose constant weights (input 1) the weight-only variants store small.
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
NO_REPAIR = ("TFLite keeps no layer in float in a {variant} model; an int8 model "
             "(model_int8_mixed.tflite) or float32 can")


def _schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def _weights(model_bytes: bytes):
    """(op, output name, weights tensor, its bytes' offset and length) of each op in
    :data:`WEIGHT_OPS` whose weights are a constant in the file."""
    schema = _schema()
    model = schema.Model.GetRootAs(model_bytes, 0)
    graph = model.Subgraphs(0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        code = model.OperatorCodes(operator.OpcodeIndex())
        op = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "")
        if op not in WEIGHT_OPS or operator.InputsLength() < 2:
            continue
        tensor = graph.Tensors(operator.Inputs(1))
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength() == 0:
            continue
        field = buffer._tab.Offset(4)  # Buffer.data
        yield (op, graph.Tensors(operator.Outputs(0)).Name().decode("utf-8"), tensor,
               buffer._tab.Vector(field), buffer._tab.VectorLen(field))


def _int8_weights(artifact: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What a dynamic model stores for each quantized layer's weights, expanded to float32,
    and its step (the scale, per channel or per tensor as the converter chose), by layer."""
    schema = _schema()
    found = {}
    for _, name, tensor, start, length in _weights(artifact):
        quantization = tensor.Quantization()
        if tensor.Type() != schema.TensorType.INT8 or quantization is None:
            continue
        codes = np.frombuffer(artifact, np.int8, length, start).astype(np.float32)
        codes = codes.reshape(tensor.ShapeAsNumpy())
        scale = quantization.ScaleAsNumpy().astype(np.float32)
        shape = [1] * codes.ndim
        if scale.size > 1:
            shape[quantization.QuantizedDimension()] = scale.size
        step = np.broadcast_to(scale.reshape(shape), codes.shape)
        found[name] = (codes * step, step)
    return found


class _Candidates:
    """The plain artifact, and the float32 model with one layer's weights as the variant
    stores them."""

    quantizes_activations = False  # dynamic and float16 store weights only

    def __init__(self, artifact: bytes, float32: bytes, variant: str,
                 preprocessing) -> None:
        schema = _schema()
        self.artifact, self.float32, self.preprocessing = artifact, float32, preprocessing
        stored_int8 = _int8_weights(artifact) if variant == "dynamic" else {}
        #: layer (its op's output tensor) → (op, where the weights are in the file, what the
        #: variant stores for them, its step, the float32 weights)
        self._layers: dict[str, tuple] = {}
        for op, name, tensor, start, length in _weights(float32):
            if tensor.Type() != schema.TensorType.FLOAT32:
                continue
            values = np.frombuffer(float32, "<f4", length // 4, start).reshape(
                tensor.ShapeAsNumpy())
            if variant == "float16":  # every float weight is stored as float16
                stored = values.astype(np.float16).astype(np.float32)
                step = np.spacing(np.abs(values).astype(np.float16)).astype(np.float32)
            elif name in stored_int8:  # what the converter quantized (large weights only)
                stored, step = stored_int8[name]
            else:
                continue
            self._layers[name] = (op, start, stored, step, values)

    def layer_errors(self) -> list[tuple[str, str, float]]:
        return [(name, op, rmse_per_step(values, stored, step))
                for name, (op, _, stored, step, values) in self._layers.items()]

    def build(self, float_layers: Sequence[str]) -> tuple[bytes, int]:
        if float_layers:
            raise ConversionError("a TFLite weight-only variant has no float fallback")
        return self.artifact, len(self.artifact)

    def alone(self, name: str) -> bytes:
        _, start, stored, _, _ = self._layers[name]
        model = bytearray(self.float32)
        data = np.ascontiguousarray(stored, "<f4").tobytes()
        model[start:start + len(data)] = data
        return bytes(model)

    def probabilities(self, model: bytes, pixels: np.ndarray) -> np.ndarray:
        return probabilities(model, pixels, self.preprocessing)


def diagnose(source: Source, artifact: bytes, variant: str, *, tuning_images: int,
             target: float, diagnose_always: bool = False) -> Repair:
    """Measure the written ``variant`` model (``artifact``) on the tuning set; when it misses
    ``target`` (or ``diagnose_always``), diagnose every weight layer on the float32 model."""
    try:
        paths, pixels, origin = tuning_set(source, 0, tuning_images)
        function = source.concrete_function()
        float32 = float32_model(function)
        candidates = _Candidates(artifact, float32, variant, source.preprocessing)
        outcome = search(candidates, paths=paths, origin=origin, pixels=pixels,
                         reference=original(source, pixels, function), target=target,
                         float32_size=len(float32), max_size_ratio=1.0, precision=variant,
                         diagnose_always=diagnose_always, repair_allowed=False)
    except ConversionError:
        raise
    except (ValueError, RuntimeError) as error:  # the converter's and interpreter's errors
        raise ConversionError(f"{variant} diagnosis failed: {type(error).__name__}: "
                              f"{first_line(error)}") from error
    return replace(outcome, reason=NO_REPAIR.format(variant=variant)) if outcome.needed \
        else outcome
