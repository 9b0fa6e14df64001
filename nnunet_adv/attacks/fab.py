"""Targeted FAB (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020; AutoAttack's ``fab_linf``), L-inf, as ROG adapts it to 3D
segmentation (Daza et al., MICCAI 2021, ``rog/autoattack/fab.py``): one linearised boundary per
sample, the margin of the true class over the r-th most likely class averaged over voxels, and
success when the Dice falls below a share of the clean Dice."""
from __future__ import annotations

import math
import numbers
from typing import List

import torch

from ..losses import dice_per_sample
from ..outputs import full_res
from .base import AttackContext
from .lp import LpAttack
from .options import COMMON_DEFAULTS
from .selection import per_sample_view

Tensor = torch.Tensor


def projection_linf(points: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Exact minimum-L-inf step onto a hyperplane inside the unit box (FAB's ``projection_linf``).

    Solves, per row ``i``, ``min ||d||_inf`` subject to ``<w_i, t_i + d> = b_i`` and
    ``0 <= t_i + d <= 1`` (``t_i = points[i]`` assumed in ``[0, 1]``). Where the hyperplane
    cannot be reached inside the box, ``d`` is the largest move towards it (every coordinate to
    the box face that brings ``<w, t + d>`` closer to ``b``). Coordinates with ``w = 0`` never move.

    Algorithm (AutoAttack / ROG's code, vectorised without its ``squeeze`` calls): orient the
    plane so that ``<w, t> >= b``; coordinate ``j`` can move at most ``p_j`` (to 0 if ``w_j > 0``,
    to 1 if ``w_j < 0``); with radius ``lam`` the plane value drops by ``sum_j |w_j| min(lam, p_j)``,
    piecewise linear in ``lam``; a binary search over the sorted ``p`` finds the piece that
    reaches ``b`` and ``lam`` is solved on it.

    Args:
        points: ``(N, D)`` points in ``[0, 1]``; w: ``(N, D)`` normals; b: ``(N,)`` offsets.
    Returns:
        ``(N, D)`` the step ``d``.
    """
    t = points
    n, dim = t.shape
    flip = (w * t).sum(1) - b < 0
    w = torch.where(flip[:, None], -w, w)
    b = torch.where(flip, -b, b)

    c5 = (w < 0).to(t.dtype)                 # 1 where the coordinate moves up (to 1)
    nonzero = (w != 0).to(t.dtype)
    d = (c5 - t) * nonzero                   # the largest move towards the plane
    p = c5 - t * (2 * c5 - 1)                # its length: 1 - t (w < 0) or t (w > 0)
    indp = torch.argsort(p, dim=1)           # ascending
    indp2 = indp.flip(1)                     # descending

    b = b - (w * t).sum(1)                   # the change of <w, .> needed (<= 0)
    b0 = (w * d).sum(1)                      # the largest change reachable in the box (<= 0)
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = ws.abs().cumsum(1)                   # sum of |w| over the k + 1 longest moves
    sb = bs2.cumsum(1) + b0[:, None]         # plane change when those k + 1 move lam, the rest fully: sb - lam s

    p_min = p.gather(1, indp[:, :1])[:, 0]
    b2 = sb[:, -1] - s[:, -1] * p_min
    c_l = b - b2 > 0                         # reached before the shortest move ends: lam < min p
    c2 = (b - b0 > 0) & ~c_l                 # reachable, lam on some piece of the sorted p

    lb = torch.zeros(n, dtype=torch.long, device=t.device)
    ub = torch.full((n,), dim - 1, dtype=torch.long, device=t.device)
    for _ in range(math.ceil(math.log2(dim)) if dim > 1 else 0):
        mid = (lb + ub) // 2
        p_mid = p.gather(1, indp2.gather(1, mid[:, None]))[:, 0]
        b2m = sb.gather(1, mid[:, None])[:, 0] - s.gather(1, mid[:, None])[:, 0] * p_mid
        up = b - b2m > 0
        lb = torch.where(up, mid, lb)
        ub = torch.where(up, ub, mid)

    tiny = torch.finfo(t.dtype).tiny
    lam_l = ((sb[:, -1] - b) / s[:, -1].clamp_min(tiny)).clamp_min(0)[:, None]
    d_l = (2 * c5 - 1) * lam_l
    lam_2 = ((sb.gather(1, lb[:, None]) - b[:, None]) / s.gather(1, lb[:, None]).clamp_min(tiny)).clamp_min(0)
    d_2 = torch.minimum(lam_2, d) * c5 + torch.maximum(-lam_2, d) * (1 - c5)
    d = torch.where(c_l[:, None], d_l, torch.where(c2[:, None], d_2, d))
    return d * nonzero


class FAB(LpAttack):
    """Targeted FAB, L-inf: a minimum-norm attack that walks to the linearised decision boundary.

    Algorithm (ROG's ``FABAttack.perturb``; all in normalised coordinates ``u = (x - lo) / (hi - lo)``
    with the per-channel window ``(lo, hi)`` of :meth:`~nnunet_adv.attacks.base.Attack.window`, so
    that ROG's ``[0, 1]`` box is the attack's box, channel by channel):

      * clean pass: logits ``z`` and the Dice ``D0`` of the full-resolution prediction against the
        labels, per sample; the success threshold is ``dice_threshold * D0``; only samples with
        ``D0 > 0`` are attacked, the others are returned unchanged (ROG attacks the cases whose clean
        Dice is above its threshold; with a per-case threshold, a share <= 1 of ``D0``, these are the
        cases whose Dice can still fall; ``dice_threshold = 1``: any drop of the Dice succeeds,
        ``0``: nothing can succeed and the clean images come back);
      * for each target rank ``r`` in ``target_ranks`` (default ``2..K``): per voxel the target is the
        ``r``-th most likely class of the clean logits (``z.sort(dim=1)[1][:, -r]``); for each
        restart (the first from the clean image, later ones from ROG's random start
        ``u0 + min(best, eps) * v / max|v| * 0.5``, ``v`` uniform in ``[-1, 1]``, ``best`` the
        smallest successful distance of the run, infinite at its start as in ROG, so ``eps / 2``),
        ``steps`` iterations of:

          - ``f = -mean_voxels(z_y - z_t)`` per sample and ``g = df/du`` (one forward + backward);
          - the hyperplane ``<g, u> = <g, u_k> - f`` (the linearised boundary ``f = 0``);
          - ``d1``, ``d2``: exact minimum-L-inf steps from ``u_k`` and from ``u0`` onto it inside the
            box (:func:`projection_linf`);
          - ``u_{k+1} = ((u_k + eta d1)(1 - a) + (u0 + eta d2) a)`` clipped to the box, with the bias
            ``a = min(|d1|_inf / (|d1|_inf + |d2|_inf), alpha_max)`` towards the clean image;
          - one forward at ``u_{k+1}``: it is adversarial where the Dice is below the threshold; there
            it is kept if closer to ``u0`` (normalised L-inf) than the run's best point, and
            ``u_{k+1} <- u0 + beta (u_{k+1} - u0)`` (a step back towards the clean image);

        a sample whose run found an adversarial point within the budget (``|x_adv - x0| <= eps``
        voxel-wise, 1e-6 relative slack, then projected onto the eps-ball and the box) takes it and
        is not attacked again; otherwise the clean image is returned (ROG).

    Cost, per attacked sample (exact when no sample succeeds; samples drop out once they do):
    ``steps * restarts * len(target_ranks)`` forward + backward passes and as many forward-only
    passes (the test of each iterate); the clean forward is the first gradient pass (the first run
    starts at the clean image), so there is no other forward.

    Options (units of the tensor received): eps 4/255 (a float, per-channel values or a tensor
    broadcastable to the images; ROG's default is 8/255); norm 'linf' only; steps 5 (ROG's
    ``n_iter``); restarts 5 (ROG's ``n_restarts``); target_ranks None = ``2..K`` (ROG's
    ``n_target_classes = K - 1``) or a sequence of ranks in ``[2, K]``; alpha_max 0.1; eta 1.05
    (overshoot); beta 0.9 (step back); dice_threshold 0.5 (a share of the clean Dice, in
    ``[0, 1]``); seed, lower / upper, amp_loss_scale. No ``loss``: FAB's objective is the logit margin.
    Class labels only (region / sigmoid targets raise ``ValueError``).
    Shapes: images ``(B, C, *S)`` (2 or 3 spatial dims), labels ``(B, [1,] *S)`` or a deep-supervision
    list, model outputs ``(B, K, *S)`` or a list (full resolution first) -> ``(B, C, *S)``.

    Differences from ROG:
      * the success threshold is ``dice_threshold`` times each case's own clean Dice (ROG: 0.5 times
        the dataset's mean clean Dice, computed by its evaluation loop);
      * normalised coordinates: ROG's projection and clipping assume images in ``[0, 1]``; here the
        box is the window per channel (the ``lower``/``upper`` options, else the clean sample's
        per-channel range, widened to contain the clean image), FAB's L-inf distance is measured
        there, and the gradient is taken in those units (``df/du = df/dx (hi - lo)``); the random
        start's ``eps`` is converted per channel;
      * the budget is checked voxel-wise against the per-channel eps (ROG: one scalar L-inf norm),
        with a 1e-6 relative slack, and the kept point is projected onto the eps-ball and box;
      * Dice: foreground classes, nnU-Net's rule (a class absent from both maps is skipped; ROG's
        ``Dice_metric`` counts it as 0);
      * the clean forward doubles as the first gradient pass, and the success of a run is the test
        of its iterates (ROG re-predicts the returned point and the clean image in every run);
      * the per-voxel targets of a rank come from one stable sort of the clean logits (ROG: a new
        forward per run, same logits);
      * randomness from the attack's private generator (``seed``), not the global RNG.
    """

    name = "fab"
    summary = "Targeted FAB (L-inf, minimum norm), as ROG adapts it to segmentation"
    supports_regions = False
    defaults = {**{k: v for k, v in COMMON_DEFAULTS.items() if k != "loss"}, "eps": 4 / 255, "norm": "linf",
                "steps": 5, "restarts": 5, "target_ranks": None, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9,
                "dice_threshold": 0.5}

    def validate(self) -> None:
        o = self.options
        if o["norm"] != "linf":
            raise ValueError(f"attack 'fab' is the L-inf FAB (ROG's); norm must be 'linf', got {o['norm']!r}")
        for key, lo, hi in (("alpha_max", 0.0, 1.0), ("beta", 0.0, 1.0), ("dice_threshold", 0.0, 1.0)):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= hi:
                raise ValueError(f"{key} must be in [{lo}, {hi}], got {v!r}")
        v = o["eta"]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"eta must be a positive float, got {v!r}")
        r = o["target_ranks"]
        if r is not None:
            if not isinstance(r, (list, tuple)) or len(r) == 0 or any(
                    isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2 for k in r):
                raise ValueError(f"target_ranks must be None (ranks 2..K) or a non-empty sequence of integers "
                                 f">= 2 (2: the second most likely class per voxel), got {r!r}")

    def ranks(self, k: int) -> List[int]:
        """The target ranks for a ``k``-class model."""
        r = self.options["target_ranks"]
        if r is None:
            return list(range(2, k + 1))
        bad = [int(v) for v in r if v > k]
        if bad:
            raise ValueError(f"target_ranks {bad} exceed the number of classes ({k})")
        return [int(v) for v in r]

    # ------------------------------------------------------------------ attack
    def perturb(self, ctx: AttackContext) -> Tensor:
        if ctx.regions:
            raise ValueError("attack 'fab' needs class labels (its target is a class per voxel); region "
                             "(sigmoid, one binary channel per region) targets are not supported")
        x0, nd = ctx.x0, ctx.x0.dim()
        dims = tuple(range(2, nd))
        lo, hi = self.window(ctx)
        lo = torch.minimum(lo, x0.amin(dim=dims, keepdim=True))  # the window contains the clean image
        hi = torch.maximum(hi, x0.amax(dim=dims, keepdim=True))
        width = hi - lo                                           # > 0: window() widens degenerate ones
        geo = _Geometry(ctx, lo, width)

        # Clean pass = first gradient pass (the first run starts at the clean image).
        xg = x0.detach().clone().requires_grad_(True)
        out = self.forward(ctx, xg)
        if ctx.regions:
            raise ValueError("attack 'fab' needs class labels; a single-output (sigmoid) model is not supported")
        k = int(ctx.num_classes)
        ranks = self.ranks(k)
        logits0 = full_res(out).detach().float()
        dice0 = self.dice_per_sample(ctx, out)
        first = self._margin_grad(ctx, out, xg, ctx.y, self._targets(logits0, ranks[0]))
        del out, xg

        thr = float(self.options["dice_threshold"]) * dice0
        todo = dice0 > 0                                          # ROG: the points above its threshold (see doc)
        x_adv = x0.clone()
        for i, r in enumerate(ranks):
            target = first[2] if i == 0 else self._targets(logits0, r)
            for restart in range(int(self.options["restarts"])):
                idx = todo.nonzero().flatten()
                if idx.numel() == 0:
                    return x_adv
                pre = (first[0][idx], first[1][idx]) if i == 0 and restart == 0 else None
                adv, found = self._run(ctx, geo, idx, target[idx], thr[idx], k, restart > 0, pre)
                cand = x_adv.clone()
                cand[idx] = adv
                ok = torch.zeros_like(todo)
                ok[idx] = found
                within = ((cand - x0).abs() <= ctx.eps + geo.tol).flatten(1).all(1)
                take = ok & within
                x_adv = torch.where(per_sample_view(take, nd), self.project(ctx, cand), x_adv)
                todo = todo & ~take
            if i == 0:
                first = None
        return x_adv

    @staticmethod
    def _targets(logits: Tensor, r: int) -> Tensor:
        """``(B, *S)``: per voxel the ``r``-th most likely class."""
        return torch.sort(logits, dim=1, stable=True)[1][:, -r]

    def _margin_grad(self, ctx: AttackContext, out, xg: Tensor, y: Tensor, target: Tensor):
        """``f = -mean_voxels(z_y - z_t)`` ``(n,)`` and ``df/dx`` of the graph ``out(xg)``."""
        z = full_res(out).float()
        f = -(z.gather(1, y[:, None]) - z.gather(1, target[:, None])).flatten(1).mean(1)
        g = self.grad_of(ctx, f.sum(), xg)
        return f.detach(), g, target

    def _run(self, ctx: AttackContext, geo: "_Geometry", idx: Tensor, target: Tensor, thr: Tensor, k: int,
             rand_start: bool, pre):
        """One FAB run (ROG's ``attack_single_run``) on the samples ``idx``; returns the closest
        adversarial point found, in tensor units, and the ``(n,)`` mask of samples where one was found."""
        steps = int(self.options["steps"])
        alpha_max, eta, beta = (float(self.options[key]) for key in ("alpha_max", "eta", "beta"))
        y = ctx.y[idx]
        u0 = geo.u0[idx]
        n, nd = u0.shape[0], u0.dim()
        best = torch.full((n,), math.inf, device=u0.device)
        adv = u0.clone()
        u = u0.clone()
        if rand_start:
            v = torch.rand(u0.shape, generator=ctx.generator, device=u0.device, dtype=u0.dtype) * 2 - 1
            v = v / per_sample_view(v.flatten(1).abs().amax(1).clamp_min(1e-12), nd)
            u = geo.box(u0 + torch.minimum(per_sample_view(best, nd), geo.eps_u[idx]) * v * 0.5, idx)
        for it in range(steps):
            if pre is not None and it == 0:
                f, g = pre
            else:
                xg = geo.to_x(u, idx).requires_grad_(True)
                f, g, _ = self._margin_grad(ctx, self.forward(ctx, xg), xg, y, target)
            g = (g * geo.rows(geo.width, idx)).flatten(1)         # df/du
            b = -f + (g * u.flatten(1)).sum(1)
            d3 = projection_linf(torch.cat((u.flatten(1), u0.flatten(1))), torch.cat((g, g)), torch.cat((b, b)))
            d1, d2 = d3[:n].view_as(u), d3[n:].view_as(u)
            a0 = d3.abs().amax(1).clamp_min(1e-8)
            a1, a2 = a0[:n], a0[n:]
            alpha = per_sample_view((a1 / (a1 + a2)).clamp(0.0, alpha_max), nd)
            u = geo.box((u + eta * d1) * (1 - alpha) + (u0 + eta * d2) * alpha, idx)

            with torch.no_grad():
                out = self.forward(ctx, geo.to_x(u, idx))
                dice = dice_per_sample(full_res(out).argmax(1), y, k)
            del out
            is_adv = dice < thr
            dist = (u - u0).flatten(1).abs().amax(1)
            better = is_adv & (dist < best)
            adv = torch.where(per_sample_view(better, nd), u, adv)
            best = torch.where(better, dist, best)
            u = torch.where(per_sample_view(is_adv, nd), u0 + (u - u0) * beta, u)
        return geo.to_x(adv, idx), torch.isfinite(best)


class _Geometry:
    """Normalised coordinates ``u = (x - lo) / width`` of one call: the box is ``[0, 1]`` there,
    narrowed to ``lower``/``upper`` where those are tighter (degenerate or voxel-wise bounds)."""

    def __init__(self, ctx: AttackContext, lo: Tensor, width: Tensor):
        x0 = ctx.x0
        self.B, self.nd = x0.shape[0], x0.dim()
        self.lo, self.width = lo, width
        self.u0 = (x0 - lo) / width
        self.eps_u = (ctx.eps / width).expand_as(x0)
        self.box_lo = None if ctx.lower is None else ((ctx.lower - lo) / width).clamp_min(0.0).expand_as(x0)
        self.box_hi = None if ctx.upper is None else ((ctx.upper - lo) / width).clamp_max(1.0).expand_as(x0)
        # slack of the budget check: rounding of x -> u -> x
        self.tol = 1e-6 * (1.0 + width + x0.abs())

    def rows(self, t: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of a per-sample tensor; a tensor shared by the batch as it is."""
        return t[idx] if t.dim() == self.nd and t.shape[0] == self.B else t

    def to_x(self, u: Tensor, idx: Tensor) -> Tensor:
        return (self.rows(self.lo, idx) + u * self.rows(self.width, idx)).detach()

    def box(self, u: Tensor, idx: Tensor) -> Tensor:
        u = u.clamp(0.0, 1.0)
        if self.box_lo is not None:
            u = torch.maximum(u, self.box_lo[idx])
        if self.box_hi is not None:
            u = torch.minimum(u, self.box_hi[idx])
        return u
