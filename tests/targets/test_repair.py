"""The shared repair search (``targets._repair``) on stand-in candidates whose agreement is a
known function of which layers are float: which candidates it measures, in what order, what it
keeps, and what it says when it stops. The real targets' candidates are tested through
``tests/targets/test_tflite_repair.py`` and ``test_coreml_repair.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from targets import _repair

#: Enough tuning images to show the stand-ins' target of 0.8: the repair aims at 0.88, the least
#: agreement whose 95% lower bound clears 0.8; smaller sets: test_a_small_tuning_set_*.
TUNING = 100
REFERENCE = np.tile([0.9, 0.1], (100, 1))


class _Stand:
    """Candidates of a model with layers ``l0``… in model order; ``score(floats)`` gives the
    fraction of the tuning images a candidate with those float layers agrees on. Each float
    layer adds ``size`` bytes to ``base``, and makes the probabilities a little closer to the
    original's (so equal agreements are told apart by distance, as real ones are)."""

    def __init__(self, score, *, layers: int = 10, activations: bool = True,
                 base: int = 100, size: int = 10) -> None:
        self.names = [f"l{index}" for index in range(layers)]
        self.score, self.base, self.size = score, base, size
        self.quantizes_activations = activations
        self.built: list[frozenset] = []

    def layer_errors(self):
        return [(name, "CONV_2D", 0.5) for name in self.names]

    def build(self, float_layers):
        self.built.append(frozenset(float_layers))
        return frozenset(float_layers), self.base + self.size * len(set(float_layers))

    def alone(self, name):
        return frozenset(self.names) - {name}

    def probabilities(self, model, pixels):
        agreeing = round(self.score(model) * len(pixels))
        closer = 0.05 / (1 + len(model))
        rows = [[0.9 - closer, 0.1 + closer] if index < agreeing else [0.1, 0.9]
                for index in range(len(pixels))]
        return np.array(rows)


def _run(floats) -> int:
    """How many of the model's first layers are float: the run from the input."""
    length = 0
    while f"l{length}" in floats:
        length += 1
    return length


def _search(stand: _Stand, *, target: float = 0.8, ratio: float = 1.0,
            tuning: int = TUNING) -> _repair.Repair:
    return _repair.search(stand, paths=[Path(f"{index}.jpg") for index in range(tuning)],
                          origin={"validation": tuning}, pixels=np.zeros((tuning, 1)),
                          reference=REFERENCE[:tuning], target=target, float32_size=1000,
                          max_size_ratio=ratio)


def test_run_lengths_grow_by_half_and_stop_before_every_layer():
    assert _repair.run_lengths(69) == [1, 2, 3, 4, 6, 9, 13, 19, 28, 42, 63]
    assert _repair.run_lengths(2) == [1] and _repair.run_lengths(1) == []
    lengths = _repair.run_lengths(500)
    assert lengths == sorted(set(lengths)) and lengths[-1] < 500


def test_the_gap_is_tried_whole_when_small_and_in_eight_steps_when_large():
    assert list(_repair.gap_lengths(13, 19)) == [14, 15, 16, 17, 18]
    assert list(_repair.gap_lengths(4, 6)) == [5] and list(_repair.gap_lengths(0, 1)) == []
    large = list(_repair.gap_lengths(63, 94))  # 30 lengths between
    assert len(large) == _repair.GAP_RUNS and large[0] == 64 and large[-1] < 94
    assert large == list(range(64, 94, 4))


def test_a_run_from_the_input_that_agrees_is_kept_and_shortened_to_the_first_that_does():
    """Runs of 1, 2, 3, 4 and 6 layers are tried; 6 agrees, so the gap (5) is tried and agrees
    too: the first five layers are the repair, and no layer is tried alone."""
    stand = _Stand(lambda floats: 0.95 if _run(floats) >= 5 else 0.5 + 0.05 * _run(floats))
    outcome = _search(stand)
    assert [(step.trial, step.float_layers) for step in outcome.steps] == [
        ("run", 1), ("run", 2), ("run", 3), ("run", 4), ("run", 6), ("run", 5)]
    assert outcome.model == frozenset(stand.names[:5])
    assert outcome.float_layers == tuple(stand.names[:5]) and outcome.float_run == 5
    assert outcome.kept is outcome.steps[-1] and outcome.kept.agreement == 0.95
    assert [step.kept for step in outcome.steps] == [False] * 5 + [True]
    assert outcome.float_text() == "5 layer(s) (a run of 5 from the input)"
    record = outcome.record()
    assert record["float_run"] == 5 and record["steps"][-1]["trial"] == "run"
    assert _repair.chosen(record["steps"]) == record["steps"][-1]


def test_when_the_longer_run_is_the_only_one_that_agrees_it_is_the_one_kept():
    stand = _Stand(lambda floats: 0.95 if _run(floats) >= 6 else 0.5)
    outcome = _search(stand)
    assert [step.float_layers for step in outcome.steps] == [1, 2, 3, 4, 6, 5]
    assert outcome.float_run == 6 and outcome.kept.float_layers == 6
    assert outcome.kept is not outcome.steps[-1]  # the gap's run was measured after it
    assert _repair.chosen(outcome.record()["steps"])["float_layers"] == 6


def test_layers_one_at_a_time_start_from_the_best_run():
    """No run reaches the target (the longest, of 28 layers, agrees best); the one-at-a-time
    repair then adds layers outside that run, and keeps the one that helps."""
    stand = _Stand(lambda floats: min(0.85, 0.5 + 0.05 * _run(floats))
                   + (0.1 if "l29" in floats else 0.0), layers=30)
    outcome = _search(stand)
    runs = [step for step in outcome.steps if step.trial == "run"]
    assert [step.float_layers for step in runs] == _repair.run_lengths(30)
    layers = [step for step in outcome.steps if step.trial == "layer"]
    assert {step.layer for step in layers} <= {"l28", "l29"}
    assert all(step.float_layers == 29 for step in layers)
    assert outcome.float_layers == (*stand.names[:28], "l29") and outcome.float_run == 28
    assert outcome.kept.layer == "l29" and outcome.kept.agreement == pytest.approx(0.95)
    assert outcome.float_text() == "29 layer(s) (a run of 28 from the input, then 1 more)"


def test_a_weight_only_model_never_tries_runs():
    stand = _Stand(lambda floats: 0.95 if "l3" in floats else 0.5, activations=False)
    outcome = _search(stand)
    assert {step.trial for step in outcome.steps} == {"layer"}
    assert outcome.float_layers == ("l3",) and outcome.float_run == 0
    assert outcome.float_text() == "1 layer(s)"


def test_runs_stop_at_the_budget_and_the_reason_says_what_was_tried():
    """Budget 140 bytes: runs of up to 4 layers fit (140), the run of 6 does not, and nothing
    longer is built; one layer at a time then fits on top of none of them."""
    stand = _Stand(lambda floats: 0.5 + 0.05 * _run(floats))
    outcome = _search(stand, ratio=0.14)
    runs = [step.float_layers for step in outcome.steps if step.trial == "run"]
    assert runs == [1, 2, 3, 4]
    assert max(len(built) for built in stand.built[:-1]) <= 6
    assert outcome.model is None and outcome.float_layers == ()
    assert outcome.reason == (
        "4 run(s) of float layers from the input tried (the best, the first 4, agreed on "
        "0.7000); then 6 layer(s) tried in float one at a time, 0 kept (each made it agree "
        "better), 6 passed over: each would have taken the model over the budget of 0.14 of "
        "float32's size; the best agreed on 0.7000 of 100 tuning images (aiming at 0.8800 "
        "(for 0.8)); every layer but the last in float agrees (0.9500) at 0.19 of float32's "
        "size, so a larger size budget may find a repair")
    assert stand.built[-1] == frozenset(stand.names[:9])  # measured over the budget, not kept


def test_when_even_every_layer_but_the_last_in_float_misses_the_reason_says_so():
    """Only the whole model in float agrees: no budget would let the search repair it, and the
    reason says what the longest run from the input (measured last, not a step) agreed on. The
    budget (0.19) fits nine float layers, not ten."""
    stand = _Stand(lambda floats: 0.95 if len(floats) == 10 else 0.6)
    outcome = _search(stand, ratio=0.19)
    assert outcome.model is None and outcome.float_layers == ()
    assert stand.built[-1] == frozenset(stand.names[:9])
    # the plain model, the steps, l9 (over the budget, not a step), then the longest run
    assert len(stand.built) == 1 + len(outcome.steps) + 1 + 1
    assert outcome.reason.endswith(
        "the best agreed on 0.6000 of 100 tuning images (aiming at 0.8800 (for 0.8)); even "
        "every layer but the last in float (0.19 of float32's size) agrees on only 0.6000, so "
        "a larger size budget is unlikely to help; a weight-only variant (dynamic, float16) "
        "keeps activations in float")


def test_a_weight_only_model_that_cannot_be_repaired_measures_no_longest_run():
    stand = _Stand(lambda floats: 0.5, activations=False)
    outcome = _search(stand)
    assert outcome.reason.endswith("the best agreed on 0.5000 of 100 tuning images (aiming at "
                                   "0.8800 (for 0.8))")
    assert len(stand.built) == 1 + len(outcome.steps)  # the plain model, then each step's


def test_no_run_fits_a_budget_below_one_float_layer():
    stand = _Stand(lambda floats: 0.5)
    outcome = _search(stand, ratio=0.105)
    assert outcome.steps == () and outcome.model is None
    assert outcome.reason.startswith(
        "no run of float layers from the input fits the budget; then 10 layer(s) tried in "
        "float one at a time, 0 kept (each made it agree better), 10 passed over")


def test_no_repair_when_the_plain_model_agrees():
    stand = _Stand(lambda floats: 1.0)
    outcome = _search(stand)
    assert not outcome.needed and outcome.steps == () and outcome.layers == ()
    assert stand.built == [frozenset()]


def test_a_small_tuning_set_aims_at_no_disagreement_then_spends_the_budget():
    """75 of 76 tuning images (0.9868) met 0.98 on a real graph and agreed on 0.975 of 240 other
    photos: 76 images cannot show 0.98, so the repair aims at none disagreeing, and as such a set
    cannot tell a lucky run from a good one, it keeps the longest run within the budget that
    has none (9 of 10 layers), not the first (6) nor a shorter one in the gap; then, as after
    any repair on such a set, one candidate with the rest of the budget in float too."""
    stand = _Stand(lambda floats: 1.0 if _run(floats) >= 6 else
                   0.9868 if _run(floats) >= 4 else 0.9)
    outcome = _search(stand, target=0.98, tuning=76)
    assert outcome.aim == 1.0 and outcome.needed and outcome.spends
    assert outcome.aim_text == "no disagreement (76 tuning images cannot show 0.98)"
    record = outcome.record()
    assert (record["target_top1_agreement"], record["aim_top1_agreement"]) == (0.98, 1.0)
    assert record["tuning_shows"] == (
        "76 tuning images cannot show 0.98 (all of them agreeing has a 95% lower bound of "
        "0.952), so the repair aimed at none disagreeing, then spent its size budget on float "
        "layers; the verifier's held-out images decide")
    assert [step.float_layers for step in outcome.steps if step.trial == "run"] == [
        1, 2, 3, 4, 6, 9]
    assert [step.float_layers for step in outcome.steps if step.trial == "budget"] == [10]
    assert outcome.float_run == 9 and outcome.kept.agreement == 1.0


def test_a_small_tuning_set_spends_the_budget_on_layers_one_at_a_time_too():
    """Weight-only: l3 in float meets the aim; then as many more layers as fit the budget (160
    bytes: the stand-in's 100, and 10 per float layer, so six in all) go float in one candidate,
    kept as it still agrees on every image and is closer to the original."""
    stand = _Stand(lambda floats: 1.0 if "l3" in floats else 0.9, activations=False)
    outcome = _search(stand, target=0.98, tuning=30, ratio=0.16)
    budget = [step for step in outcome.steps if step.trial == "budget"]
    assert len(budget) == 1 and budget[0].kept and outcome.kept is budget[0]
    assert outcome.float_layers[0] == "l3" and len(outcome.float_layers) == 6
    assert outcome.kept.size <= outcome.budget < outcome.kept.size + 10


def test_a_tuning_set_that_can_show_the_target_aims_past_it_and_spends_nothing():
    outcome = _search(_Stand(lambda floats: 0.96 if _run(floats) >= 4 else 0.9), target=0.9,
                      tuning=100)
    assert outcome.aim == 0.96 and not outcome.spends and outcome.float_run == 4
    assert outcome.record()["tuning_shows"] == ("100 tuning images can show 0.9: the repair "
                                                "aimed at 0.9600 of them, whose 95% lower "
                                                "bound clears it")
    assert "budget" not in {step.trial for step in outcome.steps}


def test_one_disagreement_on_a_small_tuning_set_is_a_repair_needed():
    """0.98 allows one disagreement in 50 to 99 images; the aim on so few allows none."""
    assert _search(_Stand(lambda floats: 1.0), target=0.98, tuning=76).needed is False
    outcome = _search(_Stand(lambda floats: 75 / 76, activations=False), target=0.98,
                      tuning=76)
    assert outcome.pure.agreement >= 0.98 and outcome.needed
