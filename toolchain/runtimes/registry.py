"""The op registry type of the Core ML executors, and their one "not implemented" error.

Each format has its own instance: NeuralNetwork layer kinds (``nn_layers.LAYERS``, noun
"layer") and ML Program op types (``mil_ops.OPS``, noun "op") are different namespaces, but
both map a name to the builder that lowers it to plan steps, the same way:

- ``@registry.register(*names, view=...)`` adds a builder; a name registered twice is a
  programming error, raised when the module is imported (never a silent overwrite);
- ``registry.build(kind, name, *args)`` runs the builder of ``kind`` (or raises the
  ``UnsupportedLayer`` naming the model's layer / op: nothing is ever skipped);
- ``registry.executed``, when a set (tests set one), collects the names whose steps have run:
  the meta-test uses it to check that every registered name has a test that exercises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolchain.errors import ModelError, ToolchainError, UnsupportedLayer, describe


def unsupported(noun: str, kind: str, name: str, what: str = "") -> UnsupportedLayer:
    """The one-line error for a layer / op (``noun``) of type ``kind`` that the executor does
    not implement, or implements without ``what`` (an attribute, a mode, a kind of value)."""
    detail = f" ({what})" if what else ""
    return UnsupportedLayer(f"the NumPy Core ML executor does not implement {noun} type "
                            f"{kind!r}{detail} ({noun} {name!r})")


@dataclass(frozen=True)
class Entry:
    """One registered builder. ``view``: the steps it builds may return a view of (memory
    shared with) their first input, which the scheduler must know before it lets a later step
    overwrite that input."""

    build: Callable[..., Any]
    view: bool = False


class Registry:
    """Names of one format (layer kinds or op types) → their builders; see the module doc."""

    def __init__(self, noun: str) -> None:
        self.noun = noun
        self._entries: dict[str, Entry] = {}
        #: None, or the set that collects the names of the steps that ran (for tests).
        self.executed: set[str] | None = None

    def register(self, *names: str, view: bool = False) -> Callable:
        """Decorator: ``build`` lowers every one of ``names``; a duplicate name raises."""
        def add(build: Callable) -> Callable:
            for name in names:
                if name in self._entries or names.count(name) > 1:
                    first = self._entries.get(name, Entry(build)).build.__qualname__
                    raise ValueError(f"{self.noun} type {name!r} is registered twice "
                                     f"({first} and {build.__qualname__})")
            self._entries.update((name, Entry(build, view)) for name in names)
            return build
        return add

    def names(self) -> frozenset[str]:
        return frozenset(self._entries)

    def __contains__(self, kind: str) -> bool:
        return kind in self._entries

    def entry(self, kind: str, name: str) -> Entry:
        """The builder of ``kind``, or the UnsupportedLayer naming ``name`` (the layer / op)."""
        found = self._entries.get(kind)
        if found is None:
            raise self.unsupported(kind, name)
        return found

    def build(self, kind: str, name: str, *args) -> tuple[Any, bool]:
        """``(what the builder of kind returns for args, its view flag)``; a builder that fails
        on a malformed layer / op (NumPy, protobuf) is a ModelError naming it, with the cause."""
        entry = self.entry(kind, name)
        try:
            return entry.build(*args), entry.view
        except ToolchainError:
            raise
        except Exception as error:  # noqa: BLE001 (malformed specs fail in assorted ways)
            raise ModelError(f"{self.noun} {name!r} ({kind}) cannot be read: "
                             f"{describe(error)}") from error

    def unsupported(self, kind: str, name: str, what: str = "") -> UnsupportedLayer:
        return unsupported(self.noun, kind, name, what)
