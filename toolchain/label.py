"""``toolchain label``: the top-k labels of one image (TensorFlow for Poets' ``label_image``).

The image goes through the same loader and the same preprocessing as in training, both read
from the model's backbone spec, so the scores here are the scores the model was trained for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain import model as model_io
from toolchain.errors import ModelError, UsageError
from toolchain.images import load_rgb


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


def classify(model_path: Path, image: Path, k: int = 5) -> list[Prediction]:
    """Classify ``image`` with the retrained model at ``model_path`` (a directory or model.json)."""
    if k < 1:
        raise UsageError("--top-k must be at least 1")
    info = model_io.load_info(model_path)
    keras_model = model_io.load_keras(model_path)
    spec = info.spec
    batch = spec.preprocessing.apply(load_rgb(Path(image), spec.input_size))[None]
    probabilities = keras_model(batch, training=False).numpy()[0]
    return top_k(probabilities, info.labels, k)
