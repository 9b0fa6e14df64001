"""Per-sample selection: which of several adversarial candidates each sample keeps.

Restarts (PGD, APGD) keep the candidate with the highest attack objective, an ensemble the
one with the lowest Dice (AutoAttack's composition keeps the per-sample worst case).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def dims_except_batch(x: Tensor):
    return tuple(range(1, x.dim()))


def per_sample_view(v: Tensor, ndim: int) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dims in total."""
    return v.view(-1, *([1] * (ndim - 1)))


class PerSampleBest:
    """Keeps, per sample, the candidate with the best score seen so far.

    Args:
        mode: ``"max"`` (highest score wins, e.g. the attack objective) or ``"min"`` (lowest
            wins, e.g. Dice). Ties keep the earlier candidate.
    Attributes:
        x: ``(B, C, *S)`` the kept candidates (None before the first update).
        score: ``(B,)`` their scores.
    """

    def __init__(self, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.mode = mode
        self.x: Optional[Tensor] = None
        self.score: Optional[Tensor] = None

    def update(self, x: Tensor, score: Tensor) -> Tensor:
        """Offer candidates ``x`` ``(B, C, *S)`` with scores ``(B,)``; returns the ``(B,)`` mask of
        samples that took the new candidate."""
        if self.x is None:
            self.x, self.score = x, score
            return torch.ones_like(score, dtype=torch.bool)
        better = score > self.score if self.mode == "max" else score < self.score
        self.x = torch.where(per_sample_view(better, x.dim()), x, self.x)
        self.score = torch.where(better, score, self.score)
        return better
