"""The registry of ML Program op types, and the view of one op that their builders read.

``OPS`` maps each MIL op type the executor implements (coremltools' op definitions,
``converters/mil/mil/ops/defs``, are the reference) to its builder; the ``mil_ops_*`` modules
fill it. A builder is called once per op at load time as ``build(op)`` with the ``Op`` below,
and returns ``(fn, input names)``: the step function ``fn(args, owned) -> output`` of ``plan``
and the variables it reads. Builders read constant inputs (weights, axes, modes) right away
through ``op.const``; a step whose inputs are all constants is computed at load time (constant
folding: ``const`` and the ``constexpr_*`` ops are steps without runtime inputs).

Batching: programs declare batch 1, and ops keep the batch as the leading axis, so images go
through together. A builder whose op would mix the batch axis with others (a transpose moving
axis 0, a reduction over it, ...) calls ``op.not_batched()``: the program then runs one declared
batch at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes.registry import Registry

OPS = Registry("op")
REQUIRED = object()


class Op:
    """One op of the program while it is lowered: its constant and runtime inputs.

    ``lowering`` is the program's lowering (``mlprogram.Lowering``): the constants so far
    (``consts``), every value's declared shape (``shapes``), the value reader (``values``).
    """

    def __init__(self, proto, lowering) -> None:
        self.proto, self.lowering = proto, lowering
        self.type, self.name = proto.type, proto.outputs[0].name

    def _bindings(self, key: str) -> list[tuple[str, Any]] | None:
        """``("name", variable)`` or ``("value", Value proto)`` for each argument of ``key``."""
        if key in self.proto.inputs:
            return [(b.WhichOneof("binding"), getattr(b, b.WhichOneof("binding")))
                    for b in self.proto.inputs[key].arguments]
        if key in self.proto.attributes and key != "name":
            return [("value", self.proto.attributes[key])]  # iOS 16 constexpr ops keep data here
        return None

    def has(self, key: str) -> bool:
        return self._bindings(key) is not None

    def const(self, key: str, default: Any = REQUIRED) -> Any:
        """The value of a constant input (a runtime value here is an unsupported use)."""
        bindings = self._bindings(key)
        if bindings is None:
            if default is REQUIRED:
                raise ModelError(f"op {self.name!r} ({self.type}) lacks its input {key!r}")
            return default
        values = []
        for kind, binding in bindings:
            if kind == "name":
                if binding not in self.lowering.consts:
                    raise OPS.unsupported(self.type, self.name, f"a runtime {key!r}")
                values.append(self.lowering.consts[binding])
            else:
                values.append(self.lowering.values.read(binding, self.type, self.name))
        return values[0] if len(values) == 1 else values

    def var(self, key: str) -> str:
        """The name of the variable bound to ``key`` (a constant or a runtime value)."""
        names = self.vars(key)
        if len(names) != 1:
            raise ModelError(f"op {self.name!r} ({self.type}) needs one variable as {key!r}")
        return names[0]

    def vars(self, key: str) -> list[str]:
        bindings = self._bindings(key) or []
        if any(kind != "name" for kind, _ in bindings):
            raise OPS.unsupported(self.type, self.name, f"an inline value as {key!r}")
        for _, name in bindings:
            if name not in self.lowering.shapes:
                raise ModelError(f"op {self.name!r} ({self.type}) uses {name!r} before it is "
                                 f"defined")
        return [name for _, name in bindings]

    def is_const(self, key: str) -> bool:
        return self.var(key) in self.lowering.consts

    def rank(self, key: str) -> int:
        return len(self.lowering.shapes[self.var(key)])

    def shape(self, key: str) -> tuple:
        return self.lowering.shapes[self.var(key)]

    def not_batched(self) -> None:
        """This op mixes the batch axis with others: run the program one batch at a time."""
        self.lowering.batchable = False


def ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(value).reshape(-1))


def sorted_axes(values, rank: int) -> tuple[int, ...]:
    """Axes (negative allowed) of a rank-``rank`` value, sorted and non-negative."""
    return tuple(sorted(int(a) % rank for a in np.asarray(values).reshape(-1)))


def of_one(op: Op, fn, key: str = "x"):
    """What a builder returns for an op that computes ``fn(value)`` of its one input ``key``."""
    return (lambda args, owned: fn(args[0])), [op.var(key)]
