"""Reading a Core ML spec back: what a ``.mlmodel`` or ``.mlpackage`` says about itself.

The Core ML target's inspector (:func:`record`) is built from these readers, and so are its
post-write check, ``install`` and ``label``: labels, the image input, the preprocessing the model
applies to it, the stored weight precision, metadata and outputs, from the spec alone (no Core ML
runtime needed, so it works on Linux). A module of its own (underscored, so the target registry
does not take it for a target) to keep ``targets/coreml.py`` about converting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from targets import ArtifactRecord, ImageInput
from toolchain.backbones import Preprocessing
from toolchain.runtimes import SPEC_KINDS

INPUT, LABEL, PROBS = "image", "classLabel", "classLabelProbs"
PREVIEW_KEY, PREVIEW_TYPE = "com.apple.coreml.model.preview.type", "imageClassifier"
#: ML Program weights with more elements than this are int8-quantized (coremltools' default).
INT8_WEIGHT_THRESHOLD = 2048
#: The format of each spec type (``toolchain.runtimes.SPEC_KINDS``).
FORMATS = {kind: fmt for fmt, kinds in SPEC_KINDS.items() for kind in kinds}


def record(spec, path: Path) -> ArtifactRecord:
    """The inspector's record of a parsed spec (``path`` names the file in errors only)."""
    description = spec.description
    meta = description.metadata
    kind = spec.WhichOneof("Type")
    stored = weight_precisions(spec) if kind in FORMATS else set()
    return ArtifactRecord(
        target="coreml", format=FORMATS.get(kind, kind or "empty"),
        precision=lossiest(stored), labels=labels(spec), input=image_input(spec),
        preprocessing=(preprocessing(spec) if kind in FORMATS and image_input(spec) is not None
                       else None),
        outputs=tuple(sorted(feature.name for feature in description.output)),
        metadata={"description": meta.shortDescription, "author": meta.author,
                  "license": meta.license, "version": meta.versionString},
        user_defined=dict(meta.userDefined),
        details={"weights": sorted(stored),
                 "predicted_feature": description.predictedFeatureName,
                 "predicted_probabilities": description.predictedProbabilitiesName,
                 "specification_version": int(spec.specificationVersion)})


def lossiest(stored: set[str]) -> str:
    """The stored weight precision; a mix (never written by the target) counts as the lossiest
    one, so the verifier applies the loosest threshold only when it is due."""
    for precision in ("int8", "float16", "float32"):
        if precision in stored:
            return precision
    return "unknown"


def image_input(spec) -> ImageInput | None:
    """The model's one image input, or None (several inputs, or not an image)."""
    inputs = list(spec.description.input)
    if len(inputs) != 1 or inputs[0].type.WhichOneof("Type") != "imageType":
        return None
    image = inputs[0].type.imageType
    color = image.ColorSpace.Name(image.colorSpace)
    return ImageInput(inputs[0].name, int(image.width), int(image.height),
                      {"GRAYSCALE": "GRAY", "GRAYSCALE_FLOAT16": "GRAY"}.get(color, color))


def mil_block(spec):
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset]


def labels(spec) -> tuple[str, ...]:
    """The class labels in output order; () for a model that is not a classifier."""
    kind = spec.WhichOneof("Type")
    if kind == "neuralNetworkClassifier":
        network = spec.neuralNetworkClassifier
        if network.WhichOneof("ClassLabels") == "int64ClassLabels":
            return tuple(str(v) for v in network.int64ClassLabels.vector)
        return tuple(network.stringClassLabels.vector)
    if kind == "mlProgram" and "main" in spec.mlProgram.functions:
        for op in mil_block(spec).operations:
            if op.type == "classify":
                values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                return tuple(value.immediateValue.tensor.strings.values[0] for value in values)
    return ()


def preprocessing(spec) -> Preprocessing:
    """The image scale and RGB bias the model applies to its input (identity when none)."""
    kind = spec.WhichOneof("Type")
    name = spec.description.input[0].name
    if kind != "mlProgram":
        network = getattr(spec, kind)
        for entry in network.preprocessing:
            if entry.featureName == name and entry.WhichOneof("preprocessor") == "scaler":
                s = entry.scaler
                return Preprocessing(float(s.channelScale),
                                     (float(s.redBias), float(s.greenBias), float(s.blueBias)))
        return Preprocessing(1.0, (0.0, 0.0, 0.0))
    # ML Program: coremltools' insert_image_preprocessing_ops pass writes mul(image, scale)
    # then add(.., bias[1,3,1,1]) after the input, each omitted when it would be a no-op.
    block = mil_block(spec)
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    found, current = {"mul": [1.0], "add": [0.0, 0.0, 0.0]}, name
    for op in block.operations:
        args = {key: value.arguments[0].name for key, value in op.inputs.items()}
        if op.type in found and args.get("x") == current and args.get("y") in consts:
            tensor = consts[args["y"]].attributes["val"].immediateValue.tensor
            found[op.type] = list(tensor.floats.values) or list(  # float16 constants: bytes
                np.frombuffer(tensor.bytes.values, np.float16).astype(np.float32))
            current = op.outputs[0].name
            if op.type == "add":
                break
    bias = [float(v) for v in found["add"]]
    return Preprocessing(float(found["mul"][0]), tuple(bias * 3 if len(bias) == 1 else bias))


def weight_precisions(spec) -> set[str]:
    """How the model stores its weights: {"float32"}, {"float16"}, {"int8"} or a mix.

    NeuralNetwork: every convolution / inner product / batched matmul weight. ML Program: every
    const or constexpr tensor with more than INT8_WEIGHT_THRESHOLD elements.
    """
    from coremltools.proto import MIL_pb2

    kinds = set()
    if spec.WhichOneof("Type") != "mlProgram":
        for layer in getattr(spec, spec.WhichOneof("Type")).layers:
            kind = layer.WhichOneof("layer")
            if kind in ("convolution", "innerProduct", "batchedMatmul"):
                w = getattr(layer, kind).weights  # empty for a batchedMatmul of two inputs
                if w.floatValue or w.float16Value or w.rawValue:
                    kinds.add("float32" if w.floatValue else "float16" if w.float16Value
                              else f"int{w.quantization.numberOfBits}")
        return kinds
    names = {MIL_pb2.FLOAT32: "float32", MIL_pb2.FLOAT16: "float16", MIL_pb2.INT8: "int8",
             MIL_pb2.UINT8: "uint8"}
    for op in mil_block(spec).operations:
        # constexpr ops of iOS 18 take their data from a const, which is counted as such.
        stored = {"const": "val", "constexpr_affine_dequantize": "quantized_data"}.get(op.type)
        if stored is None or stored not in op.attributes:
            continue
        dims = op.outputs[0].type.tensorType.dimensions
        if int(np.prod([d.constant.size for d in dims])) > INT8_WEIGHT_THRESHOLD:
            dtype = op.attributes[stored].type.tensorType.dataType
            kinds.add(names.get(dtype, MIL_pb2.DataType.Name(dtype).lower()))
    return kinds
