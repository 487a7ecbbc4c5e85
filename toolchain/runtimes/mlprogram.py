"""The executor of Core ML ML Programs (``.mlpackage``): the program lowered to a plan.

Core ML's arithmetic where Core ML itself does not run (Linux), so the verifier can still check
the artifact the apps ship. The program is read straight from the spec (``spec.mlProgram``,
weights from the package's blob file: ``mil_values``) and lowered once to a ``plan.Plan``: one
step per op, in program order, built by the op's builder in ``mil_ops_*``; steps whose inputs
are all constants (``const``, the ``constexpr_*`` weight decoders, arithmetic on them) are
computed right away. ``predict`` only does the arithmetic, NCHW float32, a block of images at a
time. Semantics follow coremltools' MIL op definitions (``converters/mil/mil/ops/defs``): the
reference, not TensorFlow. An op without a builder is an ``UnsupportedLayer`` that names it;
nothing is skipped.

Batching: a program declares batch 1, and every op keeps the batch as the leading axis, so
images go through together (in the plan's cache-sized blocks). A program whose ops would mix
the batch axis with others runs one declared batch at a time instead. Every result is checked
against the shape the program declares, so semantics that disagree with coremltools' shape
inference fail loudly.

Precision: ops whose declared output is float16 (``compute_precision=FLOAT16`` programs) round
their results to float16, as Core ML computes them; ``compute_precision="float16"`` rounds the
weights and every op's output to float16, to approximate the GPU and Neural Engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes import (  # noqa: F401 (the mil_ops_* modules fill OPS)
    check_precision,
    mil_ops_elementwise,
    mil_ops_nn,
    mil_ops_tensor,
)
from toolchain.runtimes.inputs import as_array, checked_pixels, planes
from toolchain.runtimes.mil_ops import OPS, Op
from toolchain.runtimes.mil_values import Values, dims, weights_dir
from toolchain.runtimes.plan import Plan, Step, execute, to_float16


class Lowering:
    """The program's main block as constants and steps (what ``mil_ops.Op`` reads)."""

    def __init__(self, block, inputs: dict[str, tuple], values: Values, half: bool) -> None:
        self.values, self.half = values, half
        self.consts: dict[str, Any] = {}
        self.shapes: dict[str, tuple] = dict(inputs)
        self.steps: list[Step] = []
        self.batchable, self.labels = True, ()
        for proto in block.operations:
            self._add(Op(proto, self))

    def _add(self, op: Op) -> None:
        from coremltools.proto import MIL_pb2

        outputs = op.proto.outputs
        for output in outputs:
            self.shapes[output.name] = dims(output.type.tensorType)
        halves = tuple(o.type.WhichOneof("type") == "tensorType"
                       and o.type.tensorType.dataType == MIL_pb2.FLOAT16 for o in outputs)
        if op.proto.blocks:
            raise OPS.unsupported(op.type, op.name, "nested blocks")
        (fn, names), view = OPS.build(op.type, op.name, op)
        # classify declares one label (a scalar, or for integer labels an int64 scalar) and a
        # dictionary: the executor returns a label and a row of probabilities per example.
        classify = op.type == "classify"
        step = Step(op.type, op.name, fn, tuple(names), tuple(o.name for o in outputs), OPS,
                    view=view, round16=tuple(self.half or h for h in halves),
                    declared=tuple(self.shapes[o.name] if _ranked(o) and not classify else None
                                   for o in outputs))
        if not classify and all(name in self.consts for name in names):
            for name, value in zip(step.outputs, execute(step, self.consts)):
                self.consts[name] = value  # constant folding: nothing left to do at run time
            return
        self.steps.append(step)


def _ranked(output) -> bool:
    """Whether the program declares this output's full shape (tensors, not dictionaries)."""
    from coremltools.proto import MIL_pb2

    if output.type.WhichOneof("type") != "tensorType":
        return False
    tensor = output.type.tensorType
    return tensor.rank == len(tensor.dimensions) and tensor.dataType != MIL_pb2.STRING


class Executor:
    """Runs one ML Program (``spec.mlProgram``) with NumPy; see the module docstring."""

    def __init__(self, spec, path, compute_precision: str = "float32") -> None:
        check_precision(compute_precision)
        if spec.WhichOneof("Type") != "mlProgram":
            raise ModelError("the Core ML model is not an ML Program")
        self.path = Path(path) if path is not None else None
        self._name = self.path.name if self.path is not None else "the ML Program"
        self.compute_precision = compute_precision
        description = spec.description
        function_name = description.defaultFunctionName or "main"
        if function_name not in spec.mlProgram.functions:
            raise ModelError(f"the ML Program has no function {function_name!r}")
        function = spec.mlProgram.functions[function_name]
        block = function.block_specializations[function.opset]
        self._inputs = {value.name: dims(value.type.tensorType) for value in function.inputs}
        lowering = Lowering(block, self._inputs, Values(weights_dir(path)),
                            compute_precision == "float16")
        self._batchable, self.labels = lowering.batchable, lowering.labels
        self._outputs = tuple(block.outputs)
        undefined = [name for name in self._outputs if name not in lowering.shapes]
        if undefined:
            raise ModelError(f"the ML Program returns {undefined}, which no op defines")
        largest = max((int(np.prod([d or 1 for d in lowering.shapes[name][1:]]))
                       for step in lowering.steps for name in step.outputs
                       if lowering.shapes.get(name)), default=1)
        self.plan = Plan(lowering.steps, self._outputs, lowering.consts,
                         image_bytes=4 * largest)  # float32 values, as declared
        self._batch = next(iter(self._inputs.values()), (1,))[0] if self._inputs else 1
        # Outputs without a batch axis, when the program runs one declared batch at a time.
        # classify's label and probabilities declare no shape but have one row per example
        # (stacking them gave (N, 1, C): a TF for Poets 1 graph's reshape to [-1, 2048]).
        classified = {name for step in lowering.steps if step.kind == "classify"
                      for name in step.outputs}
        self._stacked = frozenset(name for name in self._outputs if name not in classified and (
                                  not (lowering.shapes.get(name) or ())
                                  or lowering.shapes[name][0] != self._batch))
        self.input_name = description.input[0].name if description.input else ""
        self.probabilities_name = description.predictedProbabilitiesName
        image = (description.input[0].type.imageType
                 if description.input and description.input[0].type.WhichOneof("Type")
                 == "imageType" else None)
        self.input_size = int(image.width) if image is not None else None
        if image is not None and image.height != image.width:
            raise ModelError(f"the image input is {image.width}x{image.height}, not square")
        self.color = None if image is None else image.ColorSpace.Name(image.colorSpace)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N, len(labels)) for uint8 RGB images (N, size, size, 3)."""
        if not self.labels or self.input_size is None:
            raise ModelError("the ML Program is not an image classifier")
        if self.color not in ("RGB", "BGR"):
            raise ModelError(f"the model's image input is {self.color}, not RGB or BGR")
        size = self.input_size
        pixels = checked_pixels(pixels, (size, size), self._name)
        outputs = self.run({self.input_name: planes(pixels, self.color, self.input_name)})
        if self.probabilities_name not in outputs:
            raise ModelError(f"the ML Program has no output {self.probabilities_name!r} for "
                             f"its probabilities")
        return np.asarray(outputs[self.probabilities_name], np.float32)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the program (a classifier's probability dictionary as an (N, C)
        array in ``labels`` order, its label as an array of strings) for the given inputs."""
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise ModelError(f"{self._name} needs inputs {missing}")
        arrays = {}
        for name, declared in self._inputs.items():
            array = as_array(name, inputs[name], copy=False)
            if self.compute_precision == "float16":
                array = to_float16(array)
            if array.ndim != len(declared) or any(
                    d is not None and d != a for d, a in zip(declared[1:], array.shape[1:])):
                raise ModelError(f"input {name!r} has shape {array.shape}, "
                                 f"the model expects {declared}")
            arrays[name] = array
        batch = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        declared = {d[0] if d else 1 for d in self._inputs.values()}
        if len(batch) > 1:
            raise ModelError(f"the inputs' batch sizes differ: {sorted(batch)}")
        if self._batchable:  # blocks of images sized to stay in cache
            return self.plan.run(arrays)
        if batch == declared or len(declared) != 1:
            return self.plan.run(arrays, group=max(batch or {1}))
        # Ops that mix the batch axis with others: one declared batch at a time.
        return self.plan.run(arrays, group=max(declared.pop() or 1, 1), stacked=self._stacked)
