"""``toolchain label``: the top-k labels of one image (TensorFlow for Poets' ``label_image``).

Works on a retrained model, a frozen ``.pb`` graph, and every artifact format a target opens
(``.tflite``, ``.mlmodel``, ``.mlpackage``). Labels come from the file itself wherever the format
embeds them (TFLite metadata, Core ML classifier); a ``.pb`` needs its labels file. The image
goes through the one image loader, and preprocessing comes from the model's spec or metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain import model as model_io
from toolchain.errors import ModelError, UsageError
from toolchain.images import load_rgb
from toolchain.untrusted import shown


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def top_k(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[Prediction]:
    """The ``k`` best labels, best first (ties keep label order)."""
    if len(probabilities) != len(labels):
        raise ModelError(f"the model has {len(probabilities)} outputs but {len(labels)} labels")
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(labels[i], float(probabilities[i])) for i in order]


def _is_retrained(path: Path) -> bool:
    """A retrain/build output folder (any folder but an .mlpackage) or its manifest/model file."""
    if path.is_dir():
        return path.suffix.lower() != ".mlpackage"
    return path.name in (model_io.MANIFEST, model_io.KERAS_FILE)


def classify(model_path: Path, image: Path, k: int = 5, graph=None) -> list[Prediction]:
    """Classify ``image`` with the model at ``model_path``, whatever its format.

    ``graph`` (GraphOptions: labels file, tensor names, normalisation) applies to a ``.pb`` only:
    every other format carries its own labels and preprocessing, so setting them for one is a
    UsageError rather than a silently ignored option.
    """
    from toolchain.conversion import GraphOptions
    from toolchain.options import given

    graph = graph or GraphOptions()
    if k < 1:
        raise UsageError("--top-k must be at least 1")
    path = Path(model_path)
    if not path.exists():
        raise ModelError(f"{path} does not exist")
    if path.suffix.lower() != ".pb" and given(graph):
        flags = ", ".join("--" + name.replace("_", "-") for name in given(graph))
        raise UsageError(f"{flags} apply to frozen graphs (.pb) only; {path.name} carries its "
                         "own labels and preprocessing")
    if _is_retrained(path):
        info, predict = model_io.predictor(path)
        spec = info.spec
        batch = spec.preprocessing.apply(load_rgb(Path(image), spec.input_size))[None]
        return top_k(predict(batch)[0], info.labels, k)
    if path.suffix.lower() == ".pb":
        import tensorflow as tf

        from toolchain.conversion import source_from_graph

        source = source_from_graph(path, graph)

        batch = source.preprocessing.apply(load_rgb(Path(image), source.input_size))[None]
        probabilities = source.concrete_function()(tf.constant(batch))  # pruned fns want tensors
        return top_k(np.asarray(probabilities)[0], source.labels, k)
    return _artifact(path, Path(image), k)


def _artifact(path: Path, image: Path, k: int) -> list[Prediction]:
    """An artifact's first runtime, in a child process as the verifier runs it: the file is a
    stranger's, and a native runtime can die of a malformed one (a truncated ``.tflite``
    segfaults TensorFlow's interpreter), which must be one line, not a silent exit."""
    import targets
    from toolchain.measure import LABEL_TIMEOUT_SECONDS, measure_isolated

    target = targets.for_artifact(path)
    found = target.inspect(path)  # read as data: a malformed file is one line here
    if found.input_size is None:
        raise ModelError(f"{shown(str(path))} does not take one square RGB image")
    pixels = load_rgb(image, found.input_size)[None]
    measured = measure_isolated(target, path, pixels, 1, LABEL_TIMEOUT_SECONDS, first_only=True)
    if measured.error:
        raise ModelError(f"{shown(path.name)} cannot be run: {measured.error}",
                         hint="the file may be damaged; convert the model again")
    if not measured.runtimes:
        raise UsageError(f"no runtime on this machine can run {shown(path.name)}")
    result = measured.runtimes[0]
    if result.error or result.probabilities is None:
        raise ModelError(f"{shown(path.name)} cannot be run in {result.runtime}: "
                         f"{result.error or 'it returned nothing'}",
                         hint="the file may be damaged; convert the model again")
    return top_k(np.asarray(result.probabilities)[0], result.labels, k)
