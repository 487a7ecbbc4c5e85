"""The registry of NeuralNetwork layer kinds, and the conventions its builders share.

``LAYERS`` maps each layer kind of NeuralNetwork.proto that the executor implements (the
``layer`` oneof of ``NeuralNetworkLayer``) to its builder; the ``nn_layers_*`` modules fill it.
A builder is called once per layer at load time as ``build(params, layer, weights)`` (the
layer's parameter message, the layer, and its ``nn_weights.Weights`` reader) and returns the
step function ``fn(args, owned) -> output`` of ``plan``.

Blobs hold N examples stacked on a new leading axis: blob ``(N, *shape)`` is N examples of Core
ML's ``shape``. Per-example axes are therefore shifted by one (``axis``), per-example shapes
broadcast right-aligned without ever meeting another example (``align``), and no layer mixes
examples, so a batch computes what N single predictions would.
"""

from __future__ import annotations

from toolchain.errors import ModelError
from toolchain.runtimes.registry import Registry

LAYERS = Registry("layer")


def axis(value: int, rank: int, layer) -> int:
    """A per-example axis (negative allowed) → the blob's axis (one more: examples first)."""
    resolved = value + rank if value < 0 else value
    if not 0 <= resolved < rank:
        raise ModelError(f"layer {layer.name!r}: axis {value} is out of range for rank {rank}")
    return resolved + 1


def align(arrays):
    """Unit axes inserted after the example axis, so that per-example shapes broadcast as in
    Core ML (right-aligned) while example i only ever meets example i."""
    rank = max(a.ndim for a in arrays)
    return [a.reshape(a.shape[0], *(1,) * (rank - a.ndim), *a.shape[1:]) for a in arrays]


def reshaped(x, per_example_shape, layer):
    """``x`` with every example reshaped to ``per_example_shape``, or a ModelError."""
    try:
        return x.reshape(len(x), *per_example_shape)
    except ValueError as error:
        raise ModelError(f"layer {layer.name!r} cannot reshape {x.shape[1:]} to "
                         f"{tuple(per_example_shape)}") from error
