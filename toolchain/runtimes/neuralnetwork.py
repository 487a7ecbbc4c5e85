"""The executor of Core ML NeuralNetwork models (``.mlmodel``): the spec lowered to a plan.

Core ML cannot run on Linux, yet every converted model must be verified. This executor runs a
NeuralNetwork (classifier) spec with the semantics of NeuralNetwork.proto: the image
preprocessing the model does itself (colour order, channel scale, per-channel bias or mean
image), then each layer as a step of the shared ``plan`` (its builder in ``nn_layers_*``; a
layer kind without one is an UnsupportedLayer naming the layer, at load time: nothing is ever
skipped), then the classifier's probability output.

Batches: Core ML predicts a batch image by image. Each blob here holds N per-image tensors
stacked on a new leading axis, so blob ``(N, *shape)`` is N images of Core ML's ``shape``
(``[1, 3, H, W]`` for an image with rank-4 mapping). No layer ever mixes images, so batch
results equal one-by-one results, at NumPy/BLAS speed.

``compute_precision="float16"`` rounds the weights, the inputs and every layer's output to
float16, which approximates the GPU / Neural Engine; "float32" matches Core ML's CPU path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes import (  # noqa: F401 (the nn_layers_* modules fill LAYERS)
    SPEC_KINDS,
    check_precision,
    kernels,
    nn_layers_math,
    nn_layers_shape,
    nn_layers_spatial,
)
from toolchain.runtimes.inputs import as_array, checked_pixels, planes
from toolchain.runtimes.nn_layers import LAYERS
from toolchain.runtimes.nn_weights import Weights
from toolchain.runtimes.plan import Plan, Step, to_float16


class Executor:
    """Runs one NeuralNetwork spec; see the module docstring for the batch convention."""

    def __init__(self, spec, path, compute_precision: str = "float32") -> None:
        self.path = Path(path)
        self.compute_precision = check_precision(compute_precision)
        kind = spec.WhichOneof("Type")
        if kind not in SPEC_KINDS["neuralnetwork"]:
            raise ModelError(f"{self.path.name} is a Core ML {kind} model, not a neural network")
        network = getattr(spec, kind)
        self.description = spec.description
        self.classifier = kind == "neuralNetworkClassifier"
        self.labels = _labels(network) if self.classifier else ()
        self._half = compute_precision == "float16"
        self._image_rank5 = network.imageInputShapeMapping == 0
        self._array_rank5 = network.arrayInputShapeMapping == 0
        self._preprocessing = {p.featureName: p for p in network.preprocessing}
        self._inputs = {feature.name: feature.type for feature in spec.description.input}
        images = [name for name, t in self._inputs.items() if t.WhichOneof("Type") == "imageType"]
        self.input_name = images[0] if images else next(iter(self._inputs), "")
        image = self._inputs[images[0]].imageType if images else None
        self.input_size = int(image.width) if image is not None else None
        self._image_hw = (int(image.height), int(image.width)) if image is not None else None
        self.color = _color(image, self.path) if image is not None else None
        self._outputs = [feature.name for feature in spec.description.output]
        self._probs_blob = ""
        if self.classifier:
            self._probs_blob = (network.labelProbabilityLayerName
                                or (network.layers[-1].output[0] if network.layers else ""))
        steps = [self._lower(layer) for layer in network.layers]
        self.plan = Plan(steps, [*self._outputs, self._probs_blob], feeds_owned=True)

    def _lower(self, layer) -> Step:
        """One layer as a plan step: its weights read once, its function built."""
        kind = layer.WhichOneof("layer")
        if kind in LAYERS and len(layer.output) != 1:
            raise LAYERS.unsupported(kind, layer.name, f"{len(layer.output)} outputs")
        fn, view = LAYERS.build(kind, layer.name, getattr(layer, kind), layer,
                                Weights(layer, self._half))
        return Step(kind, layer.name, fn, tuple(layer.input), tuple(layer.output), LAYERS,
                    view=view, round16=(self._half,))

    # -- public API --------------------------------------------------------------------------

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, size, size, 3) → float32 probabilities (N, len(labels))."""
        if not self.classifier:
            raise ModelError(f"{self.path.name} is not a classifier; use run() for its outputs")
        if self._image_hw is None:
            raise ModelError(f"{self.path.name} takes no image input")
        pixels = checked_pixels(pixels, self._image_hw, self.path.name)
        if not len(pixels):
            return np.zeros((0, len(self.labels)), np.float32)
        return self._probabilities(self._forward({self.input_name: pixels}))

    def run(self, inputs: dict) -> dict:
        """Every output of the model description, for N examples at once.

        Image inputs take RGB pixels (N, H, W, 3) (or (N, H, W) for grayscale models); array
        inputs take N stacked arrays of the declared shape on a new leading axis, or (when the
        declared shape starts with a batch of 1) the declared rank with N in that first place.
        Outputs come back the same way: axis 0 holds the N examples, and a per-example leading
        axis of size 1 (Core ML's batch of one) is folded into it. The classifier's probability
        output is an array (N, len(labels)) in ``labels`` order, its label output an array of
        label strings.
        """
        missing = set(self._inputs) - set(inputs)
        if missing:
            raise ModelError(f"{self.path.name} needs inputs {sorted(missing)}")
        blobs = self._forward(inputs)
        results = {}
        for name in self._outputs:
            if self.classifier and name == self.description.predictedProbabilitiesName:
                results[name] = self._probabilities(blobs)
            elif self.classifier and name == self.description.predictedFeatureName:
                probs = self._probabilities(blobs)
                results[name] = np.asarray([self.labels[i] for i in probs.argmax(axis=1)])
            elif name in blobs:
                blob = blobs[name]
                results[name] = (blob.reshape(blob.shape[0], *blob.shape[2:])
                                 if blob.ndim > 1 and blob.shape[1] == 1 else blob)
            else:
                raise ModelError(f"no layer of {self.path.name} produces output {name!r}")
        return results

    # -- internals ---------------------------------------------------------------------------

    def _forward(self, inputs: dict) -> dict:
        feeds = {name: self._feed(name, value) for name, value in inputs.items()
                 if name in self._inputs}
        if self._half:
            feeds = {name: to_float16(value) for name, value in feeds.items()}
        return self.plan.run(feeds)

    def _feed(self, name: str, value) -> np.ndarray:
        """One input as a blob: (N, *Core ML's per-example shape), float32, owned."""
        feature = self._inputs[name]
        if feature.WhichOneof("Type") == "imageType":
            x = self._image(name, np.asarray(value))
            return x[:, None, None] if self._image_rank5 else x[:, None]
        if feature.WhichOneof("Type") != "multiArrayType":
            raise ModelError(f"input {name!r} is neither an image nor a multi-array")
        x = as_array(name, value, copy=True)  # a copy: layers may work in place
        declared = tuple(int(d) for d in feature.multiArrayType.shape)
        if self._array_rank5:
            # Rank-5 mapping: [C] → [1, 1, C, 1, 1], [C, H, W] → [1, 1, C, H, W].
            per = x.shape[1:]
            shape = (per[0], 1, 1) if len(per) == 1 else tuple(per)
            if len(shape) != 3:
                raise ModelError(f"input {name!r} must be (N, C) or (N, C, H, W), not {x.shape}")
            return x.reshape(x.shape[0], 1, 1, *shape)
        if declared and x.ndim == len(declared) and declared[0] == 1:
            return x.reshape(x.shape[0], 1, *x.shape[1:])
        return x

    def _image(self, name: str, pixels: np.ndarray) -> np.ndarray:
        """Core ML's image preprocessing: colour order, then scale * x + bias (or - mean)."""
        gray = self.color == "GRAY"
        if gray:
            x = as_array(name, pixels, copy=True)
            if x.ndim == 4 and x.shape[-1] == 3:  # RGB → L as PIL's convert("L") does
                x = x @ np.float32([0.299, 0.587, 0.114])
            x = x.reshape(x.shape[0], 1, *x.shape[1:3])
        else:
            x = planes(pixels, self.color, name)
        entry = self._preprocessing.get(name)
        kind = entry.WhichOneof("preprocessor") if entry is not None else None
        if kind == "scaler":
            s = entry.scaler
            bias = ([s.grayBias] if gray else
                    [s.blueBias, s.greenBias, s.redBias] if self.color == "BGR" else
                    [s.redBias, s.greenBias, s.blueBias])
            x *= np.float32(s.channelScale)
            x += np.float32(bias).reshape(1, -1, 1, 1)
        elif kind == "meanImage":
            mean = kernels.to_float32(entry.meanImage.meanImage)
            if mean.size != x[0].size:
                raise ModelError(f"mean image of {mean.size} values for a {x.shape[1:]} image")
            x -= mean.reshape(1, *x.shape[1:])
        return x

    def _probabilities(self, blobs: dict) -> np.ndarray:
        if self._probs_blob not in blobs:
            raise ModelError(f"no layer of {self.path.name} produces the probabilities "
                             f"{self._probs_blob!r}")
        probs = blobs[self._probs_blob]
        probs = probs.reshape(probs.shape[0], -1)
        if probs.shape[1] != len(self.labels):
            raise ModelError(f"{self.path.name} produced {probs.shape[1]} probabilities for "
                             f"{len(self.labels)} labels")
        return kernels.to_float32(probs)


def _color(image, path: Path) -> str:
    """"RGB", "BGR" or "GRAY": the channel order the model's image input arrives in."""
    spaces = {image.RGB: "RGB", image.BGR: "BGR", image.GRAYSCALE: "GRAY",
              image.GRAYSCALE_FLOAT16: "GRAY"}
    if image.colorSpace not in spaces:
        raise ModelError(f"{path.name}: image input with unknown colour space {image.colorSpace}")
    return spaces[image.colorSpace]


def _labels(network) -> tuple[str, ...]:
    kind = network.WhichOneof("ClassLabels")
    if kind == "stringClassLabels":
        return tuple(network.stringClassLabels.vector)
    if kind == "int64ClassLabels":
        return tuple(str(v) for v in network.int64ClassLabels.vector)
    raise ModelError("the NeuralNetwork classifier has no class labels")
