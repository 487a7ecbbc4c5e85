"""The executor core both Core ML formats share: plan steps, one scheduler, float16 emulation.

Each format only lowers its model (NeuralNetwork layers in ``neuralnetwork``, ML Program ops in
``mlprogram``) to a ``Plan``: constants, then ``Step``s in model order, each a NumPy function of
its input arrays. Everything about running them lives here, once:

- scheduling, when the plan is made: a value is released after its last reader (a batch's
  activations are large), and a step may overwrite an input array that no later step reads,
  directly or through a view, and that is neither a model output nor a constant (nor a feed,
  unless the executor copies its feeds): most activations then cost one pass, no allocation;
- running: images go through in blocks small enough that the largest value of a block stays
  within ``BLOCK_BYTES`` (cache-resident: about 1.5x faster than a whole batch on
  MobileNetV2/224), or, for a plan whose steps mix the batch axis with others, in groups of
  the batch the model declares. The bytes per image come from the shapes the model declares
  (ML Program) or are measured on the first image (NeuralNetwork), then stay fixed: a model's
  blocks never change between calls (BLAS may round one matmul of 7 rows differently from 7
  matmuls of 1 row: fixed blocks also mean repeatable results);
- float16 compute, emulated by rounding values with ``to_float16``;
- errors: a step that fails inside NumPy is a ``ModelError`` naming the layer / op, with the
  NumPy exception as its cause; a result of another shape than the model declares is one too.

Step functions take ``(args, owned)``: the input arrays, and for each a flag that says whether
the step may overwrite it (``writable`` picks one for ``out=``). They return the output value,
or a tuple of values when the step has several outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.errors import ModelError, ToolchainError, describe
from toolchain.runtimes.registry import Registry

#: Images per block: the largest value of a block stays within about this many bytes.
BLOCK_BYTES = 8 << 20


def to_float16(value):
    """A float array rounded to float16 and back to float32 (float16 compute, emulated); any
    other value (integers, strings, lists) unchanged."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(np.float16).astype(np.float32)
    return value


def writable(args, owned, shape=None, dtype=None):
    """The first input the step owns (may overwrite) whose shape and dtype a result of
    ``shape`` / ``dtype`` (None: that of the input) can take, for ``out=``; else None."""
    for array, mine in zip(args, owned):
        if mine and (shape is None or array.shape == shape) and (
                dtype is None or array.dtype == dtype):
            return array
    return None


@dataclass(eq=False)
class Step:
    """One layer / op of the model as the plan runs it."""

    kind: str  # the registered layer kind / op type
    name: str  # the layer's / op's name in the model, for errors
    fn: Callable[[list, tuple], Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    registry: Registry  # its noun names it in errors; its ``executed`` set traces it
    view: bool = False  # its outputs may be views of its first input
    #: Per output: round it to float16 (float16 compute, or a float16 value in the model).
    round16: tuple[bool, ...] = ()
    #: Per output: the shape the model declares (batch first; None: not declared).
    declared: tuple = ()
    #: Per input: whether this step may overwrite it (set by the scheduler).
    owned: tuple[bool, ...] = ()
    #: Values nobody reads after this step.
    release: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.owned = self.owned or (False,) * len(self.inputs)
        self.round16 = self.round16 or (False,) * len(self.outputs)

    def what(self) -> str:
        return f"{self.registry.noun} {self.name!r} ({self.kind})"


def execute(step: Step, env: dict) -> tuple:
    """The outputs of ``step`` on the values in ``env``: checked, rounded where due."""
    try:
        args = [env[name] for name in step.inputs]
    except KeyError as missing:
        raise ModelError(f"{step.what()} reads {missing.args[0]!r}, which no input or earlier "
                         f"{step.registry.noun} produces") from missing
    try:
        result = step.fn(args, step.owned)
    except ToolchainError:
        raise
    except Exception as error:  # noqa: BLE001 (NumPy raises assorted types: shapes, dtypes)
        raise ModelError(f"{step.what()} failed: {describe(error)}") from error
    results = result if len(step.outputs) > 1 else (result,)
    for value, shape in zip(results, step.declared):
        if shape is not None and (np.ndim(value) != len(shape) or any(
                want is not None and got != want
                for got, want in zip(np.shape(value)[1:], shape[1:]))):
            raise ModelError(f"{step.what()} computed shape {np.shape(value)}, the program "
                             f"declares {shape}")
    if step.registry.executed is not None:
        step.registry.executed.add(step.kind)
    return tuple(to_float16(r) if half else r for r, half in zip(results, step.round16))


class Plan:
    """Constants and scheduled steps; ``run`` feeds batches through them (module doc)."""

    def __init__(self, steps, outputs, consts=None, feeds_owned: bool = False,
                 image_bytes: int | None = None) -> None:
        """``outputs``: the names ``run`` returns (those that exist); ``feeds_owned``: the
        executor hands over its own copies of the inputs, which steps may then overwrite;
        ``image_bytes``: the size of the largest value per image, if the model declares it."""
        self.steps: list[Step] = list(steps)
        self.outputs = tuple(dict.fromkeys(outputs))
        self.consts: dict[str, Any] = dict(consts or {})
        #: Bytes of the largest value per image (None: measured by the first run).
        self.image_bytes = image_bytes
        _schedule(self.steps, set(self.outputs), set(self.consts), feeds_owned)

    @property
    def block(self) -> int | None:
        """Images per block of a batch (None until known: see ``image_bytes``)."""
        if self.image_bytes is None:
            return None
        return max(1, BLOCK_BYTES // max(self.image_bytes, 1))

    def run(self, feeds: dict, group: int | None = None, stacked=frozenset()) -> dict:
        """The outputs for a batch of ``feeds`` (arrays, the examples on axis 0), computed in
        cache-sized blocks, or in groups of ``group`` examples. Groups' outputs are joined
        along axis 0, or stacked on a new one for the names in ``stacked``."""
        count = _count(feeds)
        if group is None:
            if self.block is None and count > 1:  # measure the sizes on the first image
                return _join([self._execute(_part(feeds, 0, 1)),
                              self.run(_part(feeds, 1, count))], ())
            group = self.block or 1
        if count <= group:
            return self._execute(feeds)
        return _join([self._execute(_part(feeds, start, start + group))
                      for start in range(0, count, group)], stacked)

    def _execute(self, feeds: dict) -> dict:
        env, count = {**self.consts, **feeds}, _count(feeds)
        measure, largest = self.image_bytes is None and count > 0, 0
        for step in self.steps:
            for name, value in zip(step.outputs, execute(step, env)):
                env[name] = value
                if measure:
                    largest = max(largest, getattr(value, "nbytes", 0))
            for name in step.release:
                env.pop(name, None)
        if measure:
            self.image_bytes = largest // count
        return {name: env[name] for name in self.outputs if name in env}


def _schedule(steps: list[Step], keep: set, consts: set, feeds_owned: bool) -> None:
    """Set each step's ``owned`` and ``release`` (see the module docstring)."""
    roots: dict[str, str] = {}  # value → the array it may be a view of
    for step in steps:
        for name in step.outputs:
            roots[name] = (roots.get(step.inputs[0], step.inputs[0])
                           if step.view and step.inputs else name)
    protected = {roots.get(name, name) for name in keep} | consts
    if not feeds_owned:  # the caller's arrays: every input that no step produces
        protected |= {name for step in steps for name in step.inputs if name not in roots}
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            last_use[roots.get(name, name)] = index
            last_use[name] = index
        for name in step.outputs:
            last_use.setdefault(name, index)
    for index, step in enumerate(steps):
        mine = [roots.get(name, name) for name in step.inputs]
        step.owned = tuple(last_use[root] == index and root not in protected
                           and mine.count(root) == 1 for root in mine)
        step.release = tuple(name for name in dict.fromkeys((*step.inputs, *step.outputs))
                             if last_use.get(name) == index and name not in keep)


def _count(feeds: dict) -> int:
    """The number of examples in ``feeds``: the same along axis 0 of every array."""
    counts = {np.shape(value)[0] if np.ndim(value) else 1 for value in feeds.values()}
    if len(counts) > 1:
        raise ModelError(f"the inputs' batch sizes differ: {sorted(counts)}")
    return counts.pop() if counts else 1


def _part(feeds: dict, start: int, stop: int) -> dict:
    return {name: value[start:stop] for name, value in feeds.items()}


def _join(parts: list[dict], stacked) -> dict:
    return {name: (np.stack if name in stacked else np.concatenate)([p[name] for p in parts])
            for name in parts[0]}
