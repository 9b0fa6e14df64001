"""SAAT: self-adaptive adversarial training (Wang, Fu, Zhang, Ruan, MICCAI 2023; ref. code SEAT,
built on ROG, Daza et al. MICCAI 2021).

The number ``m`` of attack iterations is adapted during training from a Lipschitz proxy, the
epoch's mean input-gradient magnitude ``mag = mean_samples sum_voxels |grad_x L|`` (the
gradient of the training loss with respect to the network input the step trained on). The
rule lives in :class:`nnunet_adv.training.saat_schedule.SAATSchedule`; its published defaults
are ``saat_check_period = 3`` epochs, ``saat_gamma = 1.1``, ``saat_m_max = 5``. nnU-Net epochs
are 250 iterations, far longer than ROG's, so the period is a class attribute (the rule is
unchanged). Under DDP the magnitude is summed over ranks before the decision (all ranks take
the same ``m``).

Inner attack (``saat_inner_attack``):

* ``"free"`` (default, as the reference code): Free adversarial training (Shafahi et al. 2019)
  with a persistent perturbation buffer ``delta`` (one per rank, shape of the batch). Each
  training iteration replays the batch ``m`` times; each replay trains on
  ``clip(x + delta, box)`` (one forward, one backward, one optimiser step) and then moves
  ``delta <- clip(delta + step * sign(grad_delta L), -eps, eps)`` with the input gradient of
  that same backward (no extra cost: that is the "free" in Free-AT; under DDP it is the
  backward of the DDP forward, inputs are not reduced). So an nnU-Net iteration costs ``m``
  forward/backward passes and makes ``m`` optimiser steps.
  ``eps = 8/255`` of each sample's intensity range (the threat model: z-scored channels use
  the clean patch's range, CT channels the dataset window) and ``step = eps/2``. The released
  code floor-divides (``b_eps // 2``), which is 0 on z-scored data so its perturbation never
  moves; this trainer uses ``eps/2`` (``alpha_over_eps = 0.5``). The buffer is projected onto
  the current batch's eps-ball before its first replay (a new batch can have a smaller range).
* ``"pgd"``: PGD with ``m`` steps (random start, step ``alpha_over_eps * eps``) crafted on the
  unwrapped network in eval mode, one optimiser step on the adversarial loss.

Two choices differ from SEAT's code (TrustAI/SEAT ``libs/trainer.py``, ``train``) and are named options
(:class:`nnUNetTrainerSAAT_SEAT` takes SEAT's for both):

* ``saat_grad_measure``: ``"input"`` (default) the gradient with respect to the network input the step
  trained on (``clip(x + delta)``); ``"perturbation"`` SEAT's ``delta.grad``, the same except where the
  box clamp is active (there it is 0). SEAT also sums over the batch and keeps the GradScaler's loss
  scale in it; here it is the mean over samples, unscaled (the rule compares an epoch's magnitude with a
  multiple of an earlier one, so a constant factor cancels; a loss scale that changes does not).
* ``saat_window``: ``"threat-model"`` (default) eps as a fraction of each channel's window of the
  threat model (z-scored channels: the clean patch's range; CT channels: the dataset window);
  ``"patch"`` SEAT's ``(b_max - b_min) * eps`` of every patch, CT channels included.

Logged every epoch (training log, progress.png panel, checkpoint ``logging``): ``saat_m`` (the
iterations used in the epoch), ``saat_grad_magnitude`` (its mean magnitude), ``saat_threshold``
(after the epoch's decision); and, not in the panel, ``saat_other_grad_magnitude``: with Free-AT the mean
magnitude under the measure not in use, from the same backward passes (NaN with the PGD inner attack).
:func:`~nnunet_adv.training.saat_schedule.replay` on it gives the m the other measure would have
chosen on the same run (``benchmarks/saat_measures.py``). The rule's state is saved in every checkpoint under
``"saat_state"`` (next to nnU-Net's own keys) and restored by ``nnUNetv2_train --c``. The Free-AT
buffer is not saved (a continued run restarts it at zero).
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, distributed as dist

from nnunet_adv.training.adversarial_trainer import RecipeError, nnUNetTrainerAdversarial
from nnunet_adv.training.saat_schedule import SAATSchedule

SAAT_LOG_KEYS = ("saat_m", "saat_grad_magnitude", "saat_threshold")
SAAT_OTHER_KEY = "saat_other_grad_magnitude"


class nnUNetTrainerSAAT(nnUNetTrainerAdversarial):
    """SAAT with Free-AT (default) or PGD as inner attack; see the module docstring."""

    attack_name = "pgd"               # the "pgd" inner attack and the robust validation
    attack_kwargs = {"steps": 1, "random_start": True, "norm": "linf"}  # steps <- m in the step
    eps_frac = 8 / 255
    alpha_over_eps = 0.5              # step eps/2 (not the reference's eps // 2)
    attack_in_train_mode = False
    clean_loss_weight = 0.0
    adversarial_loss_weight = 1.0
    val_attack_overrides = {"steps": 5}

    saat_inner_attack: str = "free"   # "free" | "pgd"
    saat_check_period: int = 3        # epochs between decisions (ref. 3)
    saat_gamma: float = 1.1
    saat_m_max: int = 5
    saat_m_init: int = 1
    saat_m_start: int = 2
    saat_grad_measure: str = "input"      # "input" | "perturbation" (SEAT: delta.grad)
    saat_window: str = "threat-model"     # "threat-model" | "patch" (SEAT: every patch's own range)
    progress_panel_keys = SAAT_LOG_KEYS

    # ------------------------------------------------------------------ set-up
    def configure_attack(self) -> None:
        name = type(self).__name__
        if self.saat_inner_attack not in ("free", "pgd"):
            raise RecipeError(name, f"saat_inner_attack must be 'free' or 'pgd' (got {self.saat_inner_attack!r})")
        if self.saat_inner_attack == "free" and self.alpha_over_eps is None:
            raise RecipeError(name, "Free-AT needs a step size: set alpha_over_eps (published: 0.5)")
        if self.saat_grad_measure not in ("input", "perturbation"):
            raise RecipeError(name, f"saat_grad_measure must be 'input' or 'perturbation' (got "
                                    f"{self.saat_grad_measure!r})")
        if self.saat_window not in ("threat-model", "patch"):
            raise RecipeError(name, f"saat_window must be 'threat-model' or 'patch' (got {self.saat_window!r})")
        if self.saat_grad_measure == "perturbation" and self.saat_inner_attack != "free":
            raise RecipeError(name, "saat_grad_measure 'perturbation' is Free-AT's delta gradient: it needs "
                                    "saat_inner_attack 'free'")
        if self.adversarial_loss_weight <= 0:
            raise RecipeError(name, "SAAT trains on adversarial examples: adversarial_loss_weight must be > 0")
        try:
            self.saat = SAATSchedule(check_period=self.saat_check_period, gamma=self.saat_gamma,
                                     m_max=self.saat_m_max, m_init=self.saat_m_init, m_start=self.saat_m_start)
        except ValueError as e:
            raise RecipeError(name, str(e)) from None
        self.free_delta = None  # Free-AT perturbation buffer (B, C, *patch), per rank
        self.logger.local_logger.add_keys(SAAT_LOG_KEYS + (SAAT_OTHER_KEY,))

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.print_to_log_file(f"SAAT: {self.saat.m} attack iteration(s) per batch this epoch "
                               f"({self.saat_inner_attack})")

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        if self.saat_inner_attack == "pgd":
            return self._pgd_step(data, target, self.saat.m)
        return self._free_step(data, target, self.saat.m)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _loss_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0

    def _optimise(self, data, x_in, target):
        """One forward (``x_in`` requires grad), backward and optimiser step, as nnU-Net's step;
        returns (loss terms, total). ``x_in.grad`` then holds the (loss-scaled) input gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.compute_loss_terms(data, x_in, target)
            total = sum(terms.values())
        self._backward_and_step(total)
        return terms, total

    @staticmethod
    def _magnitude(grad: torch.Tensor, scale: float):
        """(sum over samples of sum_voxels |grad|, number of samples) or None if not finite."""
        per_sample = grad.detach().float().abs().flatten(1).sum(1) / scale
        if not bool(torch.isfinite(per_sample).all()):
            return None
        return float(per_sample.sum()), int(per_sample.numel())

    def _pgd_step(self, data, target, m: int) -> dict:
        x_adv = self.craft_adversarial(data, target, {"steps": int(m)}).requires_grad_(True)
        scale = self._loss_scale()  # read before GradScaler.update() changes it
        terms, total = self._optimise(data, x_adv, target)
        magnitude = self._magnitude(x_adv.grad, scale)
        return self._step_output([terms], [total], [magnitude])

    def _free_step(self, data, target, m: int) -> dict:
        threat_model = self.threat_model.with_patch_windows() if self.saat_window == "patch" else self.threat_model
        budget = threat_model.budget(data, eps_frac=self.eps_frac, eps_raw=self.eps_raw)
        eps, step = budget.eps, budget.scaled(self.alpha_over_eps)
        delta = self.free_delta
        if delta is None or delta.shape != data.shape or delta.device != data.device:
            delta = torch.zeros_like(data, dtype=torch.float32)
        delta = torch.maximum(torch.minimum(delta, eps), -eps)  # onto this batch's eps-ball
        all_terms, totals, magnitudes, others = [], [], [], []
        for _ in range(int(m)):
            delta_leaf = delta.detach().requires_grad_(True)
            # the box contains the clean voxel (as every attack's): a voxel outside the CT window
            # (nnU-Net's augmentation puts some there) is never pulled into it
            x_in = torch.minimum(torch.maximum(data.float() + delta_leaf, torch.minimum(budget.lower, data.float())),
                                 torch.maximum(budget.upper, data.float()))
            x_in.retain_grad()
            scale = self._loss_scale()
            terms, total = self._optimise(data, x_in, target)
            # both measures come from this backward: the one in use drives m, the other is logged
            by_measure = {name: None if g is None else self._magnitude(g, scale)
                          for name, g in (("input", x_in.grad), ("perturbation", delta_leaf.grad))}
            magnitude = by_measure.pop(self.saat_grad_measure)
            if magnitude is not None and delta_leaf.grad is not None:
                delta = torch.maximum(torch.minimum(delta + step * delta_leaf.grad.sign(), eps), -eps)
            all_terms.append(terms)
            totals.append(total)
            magnitudes.append(magnitude)
            others.extend(by_measure.values())
        self.free_delta = delta.detach()
        return self._step_output(all_terms, totals, magnitudes, others)

    @staticmethod
    def _step_output(all_terms: List[dict], totals: list, magnitudes: list, others: list = ()) -> dict:
        """The step's mean losses and the (sum, count) of its magnitudes, ``saat_mag_*`` for the measure in
        use and ``saat_other_mag_*`` for the other one."""
        out = {"loss": np.mean([t.detach().cpu().numpy() for t in totals])}
        for key in all_terms[0]:
            out[f"loss_{key}"] = np.mean([terms[key].detach().cpu().numpy() for terms in all_terms])
        for prefix, values in (("saat_mag", magnitudes), ("saat_other_mag", others)):
            measured = [m for m in values if m is not None]
            out[f"{prefix}_sum"] = float(sum(m[0] for m in measured))
            out[f"{prefix}_count"] = float(sum(m[1] for m in measured))
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        magnitude, other = (
            self.reduce_magnitude(sum(float(o.get(f"{prefix}_sum", 0.0)) for o in train_outputs),
                                  sum(float(o.get(f"{prefix}_count", 0.0)) for o in train_outputs))
            for prefix in ("saat_mag", "saat_other_mag"))
        self.saat_decide(magnitude, other)

    def reduce_magnitude(self, total: float, count: float) -> float:
        """The epoch's mean magnitude over all samples of all ranks (all-reduce under DDP)."""
        if self.is_ddp:
            t = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, count = (float(v) for v in t.tolist())
        return total / count if count > 0 else float("nan")

    def saat_decide(self, magnitude: float, other: float = float("nan")) -> int:
        """Apply SAAT's rule after the current epoch to ``magnitude`` (the measure in use) and log m, both
        magnitudes (``other``: the measure not in use, NaN if not measured) and the threshold."""
        epoch = self.current_epoch
        m_used = self.saat.m
        m_next = self.saat.update(epoch + 1, magnitude)  # the rule counts epochs from 1, as SEAT does
        self.logger.log("saat_m", m_used, epoch)
        self.logger.log("saat_grad_magnitude", magnitude, epoch)
        self.logger.log(SAAT_OTHER_KEY, other, epoch)
        self.logger.log("saat_threshold", self.saat.threshold, epoch)
        other_name = "perturbation" if self.saat_grad_measure == "input" else "input"
        also = "" if math.isnan(other) else f" ({other_name}-gradient: {other:.6g})"
        self.print_to_log_file(f"SAAT: m {m_used}, {self.saat_grad_measure}-gradient magnitude {magnitude:.6g}{also}, "
                               f"threshold {self.saat.threshold:.6g}, m for the next epoch {m_next}")
        return m_next

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        return {"saat_state": self.saat.state_dict()}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        state = checkpoint.get("saat_state")
        if state is None:
            self.print_to_log_file("SAAT: the checkpoint has no SAAT state (not written by an SAAT trainer); "
                                   f"m starts at {self.saat.m}")
            return
        self.saat.load_state_dict(state)
        self.print_to_log_file(f"SAAT: restored m = {self.saat.m}, threshold = {self.saat.threshold:.6g}")


class nnUNetTrainerSAAT_SEAT(nnUNetTrainerSAAT):
    """SAAT with SEAT's own choices (TrustAI/SEAT ``libs/trainer.py``): the magnitude of the
    perturbation's gradient (0 where the box clamp is active) and eps of every patch's own range,
    CT channels included. The step stays eps/2 (SEAT's ``b_eps // 2`` is 0 on z-scored data)."""

    saat_grad_measure = "perturbation"
    saat_window = "patch"
