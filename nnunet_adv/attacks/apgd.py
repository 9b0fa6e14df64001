"""APGD-CE (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 / AutoAttack), adapted to 3D segmentation as in ROG
(Daza et al., MICCAI 2021): the per-sample loss is the cross-entropy averaged over voxels."""
from __future__ import annotations

import torch

from ..losses import dlr_per_sample
from .base import AttackContext
from .lp import LpAttack
from .selection import PerSampleBest, per_sample_view


class APGDCE(LpAttack):
    """Auto-PGD with the AutoAttack step-size schedule.

    Algorithm (AutoAttack's ``apgd`` code, per sample):
      * random start in the eps-ball; initial step ``eta = initial_step * eps`` (2 eps);
      * ``z = Π(x_k + eta * dir(g_k))``, ``x_{k+1} = Π(x_k + a (z - x_k) + (1-a)(x_k - x_{k-1}))``
        with momentum ``a = 0.75`` (``a = 1`` on the first step);
      * checkpoints: the first after ``max(int(0.22 N), 1)`` steps, then every ``k`` steps
        with ``k`` shrinking by ``max(int(0.03 N), 1)`` down to ``max(int(0.06 N), 1)``
        (AutoAttack's discretisation of ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``);
      * at a checkpoint the step is halved and the iterate reset to the best point for
        samples whose loss increased in at most ``rho * k`` of the last ``k`` steps
        (``rho = 0.75``), or whose best loss did not improve since the last checkpoint while
        the step was not halved there;
      * returned per sample (``select``):
        ``"dice"`` (default, ROG's ``rog/autoattack/autopgd.py``): the iterate with the lowest
        Dice of the full-resolution prediction over every iterate of every restart (random
        starts included), kept only where it is below the clean image's Dice, else the clean
        image (a segmentation has no binary "misclassified" state; ROG keeps the point that
        hurts the metric most). Dice: foreground classes, nnU-Net's rule (a class absent from
        both maps is skipped; ROG counts it as 0). Targeted: the highest Dice to the target.
        ``"loss"``: AutoAttack's criterion, the iterate with the largest loss, best over restarts.

    Loss: CE over voxels, mean per sample (or the user ``loss``; per-sample values then
    come from evaluating it sample by sample). Targeted: descends the loss to the target.

    Options (units of the tensor received): eps 4/255 (the value other attacks here use; ROG
    sweeps {2, 4, 6, 8, 10}/255 of the intensity range); steps 5 (ROG's 3D protocol; AutoAttack
    uses 100); norm 'linf' | 'l2'; restarts 1 (ROG's evaluation: 5, see :class:`APGDROG`);
    select 'dice' | 'loss'; rho 0.75; momentum 0.75; initial_step 2.0 (in units of eps);
    targeted / target, loss, seed, lower / upper, amp_loss_scale.
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "apgd-ce"
    summary = "APGD-CE, AutoAttack's schedule, the lowest-Dice iterate kept (ROG)"
    defaults = {**LpAttack.defaults, "steps": 5, "restarts": 1, "rho": 0.75, "momentum": 0.75,
                "initial_step": 2.0, "select": "dice"}

    def validate(self) -> None:
        o = self.options
        for key, lo, hi in (("rho", 0.0, 1.0), ("momentum", 0.0, 1.0)):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"{key} must be in [{lo}, {hi}], got {v!r}")
        v = o["initial_step"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"initial_step must be > 0 (a multiple of eps), got {v!r}")
        if o["select"] not in ("dice", "loss"):
            raise ValueError(f"select must be 'dice' (ROG) or 'loss' (AutoAttack), got {o['select']!r}")

    def perturb(self, ctx: AttackContext):
        n_iter, restarts = int(self.options["steps"]), int(self.options["restarts"])
        if self.options["select"] == "loss":
            best = PerSampleBest("max")
            for _ in range(restarts):
                best.update(*self._run(ctx, n_iter))
            return best.x
        # ROG: the lowest-Dice iterate of all restarts, only where below the clean Dice
        sign = -1.0 if self.is_targeted() else 1.0  # targeted: the highest Dice to the target
        best = PerSampleBest("min")
        with torch.no_grad():
            best.update(ctx.x0, sign * self.dice_per_sample(ctx, self.forward(ctx, ctx.x0)))
        for _ in range(restarts):
            self._run(ctx, n_iter, observe=lambda x, out: best.update(x, sign * self.dice_per_sample(ctx, out)))
        return best.x

    def _run(self, ctx: AttackContext, n_iter: int, observe=None):
        """One APGD run; returns ``(x_best, f_best)`` (largest objective per sample) and hands every
        iterate with its (detached) output to ``observe(x, output)``."""
        rho = float(self.options["rho"])
        momentum = float(self.options["momentum"])
        k = max(int(0.22 * n_iter), 1)
        k_min = max(int(0.06 * n_iter), 1)
        k_decr = max(int(0.03 * n_iter), 1)
        B, nd = ctx.B, ctx.x0.dim()

        x = self.random_init(ctx)
        g, out = self.input_grad(ctx, x)
        if observe is not None:
            observe(x, out)
        f = self.per_sample_objective(ctx, out)
        x_best, g_best, f_best = x.clone(), g.clone(), f.clone()
        history = [f]                       # objective at x_0, x_1, ...
        factor = torch.full((B,), float(self.options["initial_step"]), device=x.device)
        x_prev = x.clone()
        f_best_last = f_best.clone()
        reduced_last = torch.ones(B, dtype=torch.bool, device=x.device)
        counter = 0
        for i in range(n_iter):
            a = 1.0 if i == 0 else momentum
            eta = per_sample_view(factor, nd) * ctx.eps
            z = self.project(ctx, x + eta * self.direction(ctx, g))
            x_new = self.project(ctx, x + a * (z - x) + (1.0 - a) * (x - x_prev))
            x_prev, x = x, x_new

            g, out = self.input_grad(ctx, x)
            if observe is not None:
                observe(x, out)
            f = self.per_sample_objective(ctx, out)
            history.append(f)
            improved = f > f_best
            sel = per_sample_view(improved, nd)
            x_best = torch.where(sel, x, x_best)
            g_best = torch.where(sel, g, g_best)
            f_best = torch.where(improved, f, f_best)

            counter += 1
            if counter == k:
                recent = torch.stack(history[-(k + 1):])            # k + 1 values, k comparisons
                n_increase = (recent[1:] > recent[:-1]).sum(0)
                oscillating = n_increase <= k * rho
                no_improvement = (~reduced_last) & (f_best_last >= f_best)
                reduce = oscillating | no_improvement
                reduced_last = reduce
                f_best_last = f_best.clone()
                if bool(reduce.any()):
                    factor = torch.where(reduce, factor / 2.0, factor)
                    sel = per_sample_view(reduce, nd)
                    x = torch.where(sel, x_best, x)
                    g = torch.where(sel, g_best, g)
                k = max(k - k_decr, k_min)
                counter = 0
        return x_best, f_best


class APGDROG(APGDCE):
    """APGD-CE with ROG's evaluation settings (Daza et al., MICCAI 2021, ``rog/autoattack``):
    5 iterations, 5 restarts, the lowest-Dice iterate kept where below the clean Dice.
    Options and defaults otherwise as :class:`APGDCE`."""

    name = "apgd-rog"
    summary = "APGD-CE with ROG's evaluation settings (5 steps, 5 restarts)"
    defaults = {**APGDCE.defaults, "steps": 5, "restarts": 5, "select": "dice"}


class APGDDLR(APGDCE):
    """APGD with ROG's DLR loss for segmentation (``rog/autoattack/autopgd.py``, ``loss='dlr'``):
    the step schedule, restarts and the lowest-Dice selection of :class:`APGDCE`; the objective
    :func:`nnunet_adv.losses.dlr_per_sample` (per voxel ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``,
    mean over voxels). ROG's defaults: 5 steps, 5 restarts. Untargeted only (ROG runs no targeted
    DLR); label targets with at least 3 classes (``ValueError`` on binary tasks and on sigmoid
    regions: ROG skips it there, and so does ``autoattack-rog``)."""

    name = "apgd-dlr"
    summary = "APGD with ROG's DLR loss (logit-scale invariant; multi-class tasks)"
    min_classes = 3
    supports_regions = False
    defaults = {k: v for k, v in {**APGDCE.defaults, "restarts": 5}.items() if k not in ("targeted", "target", "loss")}

    def base_loss(self, ctx: AttackContext, output) -> torch.Tensor:
        return dlr_per_sample(output, ctx.y).mean()

    @torch.no_grad()
    def per_sample_objective(self, ctx: AttackContext, output) -> torch.Tensor:
        return dlr_per_sample(output, ctx.y)
