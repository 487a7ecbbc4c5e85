"""Core ML weights that pass: measure an int8 (or NeuralNetwork float16) Core ML model on tuning
images, find the layers whose quantized weights harm it, keep just those in float (the Core ML
target's repair stage; docs/ARCHITECTURE.md, "Quantization: diagnosis and repair").

Core ML's int8 and a NeuralNetwork's float16 are weight-only: each layer's weights are stored
small and expanded at load time, the arithmetic stays float. So a candidate with some layers in
float needs no new conversion. The NumPy executor (:mod:`toolchain.runtimes`) loads the plain
quantized model and its float twin once; both run the same layers in the same order, and a
candidate is a plan that takes each layer's expanded weights from one or the other. Those are
exactly the values of the file coremltools writes with the same layers skipped
(``QuantizedLayerSelector`` for a NeuralNetwork, ``op_name_configs`` set to None for an ML
Program), which :func:`write_model` then makes and the verifier judges like any artifact.

- **NeuralNetwork** (``.mlmodel``, int8 or float16): the float twin is ``quantize_weights`` with
  every layer skipped (8-bit quantization first fuses some layers; the twin goes through the same
  pass, so the two line up layer by layer). A layer's error is its weights' RMSE relative to
  its quantization step: the per-channel scale for int8, the float16 spacing at each weight.
- **ML Program** (``.mlpackage``, int8): ``linear_quantize_weights`` turns each large ``const``
  into a ``constexpr_affine_dequantize`` named ``<const>_quantized``, which the executor folds
  into a constant; a candidate swaps those constants for the float twin's. A layer is named by
  the op that reads the weights. The float16 ML Program is float16 *compute*, not weights, so
  there is nothing per layer to keep in float: it is not diagnosed (the export says so).

Which layers, in which order, within which budget, and what is recorded: :mod:`targets._repair`,
as for TFLite.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from targets import Source
from targets._repair import Repair, rmse_per_step, search
from targets._tuning import original, tuning_set
from toolchain import patches
from toolchain.errors import ConversionError, ToolchainError, describe
from toolchain.runtimes.plan import Plan


def _weight_params(layer):
    """(field name, WeightParams) of a NeuralNetwork layer, in declaration order."""
    kind = layer.WhichOneof("layer")
    if kind is None:
        return []
    return [(field.name, value) for field, value in getattr(layer, kind).ListFields()
            if field.message_type is not None and field.message_type.name == "WeightParams"]


def _stored_small(params) -> bool:
    return bool(len(params.rawValue) or len(params.float16Value))


class _Mixed:
    """A candidate: an executor whose plan mixes the float twin's and the quantized model's
    weights (``predict`` like any executor)."""

    def __init__(self, executor, plan: Plan) -> None:
        self.executor = copy.copy(executor)
        self.executor.plan = plan

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.executor.predict(pixels)


def _count(params) -> int:
    """How many weights a quantized WeightParams holds (8-bit codes or float16 values)."""
    if len(params.float16Value):
        return len(params.float16Value) // 2
    bits = int(params.quantization.numberOfBits) or 8
    return len(params.rawValue) * 8 // bits


class _Candidates:
    """What both formats' candidates share: a candidate is the quantized model with some layers'
    weights taken from the float twin (:meth:`_plan`, by the layers left quantized); its size is
    the plain model's plus what each float layer adds (``_delta``). Only weights are
    quantized, so each layer's float weights are independent of the others'."""

    quantizes_activations = False
    _size: int
    _delta: dict[str, int]

    @property
    def float32_size(self) -> int:
        return self._size + sum(self._delta.values())

    def _plan(self, quantized: set[str]):
        raise NotImplementedError

    def build(self, float_layers: Sequence[str]):
        floated = set(float_layers)
        return (self._plan(set(self._delta) - floated),
                self._size + sum(self._delta[name] for name in floated))

    def alone(self, name: str):
        return self._plan({name})

    def probabilities(self, model, pixels: np.ndarray) -> np.ndarray:
        return model.predict(pixels)


class _NeuralNetwork(_Candidates):
    """Candidates of a NeuralNetwork (``.mlmodel``) with int8 or float16 weights. The float twin
    (and with it each layer's error) is made only when a layer is diagnosed or tried in float:
    measuring the plain model needs the quantized one alone."""

    def __init__(self, float_model, quantized_model, nbits: int, quantized_size: int) -> None:
        from toolchain.runtimes import neuralnetwork

        self.float_model, self.nbits = float_model, nbits
        self._spec = quantized_model.get_spec()
        self._quantized = neuralnetwork.Executor(self._spec, Path("quantized.mlmodel"))
        self._size = quantized_size
        #: quantized layer → bytes its float32 weights would add
        self._delta = {}
        for layer in getattr(self._spec, self._spec.WhichOneof("Type")).layers:
            small = [params for _, params in _weight_params(layer) if _stored_small(params)]
            if small:
                self._delta[layer.name] = sum(4 * _count(params) - params.ByteSize()
                                              for params in small)

    @functools.cached_property
    def _twin(self) -> tuple[list, list]:
        """(each layer's (float step, quantized step), each quantized layer's error)."""
        from toolchain.runtimes import neuralnetwork
        from toolchain.runtimes.nn_weights import Weights

        twin = write_model(self.float_model, "neuralnetwork", self.nbits, skip=None).get_spec()
        kind = twin.WhichOneof("Type")
        twin_layers = getattr(twin, kind).layers
        quantized_layers = getattr(self._spec, kind).layers
        if [layer.name for layer in twin_layers] != [layer.name for layer in quantized_layers]:
            raise ConversionError("the quantized NeuralNetwork's layers do not line up with its "
                                  "float twin's; it cannot be diagnosed")
        executor = neuralnetwork.Executor(twin, Path("float32.mlmodel"))
        errors = []
        for exact_layer, small_layer in zip(twin_layers, quantized_layers):
            pairs = [(exact, small) for (_, exact), (_, small)
                     in zip(_weight_params(exact_layer), _weight_params(small_layer))
                     if _stored_small(small) and len(exact.floatValue)]
            if not pairs:
                continue
            exact, small = pairs[0]  # the weights (biases follow them)
            count = len(exact.floatValue)
            values = np.array(exact.floatValue[:], np.float32)
            stored = Weights(small_layer, False)(small, (count,))
            if len(small.float16Value):
                step = np.spacing(np.abs(values).astype(np.float16)).astype(np.float32)
            else:
                scale = np.float32(small.quantization.linearQuantization.scale)
                step = (np.repeat(scale, count // scale.size) if scale.size
                        else np.zeros(count, np.float32))
            errors.append((small_layer.name, small_layer.WhichOneof("layer"),
                           rmse_per_step(values, stored, step)))
        return list(zip(executor.plan.steps, self._quantized.plan.steps)), errors

    def layer_errors(self) -> list[tuple[str, str, float]]:
        return list(self._twin[1])

    def _plan(self, quantized: set[str]):
        if quantized == set(self._delta):
            return self._quantized
        steps = [small if small.name in quantized else exact for exact, small in self._twin[0]]
        source = self._quantized
        return _Mixed(source, Plan(steps, source.plan.outputs, feeds_owned=True,
                                   image_bytes=source.plan.image_bytes))

    def write(self, float_layers: Sequence[str]):
        return write_model(self.float_model, "neuralnetwork", self.nbits, skip=float_layers)


class _MLProgram(_Candidates):
    """Candidates of an ML Program (``.mlpackage``) with int8 weights."""

    def __init__(self, float_model, quantized_model, quantized_size: int) -> None:
        from targets._coreml_spec import mil_block
        from toolchain.runtimes import mlprogram
        from toolchain.runtimes.mil_values import Values, weights_dir

        self.float_model = float_model
        spec = quantized_model.get_spec()
        self._twin = mlprogram.Executor(float_model.get_spec(), float_model.package_path)
        self._quantized = mlprogram.Executor(spec, quantized_model.package_path)
        exact, small = self._twin.plan.consts, self._quantized.plan.consts
        readers = {}
        for step in self._quantized.plan.steps:
            for name in step.inputs:
                readers.setdefault(name, step)
        values = Values(weights_dir(quantized_model.package_path))
        #: const → its per-channel scale, broadcast to the weights' shape (the step)
        steps = {}
        for op in mil_block(spec).operations:
            if op.type == "constexpr_affine_dequantize":
                out = op.outputs[0].name
                scale = np.asarray(values.read(op.attributes["scale"], op.type, out), np.float32)
                axis = int(np.asarray(values.read(op.attributes["axis"], op.type, out)))
                steps[out] = (scale, axis)
        #: layer (the op reading the weights) → the const coremltools quantized for it
        self._const: dict[str, str] = {}
        self._size, self._delta, self._errors = quantized_size, {}, []
        for name in small:
            const = name.removesuffix("_quantized")
            if const == name or const not in exact or name not in readers or name not in steps:
                continue
            reader = readers[name]
            weights = np.asarray(exact[const], np.float32)
            stored = np.asarray(small[name], np.float32)
            scale, axis = steps[name]
            shape = [1] * weights.ndim
            if scale.ndim and weights.ndim:
                shape[axis] = scale.size
            step = np.broadcast_to(scale.reshape(shape) if scale.ndim else scale, weights.shape)
            self._const[reader.name] = const
            self._errors.append((reader.name, reader.kind,
                                 rmse_per_step(weights, stored, step)))
            channels = scale.size or 1
            self._delta[reader.name] = weights.nbytes - weights.size - 5 * channels

    def layer_errors(self) -> list[tuple[str, str, float]]:
        return list(self._errors)

    def _plan(self, quantized: set[str]):
        if quantized == set(self._const):
            return self._quantized
        source, twin = self._quantized, self._twin.plan.consts
        consts = dict(source.plan.consts)
        for layer, const in self._const.items():
            if layer not in quantized:
                consts[f"{const}_quantized"] = twin[const]
        return _Mixed(source, Plan(source.plan.steps, source.plan.outputs, consts,
                                   image_bytes=source.plan.image_bytes))

    def write(self, float_layers: Sequence[str]):
        return write_model(self.float_model, "mlprogram", 8,
                           skip=[self._const[name] for name in float_layers])


def write_model(float_model, fmt: str, nbits: int, skip: Sequence[str] | None = ()):
    """The float32 model with its weights quantized as the Core ML target quantizes them
    (``nbits`` 8: int8, 16: a NeuralNetwork's float16), except the layers in ``skip``
    (NeuralNetwork layer names, ML Program const names); ``skip=None`` skips every layer."""
    import coremltools as ct

    if fmt == "mlprogram":
        from targets._coreml_spec import INT8_WEIGHT_THRESHOLD

        quantizer = ct.optimize.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric", weight_threshold=INT8_WEIGHT_THRESHOLD)
        config = ct.optimize.coreml.OptimizationConfig(
            global_config=quantizer, op_name_configs={name: None for name in skip or ()})
        with patches.without_progress_bars():
            return ct.optimize.coreml.linear_quantize_weights(float_model, config=config)
    from coremltools.models.neural_network.quantization_utils import QuantizedLayerSelector

    class Skipping(QuantizedLayerSelector):
        def do_quantize(self, layer, **kwargs):
            return skip is not None and layer.name not in skip and super().do_quantize(layer)

    return patches.quantize_weights(float_model, nbits=nbits, quantization_mode="linear",
                                    selector=Skipping())


def repair(source: Source, float_model, quantized_model, *, fmt: str, precision: str,
           nbits: int, quantized_size: int, tuning_images: int, target: float,
           max_size_ratio: float, diagnose_always: bool = False,
           repair_allowed: bool = True) -> tuple[Repair, object]:
    """Measure the plain ``quantized_model`` (written, ``quantized_size`` bytes) on the tuning
    set; diagnose and repair as :func:`targets._repair.search` does. Returns the outcome and,
    when it was repaired, the repaired MLModel (to be described and written), else None."""
    try:
        paths, pixels, origin = tuning_set(source, 0, tuning_images)
        if fmt == "mlprogram":
            candidates = _MLProgram(float_model, quantized_model, quantized_size)
        else:
            candidates = _NeuralNetwork(float_model, quantized_model, nbits, quantized_size)
        outcome = search(candidates, paths=paths, origin=origin, pixels=pixels,
                         reference=original(source, pixels), target=target,
                         float32_size=candidates.float32_size, max_size_ratio=max_size_ratio,
                         precision=precision, diagnose_always=diagnose_always,
                         repair_allowed=repair_allowed)
        written = candidates.write(outcome.float_layers) if outcome.model is not None else None
    except ToolchainError:
        raise
    except Exception as error:  # noqa: BLE001 (coremltools and NumPy raise assorted types)
        raise ConversionError(f"{precision} repair failed: {describe(error)}") from error
    return outcome, written
