"""Quantization that passes, for any target: measure a quantized model on tuning images, rank its
layers by measured harm, and keep the most harmful ones in float until it agrees with the
original (docs/ARCHITECTURE.md, "Quantization: diagnosis and repair").

What is the same for every target lives here: the measures (top-1 agreement and mean
total-variation distance from the original's probabilities), the diagnosis loop (each layer's
harm when it alone is quantized), the repair loop (for a model whose activations are quantized,
first a run of float layers from the input; then layers back to float one at a time, most
harmful first, each kept only when it makes the model agree better, within a size budget) and
the record the reports show. The tuning set and what it can show (the repair's *aim*: until
the 95% lower bound of its agreement clears the target, or no disagreement on a smaller set,
which then spends the size budget) are in ``targets/_tuning.py``. What differs is how a target
makes and runs a candidate with some layers in float, a :class:`Candidates` (``_tflite_repair``:
full-integer TFLite over one calibration; ``_coreml_repair``: Core ML weights, int8 or float16).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from targets import Source, _tuning
from toolchain import atomic
from toolchain.errors import ModelError, first_line
from toolchain.untrusted import LIMITS, files

log = logging.getLogger("toolchain")

#: Tuning images each layer's harm alone is measured on: one candidate and one run per layer,
#: so this bounds the diagnosis' cost; the ranking needs no more (the repair steps use them all).
RANKING_IMAGES = 16
#: At most this many runs are tried in the gap below the first run that meets the target, so a
#: model with hundreds of layers pays a bounded price for a shorter run.
GAP_RUNS = 8


@dataclass(frozen=True)
class Layer:
    """One quantized layer, by the name its target's candidates take."""

    name: str
    op: str
    rmse_per_step: float  # sqrt(mean squared quantization error) / quantization step
    harm: float  # mean total-variation distance from the original with only this layer quantized

    def record(self) -> dict:
        return {"name": self.name, "op": self.op, "rmse_per_step": round(self.rmse_per_step, 5),
                "harm": round(self.harm, 5)}


@dataclass(frozen=True)
class Step:
    """One measured candidate: how many layers were float, and what that gave on tuning."""

    float_layers: int
    agreement: float
    max_abs_diff: float
    size: int
    layer: str = ""  # the layer this step tried in float ("" for the plain quantized model)
    distance: float = 0.0  # mean total-variation distance from the original's probabilities
    kept: bool = False  # whether the layer stayed in float (it made the model agree better)
    #: ``layer``: ``layer`` in float on top of those kept before; ``run``: the model's first
    #: ``float_layers`` layers in float (a run from the input ending at ``layer``); ``budget``:
    #: those kept and as many more as fit the budget (:func:`_spend`); "" for the plain model.
    trial: str = ""

    def better_than(self, other: Step) -> bool:
        """More top-1 agreement; at equal agreement, probabilities closer to the original's."""
        return (self.agreement, -self.distance) > (other.agreement, -other.distance)

    def record(self) -> dict:
        return {"float_layers": self.float_layers, "layer": self.layer, "trial": self.trial,
                "kept": self.kept,
                "top1_agreement": round(self.agreement, 5),
                "mean_distance": round(self.distance, 5),
                "max_abs_diff": round(self.max_abs_diff, 5), "bytes": self.size}


@dataclass(frozen=True)
class Repair:
    """What a repair stage measured and decided. ``model`` is the repaired candidate when one
    met ``target`` within ``budget`` bytes, else None and ``reason`` says why."""

    tuning: tuple[Path, ...]
    tuning_from: dict[str, int]
    target: float
    float32_size: int
    budget: int
    pure: Step
    precision: str = "int8"
    #: What the tuning images must show for ``target`` to hold elsewhere (:func:`_tuning.aim`):
    #: the least agreement whose 95% lower bound clears it; 1.0 on a set too small for that.
    aim: float = 1.0
    layers: tuple[Layer, ...] = ()
    steps: tuple[Step, ...] = ()
    model: Any = field(default=None, repr=False)
    float_layers: tuple[str, ...] = ()
    reason: str = ""
    float_run: int = 0  # how many of float_layers are the model's first layers (a run)

    @property
    def kept(self) -> Step | None:
        """The step whose model was kept (the repaired one), if any."""
        return chosen(self.steps) if self.model is not None else None

    def float_text(self) -> str:
        """``3 layer(s)``, or ``13 layer(s) (a run of 11 from the input, then 2 more)``."""
        count = len(self.float_layers)
        if not self.float_run:
            return f"{count} layer(s)"
        more = count - self.float_run
        return (f"{count} layer(s) (a run of {self.float_run} from the input"
                f"{f', then {more} more' if more else ''})")

    @property
    def needed(self) -> bool:
        return self.pure.agreement < self.aim

    @property
    def spends(self) -> bool:
        """The tuning set cannot show the target (:func:`targets._tuning.proves`): after meeting
        the aim, the repair spends its size budget on float layers."""
        return not _tuning.proves(self.target, len(self.tuning))

    @property
    def aim_text(self) -> str:
        """``0.9966 (for 0.98)``, or ``no disagreement (29 tuning images cannot show 0.98)``."""
        if not self.spends:
            return f"{self.aim:.4f} (for {self.target:g})"
        return f"no disagreement ({len(self.tuning)} tuning images cannot show {self.target:g})"

    def record(self) -> dict:
        """JSON for the target's ``*.quantization.json`` and the reports. ``int8`` is the plain
        quantized model's step whatever ``precision`` it has (the key predates float16)."""
        return {"precision": self.precision, "tuning_images": len(self.tuning),
                "tuning": [str(path) for path in self.tuning],
                "tuning_from": self.tuning_from,
                "target_top1_agreement": self.target, "aim_top1_agreement": self.aim,
                "tuning_shows": _tuning.shows(self.target, len(self.tuning)),
                "float32_bytes": self.float32_size, "budget_bytes": self.budget,
                "int8": self.pure.record(), "needed": self.needed,
                "repaired": self.model is not None,
                "float_layers": list(self.float_layers), "float_run": self.float_run,
                "reason": self.reason,
                "layers": [layer.record() for layer in self.layers],
                "steps": [step.record() for step in self.steps]}


class Candidates(Protocol):
    """How one target makes and runs candidates of one quantized model.

    ``quantizes_activations``: whether the model's activations are quantized too (full-integer
    TFLite), not only its weights. Then a layer in float among quantized ones still reads and
    writes quantized tensors, while a tensor between two float layers stays float: only a run of
    float layers removes the activations' rounding, and the repair tries runs from the input
    first (:func:`_runs`)."""

    quantizes_activations: bool

    def layer_errors(self) -> list[tuple[str, str, float]]:
        """(name, op, RMSE / quantization step) of every quantized layer, in model order."""

    def build(self, float_layers: Sequence[str]) -> tuple[Any, int]:
        """The model with ``float_layers`` kept in float (everything else quantized as in the
        plain artifact), and its size in bytes."""

    def alone(self, name: str) -> Any:
        """The model with only ``name`` quantized."""

    def probabilities(self, model: Any, pixels: np.ndarray) -> np.ndarray:
        """``model``'s probabilities for uint8 RGB ``pixels``, in the labels' order."""


def chosen(steps: Sequence):
    """The repaired model's step among a repair's ``steps`` (:class:`Step` or their records):
    the last one kept. Steps are in the order measured, and a run from the input that a
    shorter one replaced comes before it."""
    kept = [step for step in steps if (step["kept"] if isinstance(step, dict) else step.kept)]
    return kept[-1] if kept else None


def origin_text(counts: dict[str, int]) -> str:
    """``29 validation`` or ``12 validation, 8 training``: where the tuning images came from
    (a record's ``tuning_from``)."""
    return ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)


def rmse_per_step(exact: np.ndarray, stored: np.ndarray, step: np.ndarray) -> float:
    """A layer's error: the root mean square of (exact - stored) in units of the quantization
    step at each value (values with no step are left out)."""
    used = step > 0
    return float(np.sqrt(np.mean(((exact - stored)[used] / step[used]) ** 2))) if used.any() \
        else 0.0


def distance(got: np.ndarray, reference: np.ndarray) -> float:
    """Mean total-variation distance between two sets of probability rows."""
    return float(np.abs(got - reference).sum(axis=1).mean() / 2)


def measure(got: np.ndarray, reference: np.ndarray, size: int, float_layers: int,
            layer: str = "") -> Step:
    """A candidate's step from its probabilities on the tuning images."""
    agreement = float(np.mean(got.argmax(1) == reference.argmax(1)))
    return Step(float_layers, agreement, float(np.abs(got - reference).max()), size, layer,
                distance(got, reference))


def search(candidates: Candidates, *, paths: Sequence[Path], origin: dict[str, int],
           pixels: np.ndarray, reference: np.ndarray, target: float, float32_size: int,
           max_size_ratio: float, precision: str = "int8", diagnose_always: bool = False,
           repair_allowed: bool = True) -> Repair:
    """Measure the plain quantized model on the tuning ``pixels`` against the original's
    ``reference`` probabilities; when it misses its aim (``target``, or no disagreement on a set
    too small to show ``target``: :func:`targets._tuning.aim`) or on ``diagnose_always``,
    diagnose every layer; when it misses the aim and ``repair_allowed``, repair within the budget of
    ``max_size_ratio`` of the float32 model's size."""
    model, size = candidates.build(())
    pure = measure(candidates.probabilities(model, pixels), reference, size, 0)
    outcome = Repair(tuple(paths), dict(origin), target, float32_size,
                     int(max_size_ratio * float32_size), pure, precision,
                     _tuning.aim(target, len(paths)))
    if not (outcome.needed or diagnose_always):
        return outcome
    outcome = replace(outcome, layers=diagnose(candidates, pixels, reference))
    if not (outcome.needed and repair_allowed):
        return outcome
    return _repair(outcome, candidates, pixels, reference)


def diagnose(candidates: Candidates, pixels, reference) -> tuple[Layer, ...]:
    """Every quantized layer with its step-relative error and its measured harm alone, most
    harmful first (ties: larger step-relative error first)."""
    pixels, reference = pixels[:RANKING_IMAGES], reference[:RANKING_IMAGES]
    layers = [Layer(name, op, error,
                    distance(candidates.probabilities(candidates.alone(name), pixels), reference))
              for name, op, error in candidates.layer_errors()]
    return tuple(sorted(layers, key=lambda layer: (-layer.harm, -layer.rmse_per_step)))


def run_lengths(count: int) -> list[int]:
    """Lengths of the float runs from the input tried, each about 1.5 times the last and all
    shorter than ``count`` (all layers float is no longer a quantized model): agreement is not
    monotonic in the length (a trained MobileNet v2: 0.9718 with 10 layers, 0.9859 with 11,
    0.9577 with 12), so bisection would be wrong, and one candidate per length would double the
    repair's cost on a model no run rescues."""
    lengths, length = [], 1
    while length < count:
        lengths.append(length)
        length += max(1, length // 2)
    return lengths


def gap_lengths(previous: int, length: int) -> range:
    """The run lengths tried between ``previous`` (a run that missed the target) and ``length``
    (the first that met it), shortest first: every one when the gap is small, else
    :data:`GAP_RUNS` evenly spaced."""
    between = length - previous - 1
    return range(previous + 1, length, max(1, -(-between // GAP_RUNS)))


class _Trials:
    """Candidates measured on every tuning image, in order, each a :class:`Step`."""

    def __init__(self, outcome: Repair, candidates: Candidates, pixels, reference) -> None:
        self.outcome, self.candidates = outcome, candidates
        self.pixels, self.reference = pixels, reference
        self.steps: list[Step] = []

    def run(self, float_layers: Sequence[str], layer: str, trial: str, built=None):
        """(step, model) of the candidate with ``float_layers`` in float (``built``: already
        made), or None when it is over the budget (then nothing was measured)."""
        candidate, size = built or self.candidates.build(float_layers)
        if size > self.outcome.budget:
            return None
        step = measure(self.candidates.probabilities(candidate, self.pixels), self.reference,
                       size, len(float_layers), layer)
        self.steps.append(replace(step, trial=trial))
        return self.steps[-1], candidate

    def keep(self, step: Step) -> Step:
        """Mark ``step`` (one of ``steps``, found by identity) kept, and return it so."""
        index = max(i for i, found in enumerate(self.steps) if found is step)
        self.steps[index] = replace(step, kept=True)
        return self.steps[index]


def _runs(trials: _Trials, order: Sequence[str]):
    """The runs of float layers from the input (:func:`run_lengths`), until one meets the
    aim, then lengths in the gap before it (:func:`gap_lengths`), for the shortest that does (a
    float layer near the input costs little size, but its work is on the largest images, which
    a phone's int8 accelerator may run faster). On a tuning set that cannot show the target
    (``Repair.spends``) a shorter run meeting the aim would only be the luckier: the runs go on
    within the budget, and the longest that meets the aim is kept. Returns the best run's (step,
    model), None when none beat the plain model; and a sentence on what was tried."""
    outcome = trials.outcome
    found, previous, longest = None, 0, None
    for length in run_lengths(len(order)):
        measured = trials.run(order[:length], order[length - 1], "run")
        if measured is None:
            break  # a longer run only adds float weights
        if measured[0].better_than(found[0] if found else outcome.pure):
            found = measured
        if measured[0].agreement >= outcome.aim and outcome.spends:
            longest = measured
        elif measured[0].agreement >= outcome.aim:
            for shorter in gap_lengths(previous, length):
                candidate = trials.run(order[:shorter], order[shorter - 1], "run")
                if candidate is not None and candidate[0].agreement >= outcome.aim:
                    found = candidate
                    break
            break
        previous = length
    found = longest or found
    tried = sum(step.trial == "run" for step in trials.steps)
    if not tried:
        return None, "no run of float layers from the input fits the budget"
    said = f"{tried} run(s) of float layers from the input tried"
    if found is None:
        return None, said + " (none made it agree better)"
    step = trials.keep(found[0])
    return (step, found[1]), (f"{said} (the best, the first {step.float_layers}, agreed on "
                              f"{step.agreement:.4f})")


def _repair(outcome: Repair, candidates: Candidates, pixels, reference) -> Repair:
    """For a model with quantized activations, first a run of float layers from the input
    (:func:`_runs`; on a trained MobileNet v2 the first 11 layers in float took int8 from
    0.9577 to 0.9859 of its tuning images at no measurable size, where 10 layers chosen one at
    a time reached 0.9718 at 0.49 of float32). Then layers go back to float one at a time, most
    harmful first, each re-measured on every tuning image and kept only when it makes the model
    agree better (errors do not add up: on that MobileNet v2, 8 layers in float gave 0.966 and
    16 gave 0.897), until the aim is met (then, on a tuning set that cannot show the target,
    :func:`_spend`). A layer that would take the model over the budget is passed over; smaller
    ones may still fit."""
    trials = _Trials(outcome, candidates, pixels, reference)
    kept: list[str] = []
    best, model, run, runs_said = outcome.pure, None, 0, ""
    if candidates.quantizes_activations:
        order = [name for name, _, _ in candidates.layer_errors()]
        found, runs_said = _runs(trials, order)
        if found is not None:
            best, model = found
            run = best.float_layers
            kept = list(order[:run])
            if best.agreement >= outcome.aim:
                if outcome.spends:
                    kept, model = _spend(trials, kept, best, model)
                return replace(outcome, steps=tuple(trials.steps), float_layers=tuple(kept),
                               float_run=run, model=model)
    over, tried = 0, 0
    for layer in outcome.layers:
        if layer.name in kept:
            continue
        tried += 1
        measured = trials.run([*kept, layer.name], layer.name, "layer")
        if measured is None:
            over += 1
            continue
        if measured[0].better_than(best):
            best, model = trials.keep(measured[0]), measured[1]
            kept.append(layer.name)
        if best.agreement >= outcome.aim:
            if outcome.spends:
                kept, model = _spend(trials, kept, best, model)
            return replace(outcome, steps=tuple(trials.steps), float_layers=tuple(kept),
                           float_run=run, model=model)
    said = (f"{tried} layer(s) tried in float one at a time, {len(kept) - run} kept "
            f"(each made it agree better)")
    if over:
        said += (f", {over} passed over: each would have taken the model over the budget of "
                 f"{outcome.budget / outcome.float32_size:.2f} of float32's size")
    if runs_said:
        said = f"{runs_said}; then {said}"
    said = (f"{said}; the best agreed on {best.agreement:.4f} of {len(pixels)} tuning images "
            f"(aiming at {outcome.aim_text})")
    if candidates.quantizes_activations:
        said += _longest_run(outcome, candidates, pixels, reference)
    return replace(outcome, steps=tuple(trials.steps), float_layers=(), model=None, reason=said)


def _spend(trials: _Trials, kept: list[str], best: Step, model):
    """On a tuning set that cannot show the target, the repaired candidate with as many more
    layers in float as fit the budget, most harmful first (the largest prefix that fits, found
    by size alone and measured once), kept when it still meets the aim and is no further from
    the original: ``(kept, model)``, else the ones given."""
    outcome, candidates = trials.outcome, trials.candidates
    rest = [layer.name for layer in outcome.layers if layer.name not in kept]
    low, high, fits = 0, len(rest), None  # the largest count of ``rest`` that fits
    while low < high:
        middle = (low + high + 1) // 2
        built = candidates.build([*kept, *rest[:middle]])
        if built[1] <= outcome.budget:
            low, fits = middle, built
        else:
            high = middle - 1
    if not low:
        return kept, model
    more = [*kept, *rest[:low]]
    measured = trials.run(more, rest[low - 1], "budget", fits)
    if (measured is None or measured[0].agreement < outcome.aim
            or measured[0].distance > best.distance):
        return kept, model
    trials.keep(measured[0])
    return more, measured[1]


def _longest_run(outcome: Repair, candidates: Candidates, pixels, reference) -> str:
    """A clause of the reason when the repair failed: could a larger budget help? The longest
    run from the input (every layer but the last in float) is measured whatever its size, not as
    a step. On the demo's random-weight MobileNet v3 small it agreed on 0.9310 of 29 tuning
    images where the search (budget 0.5 or 1.0) stopped at 0.8966: the head's logits span about
    2600, the top two differ by 7.5 (median), less than one int8 step of that range (10.3)."""
    order = [name for name, _, _ in candidates.layer_errors()]
    if len(order) < 2:
        return ""  # a one-layer model: that run is no model at all
    model, size = candidates.build(order[:-1])
    step = measure(candidates.probabilities(model, pixels), reference, size, len(order) - 1)
    agreement, ratio = step.agreement, size / outcome.float32_size
    if agreement >= outcome.aim:
        return (f"; every layer but the last in float agrees ({agreement:.4f}) at {ratio:.2f} "
                f"of float32's size, so a larger size budget may find a repair")
    return (f"; even every layer but the last in float ({ratio:.2f} of float32's size) agrees on "
            f"only {agreement:.4f}, so a larger size budget is unlikely to help; a weight-only "
            f"variant (dynamic, float16) keeps activations in float")


def with_float_layers(source: Source, outcome: Repair) -> Source:
    """``source`` whose provenance (written into the repaired artifact) lists the layers the
    repair kept in float."""
    return dataclasses.replace(source, user_defined={
        **source.user_defined,
        "quantization": f"{outcome.precision}, {len(outcome.float_layers)} layer(s) kept in "
                        f"float32 (toolchain's repair)",
        "float_layers": json.dumps(list(outcome.float_layers))})


def announce(said: str, outcome: Repair, mixed: Path, size: int, flag: str) -> None:
    """One log line on what the stage found: repaired into ``mixed`` (``size`` bytes), not
    repaired and why (``flag`` switched it off when there is no reason), or not needed."""
    if outcome.model is not None:
        log.info("%s, short of %s; with %s kept in float: %.4f, %.2f MB (%.2f of "
                 "float32) -> %s", said, outcome.aim_text, outcome.float_text(),
                 outcome.kept.agreement, size / 1e6, size / outcome.float32_size, mixed.name)
    elif outcome.needed:
        log.warning("%s, short of %s; not repaired: %s", said, outcome.aim_text,
                    outcome.reason or flag)
    else:
        log.info("%s: no repair needed", said)


def write_record(report: Path, artifact: Path, mixed: Path | None, outcome: Repair) -> None:
    """The record beside the artifact (atomically): what the reports show."""
    atomic.write_json(report, {"artifact": Path(artifact).name,
                               "repaired_artifact": (mixed.name if mixed is not None
                                                     and mixed.exists() else None),
                               **outcome.record()})


def read_record(report: Path) -> dict | None:
    """A target's ``diagnosis`` (None if absent); an unreadable or oversized one is a warning."""
    if not report.is_file():
        return None
    try:
        found = files.read_json(report, LIMITS.split_bytes)
    except (OSError, ValueError, ModelError) as error:
        log.warning("cannot read %s: %s", report, first_line(error))
        return None
    return found if isinstance(found, dict) else None


def failure_note(artifact: str, record: dict, failed: set[str]) -> str | None:
    """The verifier's warning when ``artifact`` (or its repaired model) is among ``failed``:
    what the tuning set showed (``record``, as written) and why that did not hold."""
    mixed = record.get("repaired_artifact")
    if not failed & {artifact, mixed}:
        return None
    tuning, target = record["tuning_images"], record["target_top1_agreement"]
    line = (f"{artifact}: {record.get('precision', 'int8')} agreed with the original on "
            f"{record['int8']['top1_agreement']:.4f} of {tuning} tuning images")
    yardstick = (f"{tuning} tuning images cannot promise {target:g} on others; more "
                 f"validation images (--validation-percentage) make a better yardstick")
    if mixed:
        kept = chosen(record["steps"])
        line += (f"; with {kept['float_layers']} layer(s) kept in float, "
                 f"{kept['top1_agreement']:.4f} -> {mixed}")
        return line + (f", which still fails on the held-out images: {yardstick}"
                       if mixed in failed else ", which passes")
    if record["needed"]:
        short = (f"below {target:g}" if record["int8"]["top1_agreement"] < target
                 else "short of no disagreement on them")
        return line + f", {short}; not repaired: {record['reason'] or 'switched off'}"
    return line + f" (target {target:g}), so it was not repaired; {yardstick}"
