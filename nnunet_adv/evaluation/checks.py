"""Checks that say when a worst-case Dice cannot be trusted (Carlini et al., "On Evaluating
Adversarial Robustness", 2019; the reasons AutoAttack exists).

Each check reads what the evaluation ran for one model and returns its numbers and a status,
``pass``, ``warn`` or ``not run`` (the evaluation ran nothing it could read):

==============  =====================================================================  =================
check           warns when                                                             catches
==============  =====================================================================  =================
gradient        the attacks' first input gradient is zero on more than half the        gradient masking
                voxels, or a first-order step of the whole budget promises less than   (shattered or
                ``MIN_LINEAR_GAIN`` of cross-entropy                                   vanishing)
loss rises      a gradient attack's objective never rises above its first value in     masking, a step
                at least half the cases                                                size too small
gradient-free   Square or a transfer attack beats the white-box worst case by more     masking (the
or transfer     than ``MARGIN`` Dice                                                   gradient lies)
saturation      a very large budget (64/255) leaves a mean Dice above                  a broken attack
                ``SATURATION_DICE`` 0.25 (an all-background prediction scores 0)       or threat model
convergence     the strongest white-box attack with ``factor`` x the steps lowers the  too few steps
                worst case by more than ``MARGIN``
==============  =====================================================================  =================

Dice everywhere is the per-case foreground Dice of nnU-Net's prediction of the written images; a
mean is over the cases with a number (NaN: no foreground in reference and prediction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: a Dice difference that is more than noise between two attacks on the same images
MARGIN = 0.02
#: share of exactly-zero input-gradient entries above which the gradient is called masked
MAX_ZERO_FRACTION = 0.5
#: cross-entropy a first-order step of the whole L-inf budget must promise (below: vanishing gradient)
MIN_LINEAR_GAIN = 1e-3
#: mean Dice an attack at the saturation budget must reach: a quarter of a perfect segmentation (an
#: all-background prediction scores 0; an attack allowed a quarter of the window per voxel that cannot
#: get there is not working, or the budget's units are wrong)
SATURATION_DICE = 0.25
#: the budget of the saturation check, x/255 of the window
SATURATION_EPS = 64.0

PASS, WARN, NOT_RUN = "pass", "warn", "not run"


@dataclass
class Evidence:
    """What one model's checks read; per-case lists are in the evaluation's case order.

    Attributes:
        white_box: label -> per-case Dice of the gradient attacks crafted on the model itself;
        other: label -> per-case Dice of the gradient-free attacks and the transfer attacks;
        convergence: (label, per-case Dice) of the strongest white-box attack re-run with more steps;
        saturation: per-case Dice at :data:`SATURATION_EPS`;
        gradients: the ``input_gradient`` records of attack.json (one per case, first gradient attack);
        traces: label -> per-case objective traces (one list of floats per case) of gradient attacks.
    """

    white_box: Dict[str, List[float]] = field(default_factory=dict)
    other: Dict[str, List[float]] = field(default_factory=dict)
    convergence: Optional[Tuple[str, List[float]]] = None
    saturation: Optional[List[float]] = None
    gradients: List[dict] = field(default_factory=list)
    traces: Dict[str, List[list]] = field(default_factory=dict)


def run_checks(e: Evidence) -> Dict[str, dict]:
    """name -> ``{"status", "numbers", "finding"}`` for the five checks of the module docstring."""
    return {"gradient": check_gradient(e.gradients), "loss rises": check_loss_rises(e.traces),
            "gradient-free or transfer": check_other(e.white_box, e.other),
            "saturation": check_saturation(e.saturation),
            "convergence": check_convergence(e.white_box, e.other, e.convergence)}


def trustworthy(checks: Dict[str, dict]) -> bool:
    return not any(c["status"] == WARN for c in checks.values())


def per_case_worst(columns: Sequence[List[float]]) -> List[float]:
    """Per case the lowest Dice over ``columns`` (NaN never lower than a number)."""
    if not columns:
        return []
    stacked = np.array([[np.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in col]
                        for col in columns], dtype=np.float64)
    worst = stacked.min(0)
    return [float("nan") if math.isinf(v) else float(v) for v in worst]


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _result(status: str, numbers: dict, finding: str) -> dict:
    return {"status": status, "numbers": numbers, "finding": finding}


def check_gradient(gradients: Sequence[Optional[dict]]) -> dict:
    stats = [g for g in gradients if g]
    if not stats:
        return _result(NOT_RUN, {}, "no gradient attack ran")
    zero = float(np.mean([g["zero_fraction"] for g in stats]))
    gains = [g["linear_gain"] for g in stats if g.get("linear_gain") is not None]
    gain = float(np.min(gains)) if gains else float("nan")
    numbers = {"zero_fraction": zero, "min_linear_gain": gain, "cases": len(stats)}
    if zero > MAX_ZERO_FRACTION:
        return _result(WARN, numbers, f"{zero:.0%} of the input gradient is exactly zero: the gradient is masked "
                                      f"(a non-differentiable step in the model?)")
    if math.isfinite(gain) and gain < MIN_LINEAR_GAIN:
        return _result(WARN, numbers, f"a step of the whole budget along the gradient promises {gain:.2g} of "
                                      f"cross-entropy: the gradient vanishes")
    return _result(PASS, numbers, "the input gradient is dense and not vanishing")


def check_loss_rises(traces: Dict[str, List[list]]) -> dict:
    rising = {}
    for label, cases in traces.items():
        usable = [t for t in cases if t and len(t) > 1]
        if usable:
            rising[label] = float(np.mean([max(t[1:]) > t[0] + 1e-6 * max(1.0, abs(t[0])) for t in usable]))
    if not rising:
        return _result(NOT_RUN, {}, "no iterative gradient attack ran")
    worst_label = min(rising, key=rising.get)
    numbers = {"share_of_cases_rising": rising}
    if rising[worst_label] < 0.5:
        return _result(WARN, numbers, f"{worst_label}: its loss rose above its first value in only "
                                      f"{rising[worst_label]:.0%} of the cases")
    return _result(PASS, numbers, "every gradient attack raised its loss in at least half the cases")


def check_other(white_box: Dict[str, List[float]], other: Dict[str, List[float]]) -> dict:
    if not white_box or not other:
        return _result(NOT_RUN, {}, "needs a white-box gradient attack and a gradient-free or transfer attack")
    wb, ot = mean(per_case_worst(list(white_box.values()))), mean(per_case_worst(list(other.values())))
    numbers = {"white_box_worst": wb, "gradient_free_or_transfer_worst": ot, "margin": MARGIN}
    if ot < wb - MARGIN:
        return _result(WARN, numbers, f"attacks that use no gradient of this model reach {ot:.3f}, below the "
                                      f"gradient attacks' {wb:.3f}: its gradients mislead the attacks")
    return _result(PASS, numbers, "the gradient attacks are at least as strong as gradient-free and transfer ones")


def check_saturation(dice: Optional[List[float]]) -> dict:
    if not dice:
        return _result(NOT_RUN, {}, "the saturation attack did not run")
    value = mean(dice)
    numbers = {"eps": SATURATION_EPS, "dice": value, "limit": SATURATION_DICE}
    if not value <= SATURATION_DICE:
        return _result(WARN, numbers, f"at eps {SATURATION_EPS:g}/255 the Dice stays at {value:.3f}: an attack "
                                      f"that cannot break the model with an enormous budget is not working")
    return _result(PASS, numbers, f"at eps {SATURATION_EPS:g}/255 the Dice falls to {value:.3f}")


def check_convergence(white_box: Dict[str, List[float]], other: Dict[str, List[float]],
                      convergence: Optional[Tuple[str, List[float]]]) -> dict:
    if convergence is None or not white_box:
        return _result(NOT_RUN, {}, "no attack was re-run with more steps")
    label, dice = convergence
    before = mean(per_case_worst(list(white_box.values()) + list(other.values())))
    after = mean(per_case_worst(list(white_box.values()) + list(other.values()) + [dice]))
    numbers = {"rerun": label, "worst_before": before, "worst_after": after, "margin": MARGIN}
    if after < before - MARGIN:
        return _result(WARN, numbers, f"{label} lowered the worst case from {before:.3f} to {after:.3f}: the "
                                      f"attacks had not converged")
    return _result(PASS, numbers, f"{label} changed the worst case by {after - before:+.3f}")


#: what to run next, per check that warns (report.md)
ADVICE = {
    "gradient": "evaluate with gradient-free and transfer attacks (`--attacks square:eps=E,queries=1000`, "
                "`--transfer_from` a model trained without the defence) and report their worst case",
    "loss rises": "raise the attacks' steps or step size, or use APGD (`apgd-ce`, `autoattack-rog`), whose step "
                  "size adapts",
    "gradient-free or transfer": "the model masks its gradients: its robustness is the gradient-free / transfer "
                                 "worst case, not the white-box one; add `autoattack-rog` and more Square queries",
    "saturation": "check the threat model (the budget's units, the intensity window) and the attack's step size",
    "convergence": "re-run with more steps and restarts (`--check_factor`) until the worst case stops falling",
}
