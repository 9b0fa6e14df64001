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
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..losses import as_label_map

Tensor = torch.Tensor
LabelsLike = Union[Tensor, Sequence[Tensor]]

#: Options every attack accepts.
COMMON_DEFAULTS: Dict[str, Any] = {
    "loss": None,            # callable (model_output, labels) -> scalar; None: CE, full res, voxel mean
    "seed": None,            # int: private torch.Generator seed; None: drawn from torch's global RNG
    "lower": None,           # lower bound of the box (tensor units); None: unbounded
    "upper": None,           # upper bound of the box; None: unbounded
    "amp_loss_scale": None,  # None: 2**16 under CUDA autocast fp16, else 1
}
#: Options of attacks that can be targeted.
TARGET_DEFAULTS: Dict[str, Any] = {"targeted": False, "target": None}

#: Default loss scale under CUDA autocast fp16 (GradScaler's initial scale).
AMP_DEFAULT_SCALE = 2.0 ** 16


def full_res(output: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """First (full-resolution) element of a deep-supervision list, or the tensor itself."""
    return output[0] if isinstance(output, (list, tuple)) else output


def detach_output(output):
    if isinstance(output, (list, tuple)):
        return type(output)(o.detach() for o in output)
    return output.detach()


def slice_batch(obj, b: int):
    """Sample ``b`` (keeping the batch dim) of a tensor or a list/tuple of tensors."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(o[b:b + 1] for o in obj)
    return obj[b:b + 1]


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


# ----------------------------------------------------------------------------- option checks
def check_param(name: str, value, *, allow_none: bool = False, nonneg: bool = True) -> None:
    """A float, a sequence of floats or a tensor, finite (and >= 0 if ``nonneg``)."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be given (a float, a sequence of per-channel floats or a tensor)")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, got a bool")
    if isinstance(value, numbers.Real):
        vals = torch.tensor([float(value)])
    elif torch.is_tensor(value):
        vals = value.detach().float().flatten().cpu()
    elif isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        try:
            vals = torch.as_tensor(value, dtype=torch.float64).flatten()
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, "
                             f"got {value!r}") from None
        if vals.numel() == 0:
            raise ValueError(f"{name} is an empty sequence")
    else:
        raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, "
                         f"got {type(value).__name__}")
    if not torch.isfinite(vals).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    if nonneg and (vals < 0).any():
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def broadcast_param(name: str, value, images: Tensor) -> Optional[Tensor]:
    """float / C-sequence / tensor -> fp32 tensor on ``images.device`` broadcastable to ``images``."""
    if value is None:
        return None
    c, nsp = images.shape[1], images.dim() - 2
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=torch.float32, device=images.device)
    elif torch.is_tensor(value):
        t = value.detach().to(device=images.device, dtype=torch.float32)
    else:
        t = torch.as_tensor(value, dtype=torch.float32).flatten().to(images.device)
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} per-channel values but images have {c} channel(s)")
        t = t.view(1, c, *([1] * nsp))
    try:
        shape = torch.broadcast_shapes(t.shape, images.shape)
    except RuntimeError:
        shape = None
    if shape != images.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to images of shape "
                         f"{tuple(images.shape)} (use a float, C values, or e.g. (B, C, 1, ..., 1))")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def dims_except_batch(x: Tensor):
    return tuple(range(1, x.dim()))


def per_sample_view(v: Tensor, ndim: int) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dims in total."""
    return v.view(-1, *([1] * (ndim - 1)))


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
        self.__dict__.update(kw)


class Attack:
    """Base of all attacks. Subclasses set ``name``, ``defaults`` (the complete set of
    accepted options with their defaults) and implement :meth:`perturb`.
    """

    name: str = "attack"
    defaults: Dict[str, Any] = dict(COMMON_DEFAULTS)
    #: whether the attack is targeted regardless of the ``targeted`` option
    always_targeted: bool = False
    #: whether the attack works on region (sigmoid, multi-label) targets; False for attacks
    #: whose objective is a softmax-CE weighting of class labels (SegPGD, CosPGD)
    supports_regions: bool = True

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
        y = self._full_res_labels(labels, images)
        self.check_input(images)
        with torch.inference_mode(False), torch.enable_grad():
            x0 = _normal_tensor(images.detach()).float().clone()
            ctx = self._make_context(model, x0, _normal_labels(labels), _normal_tensor(y))
            x_adv = self.perturb(ctx)
        return x_adv.detach().to(dtype=images.dtype)

    def check_input(self, images: Tensor) -> None:
        """Attack-specific checks of the input shape (override)."""

    def perturb(self, ctx: AttackContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _full_res_labels(labels: LabelsLike, images: Tensor) -> Tensor:
        first = labels
        if isinstance(labels, (list, tuple)):
            if len(labels) == 0:
                raise ValueError("labels is an empty list")
            first = labels[0]
        if not torch.is_tensor(first):
            raise ValueError(f"labels must be a tensor or a list of tensors, got {type(first).__name__}")
        if first.dim() == images.dim() and first.shape[1] > 1 and first.shape[2:] == images.shape[2:]:
            # nnU-Net region targets (B, R, *S), one binary channel per region: a label map
            # never has more than one channel. Checked against the model in forward().
            y = first.float()
            if y.shape[0] != images.shape[0]:
                raise ValueError(f"labels shape mismatch: batch size {y.shape[0]} != images batch size "
                                 f"{images.shape[0]}")
            return y
        try:
            y = as_label_map(first, images.shape[2:])
        except ValueError as e:
            raise ValueError(f"labels shape mismatch: {e} (images {tuple(images.shape)})") from None
        if y.shape[0] != images.shape[0]:
            raise ValueError(f"labels shape mismatch: batch size {y.shape[0]} != images batch size {images.shape[0]}")
        return y

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
        spec = self.options.get("target")
        k, y = ctx.num_classes, ctx.y
        struct = None
        if spec is None:
            # NLCEN protocol (He et al., AAAI 2019, after Kurakin et al.): binary -> swap fg/bg;
            # multi-class -> all background.
            t = (1 - y) if k == 2 else torch.zeros_like(y)
        elif isinstance(spec, numbers.Integral):
            if not 0 <= int(spec) < k:
                raise ValueError(f"target class {spec} out of range for a {k}-class model")
            t = torch.full_like(y, int(spec))
        elif torch.is_tensor(spec) or isinstance(spec, (list, tuple)):
            first = spec[0] if isinstance(spec, (list, tuple)) else spec
            try:
                t = as_label_map(first.to(y.device), ctx.spatial)
            except (ValueError, AttributeError) as e:
                raise ValueError(f"target shape mismatch: {e}") from None
            if t.shape[0] != y.shape[0]:
                raise ValueError(f"target batch size {t.shape[0]} != images batch size {y.shape[0]}")
            if isinstance(spec, (list, tuple)):
                struct = type(spec)(s.to(y.device) for s in spec)
        else:  # callable
            t = spec(y, k)
            try:
                t = as_label_map(t, ctx.spatial)
            except ValueError as e:
                raise ValueError(f"target callable returned a bad map: {e}") from None
        if int(t.min()) < 0 or int(t.max()) >= k:
            raise ValueError(f"target classes must be in [0, {k - 1}]")
        ctx._target_full = t
        ctx._target_struct = struct if struct is not None else _like_labels(t, ctx.labels)

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
        g = self.grad_of(ctx, self.objective(ctx, out, t, T), x)
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


def _like_labels(t_full: Tensor, labels):
    """Put a full-res target ``(B, *S)`` into the structure and layout of ``labels``:
    same dims (channel or not) and dtype; deep-supervision scales by nearest resampling."""
    def one(ref: Tensor) -> Tensor:
        nsp = t_full.dim() - 1
        has_channel = ref.dim() == nsp + 2
        size = tuple(ref.shape[2:]) if has_channel else tuple(ref.shape[1:])
        t = t_full
        if tuple(t.shape[1:]) != size:
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0].round().long()
        if has_channel:
            t = t[:, None]
        return t.to(dtype=ref.dtype)

    if isinstance(labels, (list, tuple)):
        return type(labels)(one(r) for r in labels)
    return one(labels)


def _cuda_fp16_autocast(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
    except (TypeError, AttributeError):  # older torch
        return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16


# ============================================================================= Lp attacks
LP_DEFAULTS: Dict[str, Any] = {"eps": 4 / 255, "norm": "linf"}


class LpAttack(Attack):
    """Shared L-inf / L2 machinery: budget tensors, projection, step direction, random start.

    ``norm='linf'``: ``|x_adv - x| <= eps`` voxel-wise (eps per channel/sample allowed).
    ``norm='l2'``: ``||x_adv - x||_2 <= eps`` per sample over all channels and voxels;
    ``eps``/``alpha`` must then be the same for all channels of a sample (a float or a
    ``(B, 1, ..., 1)``-like tensor).
    """

    defaults = {**COMMON_DEFAULTS, **TARGET_DEFAULTS, **LP_DEFAULTS}

    def prepare(self, ctx: AttackContext) -> None:
        ctx.norm = self.options["norm"]
        ctx.eps = self._budget(ctx, "eps", self.options["eps"])
        ctx.alpha = self._budget(ctx, "alpha", self.options["alpha"]) if "alpha" in self.options else None

    def _budget(self, ctx: AttackContext, name: str, value) -> Tensor:
        t = broadcast_param(name, value, ctx.x0)
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0")
        if ctx.norm == "l2":
            t = self._per_sample(name, t, ctx)
        return t

    @staticmethod
    def _per_sample(name: str, t: Tensor, ctx: AttackContext) -> Tensor:
        if t.dim() == 0:
            return t
        dims = tuple(range(1, t.dim()))
        if not bool((t.amax(dim=dims) == t.amin(dim=dims)).all()):
            raise ValueError(f"with norm='l2', {name} must be one value per sample (the L2 ball is over all "
                             f"channels and voxels), got per-channel/voxel values of shape {tuple(t.shape)}")
        return t.amax(dim=dims, keepdim=True)

    def l2_norm(self, v: Tensor) -> Tensor:
        return per_sample_view(v.flatten(1).norm(dim=1), v.dim())

    def direction(self, ctx: AttackContext, g: Tensor) -> Tensor:
        """Steepest-ascent direction of unit size: ``sign(g)`` (L-inf) or ``g/||g||_2`` (L2)."""
        if ctx.norm == "linf":
            return g.sign()
        return g / self.l2_norm(g).clamp_min(1e-12)

    def project(self, ctx: AttackContext, x: Tensor, eps: Optional[Tensor] = None) -> Tensor:
        """Projection onto the eps-ball around the clean image, then onto the box."""
        eps = ctx.eps if eps is None else eps
        d = x - ctx.x0
        if ctx.norm == "linf":
            d = torch.maximum(torch.minimum(d, eps), -eps)
        else:
            n = self.l2_norm(d)
            d = d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        return self.clamp_box(ctx, ctx.x0 + d)

    def random_init(self, ctx: AttackContext) -> Tensor:
        """Uniform sample of the eps-ball (L-inf: per voxel; L2: uniform in the ball), boxed."""
        x0, g = ctx.x0, ctx.generator
        if ctx.norm == "linf":
            u = torch.rand(x0.shape, generator=g, device=x0.device, dtype=x0.dtype) * 2 - 1
            d = u * ctx.eps
        else:
            v = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
            v = v / self.l2_norm(v).clamp_min(1e-12)
            n = x0[0].numel()
            r = torch.rand((x0.shape[0],), generator=g, device=x0.device, dtype=x0.dtype) ** (1.0 / n)
            d = v * per_sample_view(r, x0.dim()) * ctx.eps
        return self.project(ctx, x0 + d)
