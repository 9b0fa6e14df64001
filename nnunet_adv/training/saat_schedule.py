"""SAAT's rule for the number of attack iterations (Wang, Fu, Zhang, Ruan, MICCAI 2023).

A smaller Lipschitz constant means a more robust network; SAAT watches a Lipschitz proxy,
the mean over an epoch of the per-sample input-gradient magnitude ``sum |grad_x L|``, and
adapts the number ``m`` of attack iterations every ``check_period`` epochs::

    m = m_init (1); thr = 0
    after epoch P       (P = check_period; ref. 3):  m <- m_start (2)
    after epoch P + 1:                               thr <- gamma * mag
    after every later epoch e with e % P == 0:
        if   mag > thr       and m < m_max:  thr <- gamma * mag; m <- m + 1
        elif mag < thr/gamma and m > m_start: thr <- gamma * mag; m <- m - 1

Epochs are numbered as in the reference code (SEAT's ``at_main.py``: ``for epoch in
range(1, epochs + 1)``), 1-based: the trainer passes nnU-Net's 0-based ``current_epoch + 1`` of
the epoch that just ended, and the new ``m`` applies from the next epoch. So with P = 3 the
iterations per epoch are 1, 1, 1, 2, 2, 2, 3, ... under a rising magnitude, as SEAT's.
Defaults are the published ones (gamma 1.1, m_max 5, period 3);
nnU-Net epochs are long (250 iterations), so the period is configurable and the rule is
otherwise unchanged. This module is pure Python: the trainer reduces ``mag`` across DDP
ranks before calling :meth:`SAATSchedule.update`, so every rank takes the same decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SAATSchedule:
    """State and rule of SAAT's adaptive number of attack iterations.

    Attributes:
        check_period: P, epochs between decisions (ref. 3).
        gamma: threshold margin (ref. 1.1).
        m_max: largest number of attack iterations (ref. 5).
        m_init: iterations before epoch P (ref. 1).
        m_start: iterations set after epoch P, and the lower bound of later decreases (ref. 2).
        m: the current number of iterations (state).
        threshold: the current threshold (state).
    """

    check_period: int = 3
    gamma: float = 1.1
    m_max: int = 5
    m_init: int = 1
    m_start: int = 2
    m: int = -1
    threshold: float = 0.0

    def __post_init__(self):
        if int(self.check_period) < 1:
            raise ValueError(f"check_period must be >= 1, got {self.check_period}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 1 <= self.m_init <= self.m_max or not 1 <= self.m_start <= self.m_max:
            raise ValueError(f"need 1 <= m_init, m_start <= m_max (got m_init={self.m_init}, "
                             f"m_start={self.m_start}, m_max={self.m_max})")
        if self.m < 0:
            self.m = self.m_init

    def update(self, epoch: int, magnitude: float) -> int:
        """Apply the rule after ``epoch`` (1-based, SEAT's numbering) whose mean magnitude was
        ``magnitude``.

        A NaN magnitude (no gradient measured, e.g. every step skipped by the AMP scaler)
        changes nothing at a decision epoch. Returns the number of iterations for the next epoch.
        """
        period = int(self.check_period)
        if epoch == period:
            self.m = self.m_start
        elif epoch == period + 1:
            if not math.isnan(magnitude):
                self.threshold = self.gamma * magnitude
        elif epoch > period + 1 and epoch % period == 0 and not math.isnan(magnitude):
            if magnitude > self.threshold and self.m < self.m_max:
                self.threshold = self.gamma * magnitude
                self.m += 1
            elif magnitude < self.threshold / self.gamma and self.m > self.m_start:
                self.threshold = self.gamma * magnitude
                self.m -= 1
        return self.m

    def state_dict(self) -> dict:
        """Everything needed to continue (``nnUNetv2_train --c``)."""
        return {"m": int(self.m), "threshold": float(self.threshold), "check_period": int(self.check_period),
                "gamma": float(self.gamma), "m_max": int(self.m_max), "m_init": int(self.m_init),
                "m_start": int(self.m_start)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state (m, threshold). The rule's settings stay those of this instance
        (the class attributes of the trainer that continues), so a changed setting takes effect."""
        self.m = int(state["m"])
        self.threshold = float(state["threshold"])


def replay(magnitudes, **settings) -> list:
    """The m each epoch would have used under SAAT's rule fed with ``magnitudes`` (one per epoch, nnU-Net's
    order from epoch 0; NaN where nothing was measured), with ``settings`` those of :class:`SAATSchedule`.
    Fed with a run's logged ``saat_grad_magnitude`` it gives that run's logged ``saat_m``; fed with its
    ``saat_other_grad_magnitude``, the m the other gradient measure would have chosen along the same
    training trajectory (a first-order answer: a different m would have changed the trajectory)."""
    schedule = SAATSchedule(**settings)
    used = []
    for epoch, magnitude in enumerate(magnitudes):
        used.append(schedule.m)
        schedule.update(epoch + 1, float(magnitude))
    return used
