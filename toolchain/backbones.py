"""The backbone registry: architectures, their input size and preprocessing, and their weights.

:class:`BackboneSpec` is the one object that carries preprocessing. Training, bottleneck
extraction, conversion (Core ML ``ImageType`` scale/bias, TFLite ``NormalizationOptions``),
verification and ``label`` all read it from here, so they cannot disagree.

Names follow TensorFlow for Poets (``mobilenet_0.50_224``, ``inception_v3``) plus
``mobilenet_v2_<alpha>_<size>``, ``mobilenet_v3_small_<size>`` and ``mobilenet_v3_large_<size>``.
``inception_v3_<size>`` (size >= 75) exists for quick tests with ``--weights none``.

Weights: ``imagenet`` goes through Keras' own download-and-cache function (``get_file``, cache
folder ``~/.keras/models`` or ``$KERAS_HOME/models``) with the file names and checksums Keras
publishes, so a file placed there by hand is used exactly as a downloaded one would be.
``none`` is a seeded random initialisation (deterministic, so its bottleneck cache is reusable).
A path loads a Keras ``.h5`` weights file of the backbone without its top.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain import poets
from toolchain.errors import UnknownArchitecture, UsageError, WeightsUnavailable, first_line
from toolchain.images import file_digest
from toolchain.options import Options, option

_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: MobileNet v3 ImageNet checkpoints (no top) and their md5, as Keras 2.13 publishes them.
_V3_NO_TOP_MD5 = {
    "large_224_1.0_float": "07fb09a5933dd0c8eaafa16978110389",
    "small_224_1.0_float": "d3e8ec802a04aa4fc771ee12a9a9b836",
}


@dataclass(frozen=True)
class Preprocessing:
    """``model_input = pixel * scale + offset`` per channel, on 0..255 RGB pixels.

    This is Core ML's ``ImageType(scale, bias)`` as written, and TFLite metadata's
    ``NormalizationOptions(mean, std)`` with ``mean = -offset / scale`` and ``std = 1 / scale``.
    """

    scale: float = 1.0 / 127.5
    offset: tuple[float, float, float] = (-1.0, -1.0, -1.0)
    color_order: str = "RGB"

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(-o / self.scale for o in self.offset)

    @property
    def std(self) -> tuple[float, ...]:
        return (1.0 / self.scale,) * 3

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels (..., 3) → float32 model input."""
        offset = np.asarray(self.offset, np.float32)
        return pixels.astype(np.float32) * np.float32(self.scale) + offset

    def record(self) -> dict:
        return {"scale": self.scale, "offset": list(self.offset), "color_order": self.color_order,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class WeightsFile:
    """Where Keras publishes a checkpoint, and the md5 it checks (None when Keras checks none)."""

    filename: str
    url: str
    md5: str | None


@dataclass(frozen=True)
class BackboneSpec:
    """One architecture: its canonical name, family, width multiplier and input size."""

    name: str
    family: str
    alpha: float
    input_size: int
    preprocessing: Preprocessing = Preprocessing()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input_size, self.input_size, 3)

    def imagenet_weights(self) -> WeightsFile:
        """The ImageNet checkpoint Keras would download for this backbone (without its top)."""
        if self.family == "mobilenet_v1":
            text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[self.alpha]
            name = f"mobilenet_{text}_{self.input_size}_tf_no_top.h5"
            return WeightsFile(name, _KERAS_BASE + "mobilenet/" + name, None)
        if self.family == "mobilenet_v2":
            name = (f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(self.alpha)}_"
                    f"{self.input_size}_no_top.h5")
            return WeightsFile(name, _KERAS_BASE + "mobilenet_v2/" + name, None)
        if self.family.startswith("mobilenet_v3_"):
            key = f"{self.family.rsplit('_', 1)[1]}_224_{self.alpha}_float"
            name = f"weights_mobilenet_v3_{key}_no_top_v2.h5"
            return WeightsFile(name, _KERAS_BASE + "mobilenet_v3/" + name, _V3_NO_TOP_MD5[key])
        name = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return WeightsFile(name, _KERAS_BASE + "inception_v3/" + name,
                           "bcbd6486424b2319ff4ef7d526e38f63")

    def build(self, weights_path: Path | None = None, seed: int = 0):
        """A Keras feature extractor (global-average-pooled), randomly initialised or loaded."""
        import tensorflow as tf

        tf.keras.utils.set_random_seed(seed)  # deterministic random init for --weights none
        apps = tf.keras.applications
        common = dict(input_shape=self.input_shape, include_top=False, weights=None, pooling="avg")
        if self.family == "mobilenet_v1":
            model = apps.MobileNet(alpha=self.alpha, **common)
        elif self.family == "mobilenet_v2":
            model = apps.MobileNetV2(alpha=self.alpha, **common)
        elif self.family == "mobilenet_v3_small":
            model = apps.MobileNetV3Small(alpha=self.alpha, include_preprocessing=False, **common)
        elif self.family == "mobilenet_v3_large":
            model = apps.MobileNetV3Large(alpha=self.alpha, include_preprocessing=False, **common)
        else:
            model = apps.InceptionV3(**common)
        if weights_path is None:
            _calibrate_batch_norm(model, self.input_shape, seed)
        else:
            try:
                model.load_weights(str(weights_path))
            except (OSError, ValueError, ImportError) as error:
                raise WeightsUnavailable(
                    f"cannot load weights {weights_path} into {self.name}: {first_line(error)}",
                    hint="pass a Keras .h5 weights file of this backbone without its top",
                ) from error
        return model


def _calibrate_batch_norm(model, input_shape: tuple[int, int, int], seed: int) -> None:
    """Give a randomly initialised network batch-norm statistics that keep activations alive.

    With Keras' default initialisers and untouched batch-norm statistics (mean 0, variance 1),
    activations shrink at every block: a random MobileNet outputs features near 1e-17, from which
    nothing can be learned and against which no tolerance means anything. One forward pass in
    training mode with momentum 0 sets each layer's moving mean and variance to the statistics it
    sees (data-dependent initialisation), on seeded, smooth synthetic images. Deterministic.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1.0, 1.0, size=(16, 8, 8, 3)).astype(np.float32)
    images = tf.image.resize(coarse, input_shape[:2], method="bilinear")
    images = images + rng.normal(0.0, 0.1, size=images.shape).astype(np.float32)
    layers = [layer for layer in model.submodules
              if isinstance(layer, tf.keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(tf.clip_by_value(images, -1.0, 1.0), training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


_V1_ALPHAS = {"1.0": 1.0, "0.75": 0.75, "0.50": 0.5, "0.5": 0.5, "0.25": 0.25}
_V2_ALPHAS = {"0.35": 0.35, "0.50": 0.5, "0.5": 0.5, "0.75": 0.75, "1.0": 1.0, "1.3": 1.3,
              "1.4": 1.4}
_V1_V2_SIZES = (96, 128, 160, 192, 224)

EXAMPLES = ("mobilenet_0.50_224", "mobilenet_0.25_128", "mobilenet_v2_1.0_224",
            "mobilenet_v2_0.35_96", "mobilenet_v3_small_224", "mobilenet_v3_large_224",
            "inception_v3")


def get(name: str) -> BackboneSpec:
    """Look an architecture name up; unknown names raise UnknownArchitecture listing examples."""
    text = name.strip().lower()
    match = re.fullmatch(r"mobilenet_(\d\.\d+)_(\d+)", text)
    if match and match.group(1) in _V1_ALPHAS and int(match.group(2)) in _V1_V2_SIZES:
        alpha = _V1_ALPHAS[match.group(1)]
        return BackboneSpec(f"mobilenet_{alpha:.2f}_{match.group(2)}".replace("1.00", "1.0"),
                            "mobilenet_v1", alpha, int(match.group(2)))
    match = re.fullmatch(r"mobilenet_v2_(\d\.\d+)_(\d+)", text)
    if match and match.group(1) in _V2_ALPHAS and int(match.group(2)) in _V1_V2_SIZES:
        alpha = _V2_ALPHAS[match.group(1)]
        return BackboneSpec(f"mobilenet_v2_{alpha}_{match.group(2)}", "mobilenet_v2", alpha,
                            int(match.group(2)))
    match = re.fullmatch(r"mobilenet_v3_(small|large)_(\d+)", text)
    if match and int(match.group(2)) in _V1_V2_SIZES:
        return BackboneSpec(text, f"mobilenet_v3_{match.group(1)}", 1.0, int(match.group(2)))
    match = re.fullmatch(r"inception_v3(?:_(\d+))?", text)
    if match and (match.group(1) is None or 75 <= int(match.group(1)) <= 299):
        size = int(match.group(1) or 299)
        return BackboneSpec("inception_v3" if size == 299 else f"inception_v3_{size}",
                            "inception_v3", 1.0, size)
    raise UnknownArchitecture(
        f"unknown architecture {name!r}",
        hint="use e.g. " + ", ".join(EXAMPLES) + " (sizes 96/128/160/192/224)")


@dataclass(frozen=True)
class WeightsChoice:
    """``--weights``: ``imagenet``, ``none`` or a path to a Keras ``.h5`` file."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, value: str) -> WeightsChoice:
        """``imagenet``, ``none``, ``poets`` (retrain.py's frozen graph), a ``.h5`` file
        (kind ``file``) or a frozen graph ``.pb``/``.tgz`` (kind ``graph``)."""
        if value in ("imagenet", "none", "poets"):
            return cls(value)
        path = Path(value)
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist",
                                     hint="--weights takes imagenet, none, poets, a .h5 file, "
                                          "or a frozen graph (.pb, .tgz)")
        if path.name.endswith(_GRAPH_SUFFIXES):
            return cls("graph", path)
        return cls("file", path)

    @property
    def is_graph(self) -> bool:
        return self.kind in ("graph", "poets")


_GRAPH_SUFFIXES = (".pb", ".tgz", ".tar.gz")


@dataclass
class Backbone:
    """A built feature extractor and the fingerprint of its exact weights."""

    spec: BackboneSpec
    model: object
    fingerprint: str
    weights: WeightsChoice
    source: str
    #: For a frozen-graph backbone: where the graph came from, its tensors and normalisation.
    graph: poets.GraphSource | None = None

    @property
    def bottleneck_size(self) -> int:
        return int(self.model.output_shape[-1])


def resolve_imagenet(spec: BackboneSpec, cache_dir: Path | None = None) -> Path:
    """The local path of the ImageNet checkpoint, downloading it through Keras if needed."""
    import tensorflow as tf

    weights = spec.imagenet_weights()
    where = Path(cache_dir) if cache_dir else Path(_keras_home()) / "models"
    local = where / weights.filename
    if weights.md5 and local.is_file() and file_digest(local, "md5") != weights.md5:
        # Keras would try to re-download and, failing that, delete the user's file.
        raise WeightsUnavailable(
            f"{local} does not match Keras' published md5 {weights.md5}",
            hint=f"replace it with {weights.url}, or pass --weights PATH or --weights none")
    try:
        path = tf.keras.utils.get_file(
            weights.filename, weights.url, cache_subdir=str(where), file_hash=weights.md5,
            hash_algorithm="md5" if weights.md5 else "auto")
    # Keras raises bare Exception("URL fetch failure on ...")
    except Exception as error:  # noqa: BLE001
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} are not in {where} and cannot be downloaded "
            f"({first_line(error, 120)})",
            hint=f"place {weights.filename} in {where} (from {weights.url}), or pass "
                 "--weights PATH or --weights none") from error
    return Path(path)


def _keras_home() -> str:
    import os

    return os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")


def fingerprint(name: str, model) -> str:
    """SHA-256 of the architecture name and every weight's shape and bytes.

    Computed from the loaded values, not the file name: a changed weights file is a cache miss.
    """
    digest = hashlib.sha256(name.encode())
    for array in model.get_weights():
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def load(spec: BackboneSpec, weights: WeightsChoice, weights_dir: Path | None = None) -> Backbone:
    """Build ``spec`` with the chosen weights."""
    if weights.kind == "imagenet":
        path = resolve_imagenet(spec, weights_dir)
        source = f"imagenet ({path.name})"
    elif weights.kind == "file":
        path, source = weights.path, f"file ({weights.path})"
    else:
        path, source = None, "none (random initialisation, seed 0, batch-norm calibrated)"
    model = spec.build(path)
    model.trainable = False
    return Backbone(spec, model, fingerprint(spec.name, model), weights, source)


#: The backbone used when ``--architecture`` is not given (TensorFlow for Poets 2's choice).
DEFAULT_ARCHITECTURE = "mobilenet_0.50_224"


@dataclass(frozen=True, kw_only=True)
class BackboneOptions(Options):
    """``--architecture``, ``--weights`` and ``--weights-dir``: which backbone, which weights;
    for a frozen-graph backbone, its tensors and normalisation (refused for a Keras one)."""

    architecture: str = option(
        DEFAULT_ARCHITECTURE, "mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>, inception_v3, "
        "mobilenet_v2_<alpha>_<size>, mobilenet_v3_<small|large>_<size>; with a frozen graph, "
        "the graph's (mobilenet_<v>_<size>_quantized picks retrain.py's quantized graph)",
        metavar="NAME")
    weights: str = option(
        "imagenet", "imagenet (Keras' cache, downloaded if absent), none (seeded random "
        "weights: offline, far lower accuracy), a Keras .h5 weights file, a frozen graph "
        "(retrain.py's mobilenet_v1_<v>_<size>_frozen.tgz, classify_image_graph_def.pb, or any "
        ".pb), or poets (the graph retrain.py downloads for --architecture, into --weights-dir)",
        metavar="WEIGHTS")
    weights_dir: Path | None = option(
        None, "folder holding ImageNet weight files and retrain.py's frozen graphs",
        aliases=("model-dir",), shown_default="$KERAS_HOME/models, else ~/.keras/models")
    input_tensor: str | None = option(
        None, "a frozen graph's image input tensor", metavar="NAME",
        shown_default="retrain.py's: input (MobileNet), Mul (Inception)")
    bottleneck_tensor: str | None = option(
        None, "a frozen graph's bottleneck tensor, the input of the retrained layer",
        metavar="NAME",
        shown_default="retrain.py's: MobilenetV1/Predictions/Reshape, pool_3/_reshape")
    input_mean: float | None = option(
        None, "a frozen graph's input normalisation: input = (pixel - mean) / std",
        shown_default="retrain.py's: 127.5 (MobileNet), 128 (Inception), else 127.5")
    input_std: float | None = option(None, "see --input-mean",
                                     shown_default="as --input-mean")

    def validate(self) -> None:
        weights = WeightsChoice.parse(self.weights)
        if weights.kind == "poets":
            if poets.poets_model(self.architecture) is None:
                raise UnknownArchitecture(f"retrain.py has no frozen graph for "
                                          f"{self.architecture!r}", hint=poets.poets_hint())
        elif weights.kind != "graph":
            self.spec  # noqa: B018 (an unknown architecture fails here, before any work)
        if self.input_std is not None and not self.input_std > 0:
            raise UsageError("--input-std must be positive")

    @property
    def spec(self) -> BackboneSpec:
        return get(self.architecture)

    def load(self) -> Backbone:
        """The backbone these options name, weights loaded (downloaded if need be)."""
        weights = WeightsChoice.parse(self.weights)
        tensors = {"input_tensor": self.input_tensor, "bottleneck_tensor": self.bottleneck_tensor,
                   "input_mean": self.input_mean, "input_std": self.input_std}
        if weights.is_graph:
            given = self.architecture != DEFAULT_ARCHITECTURE
            return load_graph(weights, self.architecture if given or weights.kind == "poets"
                              else None, self.weights_dir, **tensors)
        if any(value is not None for value in tensors.values()):
            flags = ", ".join("--" + k.replace("_", "-") for k, v in tensors.items()
                              if v is not None)
            raise UsageError(f"{flags} apply to frozen-graph weights only (--weights "
                             f"{self.weights} is a Keras backbone)")
        if weights.kind == "none":
            import logging

            logging.getLogger("toolchain").warning(
                "using random backbone weights (--weights none): the pipeline runs, but "
                "accuracy is far below what ImageNet weights give")
        return load(self.spec, weights, self.weights_dir)


def load_graph(weights: WeightsChoice, architecture: str | None, weights_dir: Path | None,
               *, input_tensor: str | None = None, bottleneck_tensor: str | None = None,
               input_mean: float | None = None, input_std: float | None = None) -> Backbone:
    """A frozen-graph backbone: retrain.py's graph for ``architecture`` (``poets``) or a file.

    Tensor names and normalisation: the flags, else retrain.py's for the file's name, else for
    the tensor names the graph has. ``architecture``, when given with a file, must be the
    file's (it chooses ``quantized_graph.pb`` in a MobileNet archive with ``_quantized``).
    The fingerprint is the SHA-256 of the graph (serialized deterministically), tensor names and
    normalisation: what the bottlenecks depend on, so a changed graph is a cache miss.
    """
    quantized = bool(architecture and architecture.lower().endswith("_quantized"))
    if weights.kind == "poets":
        row = poets.poets_model(architecture)
        folder = Path(weights_dir) if weights_dir else Path(_keras_home()) / "models"
        path = poets.fetch(row, folder)
    else:
        path, row = weights.path, poets.model_for_file(weights.path, quantized)
        if architecture and row and poets.poets_model(architecture) != row:
            raise UsageError(f"--architecture {architecture} does not match {path.name} "
                             f"({row.architecture})", hint="leave --architecture out: a frozen "
                             "graph's architecture is the graph's")
    member = row.member if row and path.name.endswith((".tgz", ".tar.gz")) else None
    data, member = poets.read_graph_bytes(path, member)
    where = f"{path.name}:{member}" if member else path.name
    graph_def = poets.parse_graph(data, where)
    row = row or poets.detect(graph_def)
    input_tensor = input_tensor or (row.input_tensor if row else "input")
    bottleneck_tensor = bottleneck_tensor or (row.bottleneck_tensor if row else None)
    if bottleneck_tensor is None:
        raise UsageError(f"{where} is not one of retrain.py's graphs, so its bottleneck "
                         f"tensor is unknown (candidates: {poets.candidates(graph_def)})",
                         hint="pass --bottleneck-tensor NAME")
    poets.check_names(graph_def, where, input_tensor, bottleneck_tensor)
    size = poets.image_size(poets.tensor_shape(graph_def, input_tensor, where), input_tensor,
                            where)
    default = (row.input_mean, row.input_std) if row else poets.DEFAULT_NORMALIZATION
    mean = input_mean if input_mean is not None else default[0]
    std = input_std if input_std is not None else default[1]
    name = (row.architecture if row and poets.model_for_file(path, quantized) else
            "graph_" + re.sub(r"[^a-z0-9_.]+", "_", path.name.split(".")[0].lower()))
    if architecture and name.startswith("graph_"):  # a file retrain.py did not name
        named = poets.poets_model(architecture)
        if named is None or named.input_size != size:
            raise UsageError(f"--architecture {architecture} does not match {where} (an image "
                             f"input of {size} px)", hint="leave --architecture out: a frozen "
                             "graph's architecture is the graph's")
        name = named.architecture
    scale = 1.0 / std
    spec = BackboneSpec(name, "frozen_graph", 1.0, size, Preprocessing(scale, (-mean * scale,) * 3))
    graph = poets.GraphSource(str(path), member, hashlib.sha256(data).hexdigest(), input_tensor,
                              bottleneck_tensor, float(mean), float(std), graph_def)
    model = poets.GraphFeatures(graph_def, input_tensor, bottleneck_tensor, size)
    # The graph's content, not its file's bytes: protobuf writes map fields (node attributes)
    # in no fixed order, so one graph saved twice can differ byte for byte.
    digest = hashlib.sha256(graph_def.SerializeToString(deterministic=True))
    digest.update(repr((input_tensor, bottleneck_tensor, float(mean), float(std))).encode())
    return Backbone(spec, model, digest.hexdigest(), weights,
                    f"frozen graph {where} (sha256 {graph.sha256[:12]})", graph)
