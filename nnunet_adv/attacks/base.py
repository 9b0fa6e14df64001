"""The one shared base of every attack: options, threat model, loss, gradient, hygiene.

Contract (every attack)::

    attack = build_attack(name, **options)
    x_adv = attack(model, images, labels)

* ``images``: float ``(B, C, *spatial)``, 2 or 3 spatial dims, any device/dtype; finite.
* ``labels``: integer map ``(B, 1, *spatial)`` or ``(B, *spatial)``, or a list/tuple of such
  maps (nnU-Net deep-supervision targets, full resolution first). The attack's own
  voxel-wise computations use the full-resolution map; a user ``loss`` receives ``labels``
  unchanged (or the target in the same structure for targeted attacks).
  Region targets (nnU-Net region-based training, sigmoid outputs): ``(B, R, *spatial)``
  with one binary channel per region (R = K; nnU-Net's ignore channel may follow as
  channel K), or a list of them. They are recognised by ``R > 1`` channels, or by a model
  with a single output channel (K = 1 can only be a sigmoid: a softmax CE over one class is
  identically 0). Then the default loss is BCE-with-logits on the full-resolution regions
  (ignore voxels masked), not CE; targeted attacks and attacks defined by a softmax CE
  weighting (``segpgd``, ``cospgd``) raise ``ValueError``.
* ``model(x)`` returns logits ``(B, K, *spatial)`` or a list/tuple of them (full res first).
* ``x_adv``: same shape, dtype and device as ``images``, detached.

Units: ``eps``, ``alpha``, ``std``, ``lower``, ``upper`` are in the units of the tensor the
attack receives. Each may be a float, a sequence of C per-channel floats, or a tensor
broadcastable to ``images`` (e.g. ``(B, C, 1, 1, 1)``: per sample and channel; this is what
the nnU-Net trainers pass). ``lower``/``upper`` ``None`` means unbounded on that side. The
projection box always contains the clean voxel (``[min(lower, x), max(upper, x)]``) so a
clean image outside the box never makes the budget and the box contradict each other.

Hygiene: input gradients come from ``torch.autograd.grad(objective, x)`` only, so parameter
``.grad`` and DDP reducer state are untouched; gradients are enabled inside (works under
``torch.no_grad()`` and ``torch.inference_mode()``); ``model.training`` is never changed
(callers choose the mode); randomness comes from a private ``torch.Generator`` seeded with
``seed`` (``None``: drawn from torch's global RNG), so a fixed seed is bit-reproducible.
Under CUDA autocast fp16 the objective is multiplied by ``amp_loss_scale`` (default ``2**16``
there, 1 elsewhere) before ``autograd.grad`` and the gradient divided back; an all-zero
input gradient (fp16 underflow) triggers a warning instead of being used silently.

Sign convention: every attack *maximises* an objective. Untargeted: objective = loss with the
true labels. Targeted: objective = -loss with the target labels (the step descends the loss
towards the target).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..losses import dice_per_sample, region_dice_per_sample
from ..outputs import detach_output, full_res, slice_batch
from .options import AMP_DEFAULT_SCALE, COMMON_DEFAULTS, TARGET_DEFAULTS, broadcast_param, check_int, check_param  # noqa: F401
from .targets import LabelsLike, full_res_labels, resolve_target

Tensor = torch.Tensor


def _normal_tensor(t: Tensor) -> Tensor:
    # Inference tensors (created under torch.inference_mode) cannot enter autograd: clone.
    return t.clone() if t.is_inference() else t


def _normal_labels(labels):
    # The user loss must receive ``labels`` itself (same object) unless a clone is unavoidable.
    if isinstance(labels, (list, tuple)):
        if any(torch.is_tensor(t) and t.is_inference() for t in labels):
            return type(labels)(_normal_tensor(t) if torch.is_tensor(t) else t for t in labels)
        return labels
    return _normal_tensor(labels) if torch.is_tensor(labels) else labels


# ----------------------------------------------------------------------------- context
class AttackContext:
    """Per-call state shared by the attack's helpers (not part of the public API).

    Attributes: ``model``; ``x0`` clean images fp32 ``(B, C, *S)``; ``labels`` as received;
    ``y`` full-res labels ``(B, *S)`` int64, or with ``regions`` True the full-res region
    targets ``(B, K, *S)`` fp32 in {0, 1} and ``region_mask`` ``(B, 1, *S)`` (0 on nnU-Net's
    ignore voxels) or None; ``B, C, spatial``; ``generator``; ``sign`` (+1 untargeted, -1
    targeted); ``loss_scale``; ``lower``/``upper`` effective bounds (full-size tensors or
    None); ``num_classes`` (known after the first forward); per-attack extras.
    """

    def __init__(self, **kw):
        self.num_classes: Optional[int] = None
        self.regions = False
        self.region_mask: Optional[Tensor] = None
        self.warned_zero_grad = False
        self._target_struct = None
        self._target_full = None
        self.trace: list = []
        self.__dict__.update(kw)


class Attack:
    """Base of all attacks. Subclasses set ``name``, ``defaults`` (the complete set of
    accepted options with their defaults) and implement :meth:`perturb`.
    """

    name: str = "attack"
    #: one line for reports and ``--list_attacks``: what the attack is and where it comes from
    summary: str = ""
    #: a control, not an attack (e.g. ``slice-rescale``): left out of worst cases
    control: bool = False
    #: takes no gradient of the model (Square, Gaussian noise): the evaluation's checks set it against
    #: the gradient attacks
    gradient_free: bool = False
    defaults: Dict[str, Any] = dict(COMMON_DEFAULTS)
    #: whether the attack is targeted regardless of the ``targeted`` option
    always_targeted: bool = False
    #: whether the attack works on region (sigmoid, multi-label) targets; False for attacks
    #: whose objective is a softmax-CE weighting of class labels (SegPGD, CosPGD)
    supports_regions: bool = True
    #: the fewest output classes the attack's loss is defined for (DLR divides by z_pi1 - z_pi3)
    min_classes: int = 1
    #: after a call: the objective's batch mean at every input gradient, in order (``[]`` for
    #: attacks that take none): what the evaluation's "loss rises" check reads
    trace: list = []

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"attack '{self.name}': unknown option(s) {unknown}; "
                             f"valid options: {sorted(self.defaults)}")
        self.given = frozenset(options)
        self.options: Dict[str, Any] = {**self.defaults, **options}
        self._validate_options()

    def __getattr__(self, item):
        # Options read as attributes (self.eps, self.steps, ...).
        opts = self.__dict__.get("options")
        if opts is not None and item in opts:
            return opts[item]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={self.options[k]!r}" for k in sorted(self.given))
        return f"{type(self).__name__}({shown})"

    # ------------------------------------------------------------------ validation
    def _validate_options(self) -> None:
        o = self.options
        for key in ("eps", "alpha", "std"):
            if key in o:
                check_param(key, o[key])
        for key in ("lower", "upper"):
            if key in o:
                check_param(key, o[key], allow_none=True, nonneg=False)
        if isinstance(o.get("lower"), numbers.Real) and isinstance(o.get("upper"), numbers.Real) \
                and o["lower"] > o["upper"]:
            raise ValueError(f"lower ({o['lower']}) must be <= upper ({o['upper']})")
        if "steps" in o:
            check_int("steps", o["steps"], 1)
        if "restarts" in o:
            check_int("restarts", o["restarts"], 1)
        if "norm" in o:
            if not isinstance(o["norm"], str) or o["norm"].lower() not in ("linf", "l2"):
                raise ValueError(f"norm must be 'linf' or 'l2', got {o['norm']!r}")
            o["norm"] = o["norm"].lower()
            if o["norm"] == "l2":
                # The published defaults are L-inf budgets on [0, 1] images; an L2 radius
                # has no such default, so it must be stated.
                missing = [k for k in ("eps", "alpha") if k in o and k not in self.given]
                if missing:
                    raise ValueError(f"attack '{self.name}' with norm='l2' needs explicit {missing} "
                                     f"(the published defaults are L-inf budgets)")
        if o.get("loss") is not None and not callable(o["loss"]):
            raise ValueError(f"loss must be a callable (model_output, labels) -> scalar, got {o['loss']!r}")
        if o.get("seed") is not None:
            check_int("seed", o["seed"], 0)
        s = o.get("amp_loss_scale")
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0
                              or not math.isfinite(s)):
            raise ValueError(f"amp_loss_scale must be a positive finite float or None, got {s!r}")
        for key in ("targeted", "random_start"):
            if key in o and not isinstance(o[key], bool):
                raise ValueError(f"{key} must be True or False, got {o[key]!r}")
        if "target" in o and o["target"] is not None:
            t = o["target"]
            if isinstance(t, bool) or not (isinstance(t, numbers.Integral) or torch.is_tensor(t)
                                           or callable(t) or isinstance(t, (list, tuple))):
                raise ValueError("target must be None, a class index, a label map tensor (or a "
                                 "deep-supervision list of them) or a callable (labels, num_classes) -> map")
            if isinstance(t, numbers.Integral) and t < 0:
                raise ValueError(f"target class must be >= 0, got {t}")
        self.validate()

    def validate(self) -> None:
        """Attack-specific option checks (override)."""

    # ------------------------------------------------------------------ call
    def __call__(self, model: Callable, images: Tensor, labels: LabelsLike) -> Tensor:
        """Run the attack. See the module docstring for shapes and units."""
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError("images must be a floating-point tensor (B, C, *spatial)")
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}")
        if images.numel() == 0:
            raise ValueError(f"images are empty: shape {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or Inf values")
        y = full_res_labels(labels, images)
        self.check_input(images)
        with torch.inference_mode(False), torch.enable_grad():
            x0 = _normal_tensor(images.detach()).float().clone()
            ctx = self._make_context(model, x0, _normal_labels(labels), _normal_tensor(y))
            x_adv = self.perturb(ctx)
        self.trace = ctx.trace
        return x_adv.detach().to(dtype=images.dtype)

    def check_input(self, images: Tensor) -> None:
        """Attack-specific checks of the input shape (override)."""

    def perturb(self, ctx: AttackContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ context
    def is_targeted(self) -> bool:
        return self.always_targeted or bool(self.options.get("targeted", False))

    def _make_context(self, model, x0: Tensor, labels, y: Tensor) -> AttackContext:
        seed = self.options.get("seed")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        gen = torch.Generator(device=x0.device)
        gen.manual_seed(int(seed))
        scale = self.options.get("amp_loss_scale")
        if scale is None:
            scale = AMP_DEFAULT_SCALE if _cuda_fp16_autocast(x0) else 1.0
        ctx = AttackContext(model=model, x0=x0, labels=labels, y=y, B=x0.shape[0], C=x0.shape[1],
                            spatial=tuple(x0.shape[2:]), generator=gen, regions=y.dim() == x0.dim(),
                            sign=-1.0 if self.is_targeted() else 1.0, loss_scale=float(scale))
        lo = broadcast_param("lower", self.options.get("lower"), x0)
        hi = broadcast_param("upper", self.options.get("upper"), x0)
        if lo is not None and hi is not None and bool((lo > hi).any()):
            raise ValueError("lower must be <= upper everywhere")
        # The box always contains the clean image (see module docstring).
        ctx.lower = None if lo is None else torch.minimum(lo, x0)
        ctx.upper = None if hi is None else torch.maximum(hi, x0)
        ctx.lower_raw, ctx.upper_raw = lo, hi
        self.prepare(ctx)
        return ctx

    def prepare(self, ctx: AttackContext) -> None:
        """Attack-specific per-call setup (override)."""

    # ------------------------------------------------------------------ forward / targets
    def forward(self, ctx: AttackContext, x: Tensor):
        """``model(x)``; on the first call checks the output and resolves the target."""
        out = ctx.model(x)
        if ctx.num_classes is None:
            logits = full_res(out)
            if not torch.is_tensor(logits) or logits.dim() != x.dim() or logits.shape[0] != x.shape[0] \
                    or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
                raise ValueError(f"model output (full resolution) must be logits (B, K, *spatial) matching "
                                 f"images {tuple(x.shape)}; got "
                                 f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
            k = int(logits.shape[1])
            if k < self.min_classes:
                raise ValueError(f"attack '{self.name}' needs a model with at least {self.min_classes} classes, "
                                 f"this one has {k}")
            if k == 1 and not ctx.regions:
                # one output channel = one sigmoid region (nnU-Net region-based training with a
                # single region): a softmax CE over one class is identically 0, never an objective
                ctx.regions, ctx.y = True, ctx.y[:, None].float()
            if ctx.regions:
                self._check_regions(ctx, k)
            else:
                ymin, ymax = int(ctx.y.min()), int(ctx.y.max())
                if ymin < 0 or ymax >= k:
                    raise ValueError(f"labels must be class indices in [0, {k - 1}] for a {k}-class model, "
                                     f"found values in [{ymin}, {ymax}]")
            ctx.num_classes = k
            if self.is_targeted():
                self._resolve_target(ctx)
        return out

    def _check_regions(self, ctx: AttackContext, k: int) -> None:
        """Region targets against a K-output sigmoid model (nnU-Net region-based training)."""
        if not self.supports_regions:
            raise ValueError(f"attack '{self.name}' weights a softmax CE over class labels; it does not "
                             f"support region (sigmoid, one binary channel per region) targets")
        if self.is_targeted():
            raise ValueError(f"attack '{self.name}': targeted attacks need class labels; region "
                             f"(sigmoid) targets are not supported")
        r = int(ctx.y.shape[1])
        if r == k + 1:
            # nnU-Net appends the ignore label as a last region channel (DC_and_BCE_loss's convention)
            ctx.region_mask, ctx.y = 1.0 - ctx.y[:, -1:], ctx.y[:, :-1]
        elif r != k:
            raise ValueError(f"region targets have {r} channels but the model has {k} outputs "
                             f"(expected {k}, or {k + 1} with nnU-Net's ignore channel last)")
        if bool(((ctx.y != 0) & (ctx.y != 1)).any()):
            raise ValueError("region targets must be binary (0/1 or bool), one channel per region")

    def _resolve_target(self, ctx: AttackContext) -> None:
        """Target map per the ``target`` option (NLCEN rule when None)."""
        ctx._target_full, ctx._target_struct = resolve_target(self.options.get("target"), ctx.y, ctx.num_classes,
                                                              ctx.spatial, ctx.labels)

    def voxel_labels(self, ctx: AttackContext) -> Tensor:
        """Full-res map ``(B, *S)`` that voxel-wise computations use (target if targeted);
        with region targets the regions ``(B, K, *S)`` fp32."""
        return ctx._target_full if self.is_targeted() else ctx.y

    def loss_labels(self, ctx: AttackContext):
        """What the loss receives: ``labels`` unchanged, or the target in the same structure."""
        return ctx._target_struct if self.is_targeted() else ctx.labels

    # ------------------------------------------------------------------ losses
    def base_loss(self, ctx: AttackContext, output) -> Tensor:
        """The attack loss L (scalar fp32): user ``loss`` or CE on full-res logits, voxel mean."""
        user = self.options.get("loss")
        if user is not None:
            v = user(output, self.loss_labels(ctx))
            if not torch.is_tensor(v) or v.numel() != 1:
                raise ValueError("the loss callable must return a scalar tensor")
            return v.reshape(()).float()
        if ctx.regions:
            # sigmoid outputs, one binary channel per region: CE against integer labels would be
            # meaningless; BCE-with-logits is the voxel term of nnU-Net's own region loss
            return self._region_bce(ctx, output).mean()
        return F.cross_entropy(full_res(output).float(), self.voxel_labels(ctx))

    @staticmethod
    def _region_bce(ctx: AttackContext, output) -> Tensor:
        """``(B,)`` BCE-with-logits on the full-res regions, voxel mean (ignore voxels masked)."""
        bce = F.binary_cross_entropy_with_logits(full_res(output).float(), ctx.y, reduction="none")
        if ctx.region_mask is None:
            return bce.flatten(1).mean(1)
        m = ctx.region_mask.expand_as(bce)
        return (bce * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)

    def objective(self, ctx: AttackContext, output, t: int = 1, T: int = 1) -> Tensor:
        """Quantity the step maximises at step ``t`` of ``T`` (override for SegPGD/CosPGD)."""
        return ctx.sign * self.base_loss(ctx, output)

    @torch.no_grad()
    def per_sample_objective(self, ctx: AttackContext, output) -> Tensor:
        """``(B,)`` value of ``sign * L`` per sample (worst-case selection, APGD)."""
        user = self.options.get("loss")
        if user is None and ctx.regions:
            v = self._region_bce(ctx, output)
        elif user is None:
            ce = F.cross_entropy(full_res(output).float(), self.voxel_labels(ctx), reduction="none")
            v = ce.flatten(1).mean(1)
        else:
            lab = self.loss_labels(ctx)
            v = torch.stack([user(slice_batch(output, b), slice_batch(lab, b)).reshape(()).float()
                             for b in range(ctx.B)])
        return ctx.sign * v

    @torch.no_grad()
    def dice_per_sample(self, ctx: AttackContext, output) -> Tensor:
        """``(B,)`` mean foreground Dice of the full-resolution prediction of ``output`` against the
        voxel labels (the target if targeted): argmax for labels, ``> 0`` for sigmoid regions."""
        logits = full_res(output)
        if ctx.regions:
            return region_dice_per_sample(logits > 0, ctx.y, ctx.region_mask)
        return dice_per_sample(logits.argmax(1), self.voxel_labels(ctx), int(logits.shape[1]))

    # ------------------------------------------------------------------ gradients
    def grad_of(self, ctx: AttackContext, value: Tensor, wrt: Tensor) -> Tensor:
        """``d value / d wrt`` via ``torch.autograd.grad`` only (parameter ``.grad`` untouched).

        Applies the loss scale (fp16 autocast), replaces non-finite entries (overflow of the
        scale) by 0 with a warning, and warns once per call when a sample's gradient is all
        zero (fp16 underflow, saturated loss or a dead network): such a sample does not move.
        """
        scale = ctx.loss_scale
        (g,) = torch.autograd.grad(value * scale if scale != 1.0 else value, wrt)
        g = g.float()
        if scale != 1.0:
            g = g / scale
        # Overflow can only come from the loss scale; without one, skip this extra pass.
        if scale != 1.0 and not bool(torch.isfinite(g).all()):
            warnings.warn(f"attack '{self.name}': non-finite input gradient (loss scale {scale:g} too large?); "
                          f"non-finite entries set to 0", RuntimeWarning, stacklevel=3)
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        if not ctx.warned_zero_grad:
            zero = g.flatten(1).abs().amax(1) == 0
            if bool(zero.any()):
                ctx.warned_zero_grad = True
                warnings.warn(f"attack '{self.name}': all-zero gradient for sample(s) "
                              f"{zero.nonzero().flatten().tolist()}; these samples are not perturbed by "
                              f"this step (under fp16 autocast this is underflow: raise amp_loss_scale)",
                              RuntimeWarning, stacklevel=3)
        return g

    def input_grad(self, ctx: AttackContext, x: Tensor, t: int = 1, T: int = 1):
        """Gradient of the objective w.r.t. the input at ``x``; returns ``(grad, detached output)``."""
        x = x.detach().requires_grad_(True)
        out = self.forward(ctx, x)
        objective = self.objective(ctx, out, t, T)
        ctx.trace.append(float(objective.detach()))
        g = self.grad_of(ctx, objective, x)
        return g, detach_output(out)

    # ------------------------------------------------------------------ box
    def clamp_box(self, ctx: AttackContext, x: Tensor) -> Tensor:
        if ctx.lower is not None:
            x = torch.maximum(x, ctx.lower)
        if ctx.upper is not None:
            x = torch.minimum(x, ctx.upper)
        return x

    def window(self, ctx: AttackContext):
        """Intensity window ``(lo, hi)``, each ``(B, C, 1, ..., 1)`` or broadcastable: the
        ``lower``/``upper`` options where given, else the clean sample's per-channel min/max.
        Degenerate windows (hi == lo) get width 1 so that mapping to [0, 1] stays finite."""
        dims = tuple(range(2, ctx.x0.dim()))
        lo = ctx.lower_raw if ctx.lower_raw is not None else ctx.x0.amin(dim=dims, keepdim=True)
        hi = ctx.upper_raw if ctx.upper_raw is not None else ctx.x0.amax(dim=dims, keepdim=True)
        hi = torch.where(hi > lo, hi, lo + 1.0)
        return lo, hi


def _cuda_fp16_autocast(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
    except (TypeError, AttributeError):  # older torch
        return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16
