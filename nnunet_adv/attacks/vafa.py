"""VAFA: Volumetric Adversarial Frequency Attack (Hanif, Naseer, Khan, Shah, Khan, "Frequency
Domain Adversarial Training for Robust Volumetric Medical Segmentation", MICCAI 2023; ref. code
``attacks/vafa/vafa.py``), 3D and 2D (slice-wise, after AdvDrop, Duan et al. ICCV 2021).

The budget is the quantisation-table bound ``q_max``, not an Lp eps. The attack learns, per
sample, channel, block and DCT coefficient, a quantisation step ``q`` in ``[q_min, q_max]``
that makes JPEG-like compression of the image destroy what the network relies on.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..frequency import BACKENDS, dctn, from_blocks, idctn, normalize_block_size, soft_round, to_blocks
from ..losses import monai_dice_ce, monai_dice_loss
from ..outputs import full_res
from ..ssim import block_ssim
from .base import Attack, AttackContext
from .options import COMMON_DEFAULTS, TARGET_DEFAULTS
from .selection import per_sample_view
from .vafa_tiles import REF_TILE_MM, check_mm, check_tile, gather_tiles, reference_tile, stitch_tiles, tile_boxes


def _minmax(x: torch.Tensor, dims) -> torch.Tensor:
    mn = x.amin(dim=dims, keepdim=True)
    mx = x.amax(dim=dims, keepdim=True)
    # the reference divides by (max - min) unguarded (NaN for a constant slice); here such a slice is 0
    return (x - mn) / torch.where(mx > mn, mx - mn, torch.ones_like(mx))


def rescale_slices(x01: torch.Tensor, slice_axis: int = 0, tile: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """The VAFA reference code's per-slice min-max rescale (``attacks/vafa/vafa.py``: every axial
    slice of the reconstruction mapped to [0, 1]), differentiable through the slice extrema.

    Args:
        x01: ``(B, C, H, W)`` (one slice per image) or ``(B, C, D, H, W)``.
        slice_axis: spatial axis indexing the slices of a 3D image (nnU-Net's first axis: 0).
        tile: 3D only: the reference attacks non-overlapping tiles (96^3) and rescales the
            slices of each tile separately; tiles as :func:`~nnunet_adv.attacks.vafa_tiles.tile_boxes`,
            a later tile overwriting the overlap of the moved-back last one (the reference's
            stitching). None: whole slices.
    Returns:
        Same shape; every (tile) slice spans [0, 1] (a constant one is 0).
    """
    nsp = x01.dim() - 2
    if nsp == 2:
        return _minmax(x01, (2, 3))
    s = slice_axis % 3
    dims = tuple(2 + d for d in range(3) if d != s)
    if tile is None:
        return _minmax(x01, dims)
    out = x01.clone()
    for box in tile_boxes(x01.shape[2:], tile):
        idx = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)
        out[idx] = _minmax(x01[idx], dims)
    return out


def unit_window(ctx: AttackContext, lo: torch.Tensor, hi: torch.Tensor, clip: bool):
    """``(lo, hi, x01)``: the clean image mapped to [0, 1] with the window ``[lo, hi]``
    (``(B, C, 1, ..., 1)``), widened to contain the clean image unless ``clip`` (then voxels
    outside the window are clipped into it, as the reference's preprocessing does)."""
    if not clip:
        dims = tuple(range(2, ctx.x0.dim()))
        lo = torch.minimum(lo, ctx.x0.amin(dim=dims, keepdim=True))
        hi = torch.maximum(hi, ctx.x0.amax(dim=dims, keepdim=True))
    return lo, hi, ((ctx.x0 - lo) / (hi - lo)).clamp(0.0, 1.0)


class VAFA3D(Attack):
    """VAFA-3D: learn 3D-DCT quantisation tables on ``h^3`` blocks.

    Algorithm (the reference code, on images mapped to [0, 1]; ``T = steps``)::

        q <- q_init (default q_max) everywhere       (paper Alg. 1: ones; ref. code: q_max)
        a <- 0.1 ; da = (1e-20 - 0.1) / T             soft-rounding temperature, annealed
        D  = DCT3_ortho(block(255 X) - 128)           per h^3 block (constant: computed once)
        repeat T times:
            X' = unblock(IDCT3_ortho(phi(D / q, a) * q) + 128) / 255
            [renormalize_slices: X' min-max rescaled per slice to [0, 1] (ref. code only)]
            J  = -L(f(X'), y) + (1 - SSIM_blocks(X, X'))   (SSIM term if use_ssim_loss)
            q <- clamp(q - q_step * sign(dJ/dq), q_min, q_max);  a <- a + da
            a sample whose every voxel is misclassified keeps this X' and stops (early stop)
        X_adv = clip(X', 0, 1)  (the X' of the last evaluated step, as in the reference)

    ``phi`` is :func:`nnunet_adv.frequency.soft_round` (tanh rounding, not straight-through);
    SSIM is 3D, window 3 (Gaussian sigma 1.5), data range 1, non-negative, blocks as the batch.
    Targeted: ``J = +L(f(X'), target) + (1 - SSIM)`` and the early stop waits for every voxel
    to take the target class.

    Units: the attack maps each image to [0, 1] with the intensity window ``lower``/``upper``
    (tensor units; None: the clean sample's per-channel min/max) *widened to contain the clean
    image* (``[min(lower, min x), max(upper, max x)]`` per sample and channel, as the Lp attacks'
    box contains the clean voxel), runs VAFA there and maps the result back into the box
    ``[min(lower, x), max(upper, x)]``. So a clean voxel outside the window (CT air below p0.5,
    augmented patches) is quantised like any other and never clipped. ``clip_to_window=True``
    maps with the window itself and clips such voxels into it (what the reference code's
    preprocessing does: ``ScaleIntensityRanged(clip=True)``; the ``-ref`` variants).

    Block sizes that do not divide the image: the [0, 1] image is padded at the far end of
    each blocked axis (``pad_mode``: 'replicate' (default) or 'reflect'), attacked, and the
    output cropped back; nothing is truncated. A block larger than the image is an error.
    The SSIM term is computed on the padded blocks.

    Tiles (the reference code's geometry, :mod:`nnunet_adv.attacks.vafa_tiles`): the tile is
    ``rescale_tile`` voxels when given, else ``tile_mm`` millimetres converted with ``spacing``
    (the image's voxel spacing in mm, same axis order; the whole-volume attack and the trainers
    pass the case's network-grid spacing through
    :meth:`nnunet_adv.attack_config.AttackConfig.network_options`; None: the reference's
    (2.0, 1.5, 1.5) mm, so the reference's 192 x 144 x 144 mm is its 96^3 voxels). With
    ``tile_tables`` every tile of a 3D image is quantised on its own (its own block grid, padded
    to block multiples inside the tile, its own ``q`` per block and coefficient: the
    reference's ``(B_tiles, C, N_blocks, *block)`` tables), its slices rescaled on their own, and
    the tiles stitched by overwriting in the reference's order; without it one block grid covers
    the whole image (one table per volume: ``q`` per sample, channel, block and coefficient).
    2D images are never tiled.

    Options:
        steps 20; q_max 20; q_min 5 (paper: 1); block_size (8, 8, 8) (class default; the
        reference experiments use 32); use_ssim_loss True; q_step 1.0; temperature
        (0.1, 1e-20); renormalize_slices False (the reference code rescales each axial slice
        of X' to [0, 1] before the forward pass; off by default because it changes the
        intensities of every slice: :class:`VAFA3DRef` turns it on); rescale_tile None (the
        rescale's tile, :func:`rescale_slices`; None: whole slices); clip_to_window False;
        slice_axis 0 (the axis indexing slices among the spatial
        axes; nnU-Net's first spatial axis is the out-of-plane one, MONAI's (H, W, D) layout
        of the reference code uses -1); early_stop True; pad_mode 'replicate'; dct_backend
        'matrix' ('torch_dct' = the reference's DCT); q_init None (the initial q; None: q_max,
        the reference code; the paper's Alg. 1: 1); tile_mm None (the tile in mm, used when
        rescale_tile is None); spacing None (mm per voxel, computed: see Tiles);
        tile_tables False (one quantisation table per tile, see Tiles); targeted / target,
        loss, seed (unused: VAFA is deterministic), lower / upper, amp_loss_scale.
    Shapes: images ``(B, C, D, H, W)`` -> same. Labels ``(B, [1,] D, H, W)`` (or a list).
    After a call, ``q_tables`` holds the last tables (as the reference returns them):
    ``(B, C, [T tiles,] n1, n2, n3, b1, b2, b3)`` (VAFA-2D: ``(B, C, [T,] n_slices, n1, n2, b1, b2)``).
    """

    name = "vafa-3d"
    summary = "VAFA-3D: the authors' quantisation (q from q_max, q_min 5) with CE, no rescale, block 8"
    block_ndim = 3
    defaults = {**COMMON_DEFAULTS, **TARGET_DEFAULTS, "steps": 20, "q_max": 20.0, "q_min": 5.0, "q_init": None,
                "block_size": (8, 8, 8), "use_ssim_loss": True, "q_step": 1.0,
                "temperature": (0.1, 1e-20), "renormalize_slices": False, "rescale_tile": None,
                "tile_mm": None, "spacing": None, "tile_tables": False,
                "clip_to_window": False, "slice_axis": 0, "early_stop": True, "pad_mode": "replicate",
                "dct_backend": "matrix"}

    # ------------------------------------------------------------------ options
    def validate(self) -> None:
        o = self.options
        for key in ("q_max", "q_min", "q_step"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
                raise ValueError(f"{key} must be a positive number, got {v!r}")
        if o["q_min"] > o["q_max"]:
            raise ValueError(f"q_min ({o['q_min']}) must be <= q_max ({o['q_max']})")
        q0 = o["q_init"]
        if q0 is not None and (isinstance(q0, bool) or not isinstance(q0, numbers.Real)
                               or not o["q_min"] <= q0 <= o["q_max"]):
            raise ValueError(f"q_init must be None (q_max) or a number in [q_min, q_max] = "
                             f"[{o['q_min']}, {o['q_max']}], got {q0!r}")
        o["block_size"] = normalize_block_size(o["block_size"], self.block_ndim)
        temp = o["temperature"]
        try:
            a0, a1 = (float(v) for v in temp)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a pair (start, end), got {temp!r}") from None
        if not (0.0 < a1 <= a0 < 1.0):
            raise ValueError(f"temperature (start, end) must satisfy 0 < end <= start < 1, got {temp!r}")
        o["rescale_tile"] = check_tile(o["rescale_tile"])
        o["tile_mm"] = check_mm(o["tile_mm"], "tile_mm")
        o["spacing"] = check_mm(o["spacing"], "spacing", lengths=(2, 3))
        for key in ("use_ssim_loss", "renormalize_slices", "early_stop", "clip_to_window", "tile_tables"):
            if not isinstance(o[key], bool):
                raise ValueError(f"{key} must be True or False, got {o[key]!r}")
        if o["pad_mode"] not in ("replicate", "reflect"):
            raise ValueError(f"pad_mode must be 'replicate' or 'reflect', got {o['pad_mode']!r}")
        if o["dct_backend"] not in BACKENDS:
            raise ValueError(f"dct_backend must be one of {list(BACKENDS)}, got {o['dct_backend']!r}")
        if isinstance(o["slice_axis"], bool) or not isinstance(o["slice_axis"], numbers.Integral):
            raise ValueError(f"slice_axis must be an integer, got {o['slice_axis']!r}")

    def check_input(self, images: torch.Tensor) -> None:
        nsp = images.dim() - 2
        if nsp != 3:
            raise ValueError(f"{self.name} needs 3D images (B, C, D, H, W), got shape {tuple(images.shape)}; "
                             f"use 'vafa-2d' for 2D images")
        self._slice_axis(nsp)
        self._check_block_fits(images)

    def _slice_axis(self, nsp: int) -> int:
        s = int(self.options["slice_axis"])
        if not -nsp <= s < nsp:
            raise ValueError(f"slice_axis {s} out of range for {nsp} spatial dims")
        return s % nsp

    def _check_block_fits(self, images: torch.Tensor) -> None:
        sizes = self._block_dim_sizes(images)
        bs = self.options["block_size"]
        if any(b > s for b, s in zip(bs, sizes)):
            where = "tile's" if self._tiled(images) else "image's"
            raise ValueError(f"{self.name}: block_size {tuple(bs)} is larger than the {where} blocked "
                             f"dims {tuple(sizes)} (image shape {tuple(images.shape)}); give a smaller block_size")

    # ------------------------------------------------------------------ tiles
    def tile(self) -> Optional[Tuple[int, int, int]]:
        """The reference's tile in voxels of this image's grid: ``rescale_tile`` when given, else
        ``tile_mm`` / ``spacing``, else None (:func:`~nnunet_adv.attacks.vafa_tiles.reference_tile`)."""
        o = self.options
        return reference_tile(o["rescale_tile"], o["tile_mm"], o["spacing"])

    def _tiled(self, images: torch.Tensor) -> bool:
        """One quantisation table per tile: 3D images with ``tile_tables`` (2D images: one tile)."""
        return bool(self.options["tile_tables"]) and images.dim() == 5

    def _extent(self, images) -> Tuple[int, ...]:
        """The spatial extent the blocks cover: the image's, or with tile tables one tile's."""
        sp = tuple(images.shape[2:])
        tile = self.tile() if self._tiled(images) else None
        return sp if tile is None else tuple(min(t, n) for t, n in zip(tile, sp))

    # ------------------------------------------------------------------ layout
    def _block_dim_sizes(self, images) -> Tuple[int, ...]:
        return self._extent(images)

    def to_work(self, x: torch.Tensor) -> torch.Tensor:
        """Image layout -> work layout whose last ``block_ndim`` dims are the blocked ones:
        the image, or with tile tables its tiles ``(B, C, T, *t)`` (:meth:`_set_tiles` first)."""
        return x if self._boxes is None else gather_tiles(x, self._boxes)

    def from_work(self, w: torch.Tensor) -> torch.Tensor:
        return w if self._boxes is None else stitch_tiles(w, self._boxes, self._spatial)

    #: tile boxes and image size of the image being attacked (None: one block grid on the image)
    _boxes = None
    _spatial = None

    def _set_tiles(self, x01: torch.Tensor) -> None:
        """Fix the work layout for ``x01`` (B, C, *S): tiles when :meth:`_tiled`. The layout is
        per call of :meth:`perturb`; the attack object holds it because ``to_work`` takes one tensor."""
        self._spatial = tuple(x01.shape[2:])
        if not self._tiled(x01):  # a 2D image (one slice, one tile; its spacing has 2 axes) or no tables
            self._boxes = None
            return
        tile = self.tile()
        whole = tuple(self._spatial) if tile is None else tile   # no tile: the volume is one tile
        self._boxes = tile_boxes(self._spatial, whole)

    def _work_slice_dims(self, w: torch.Tensor) -> Tuple[int, ...]:
        """Dims of a tiled work tensor ``(B, C, T, *t)`` spanning one slice of one tile."""
        off, s = w.dim() - 3, self._slice_axis(3)
        return tuple(off + d for d in range(3) if d != s)

    def _pad(self, w: torch.Tensor):
        """Pad the trailing blocked dims of a (..., *S) work tensor up to block multiples."""
        bs = self.options["block_size"]
        k = len(bs)
        sizes = tuple(w.shape[-k:])
        extra = [(-s) % b for s, b in zip(sizes, bs)]
        if not any(extra):
            return w, sizes
        pad = []
        for e in reversed(extra):                        # F.pad lists the last dim first
            pad += [0, e]
        # replicate/reflect pad only (N, 1, *S) with k = 2 or 3 padded dims: fold the leading dims
        flat = F.pad(w.reshape(-1, 1, *sizes), pad, mode=self.options["pad_mode"])
        return flat.reshape(*w.shape[:-k], *flat.shape[-k:]), sizes

    @staticmethod
    def _crop(w: torch.Tensor, sizes) -> torch.Tensor:
        idx = (Ellipsis,) + tuple(slice(0, s) for s in sizes)
        return w[idx]

    def _renormalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Reference-code option: min-max rescale every slice (of every tile) to [0, 1]."""
        nsp = x01.dim() - 2
        return rescale_slices(x01, self._slice_axis(nsp) if nsp == 3 else 0, self.options["rescale_tile"])

    def vafa_window(self, ctx: AttackContext):
        """``(lo, hi, x01)``: the [0, 1] map of the clean image (class docstring, Units)."""
        return unit_window(ctx, *self.window(ctx), clip=self.options["clip_to_window"])

    # ------------------------------------------------------------------ transform
    def frequency_coefficients(self, x01: torch.Tensor):
        """Image in [0, 1] ``(B, C, *S)`` -> ``(coeffs, clean_blocks, sizes)``.

        ``clean_blocks``: the padded image in block layout ``(B, C, [n_slices,] n1..nk,
        b1..bk)``; ``coeffs = DCT(255 * blocks - 128)`` (orthonormal, per block);
        ``sizes``: the unpadded blocked sizes (for the crop). fp32, autocast disabled.
        """
        bs = self.options["block_size"]
        self._set_tiles(x01)
        with torch.autocast(device_type=x01.device.type, enabled=False):
            w_pad, sizes = self._pad(self.to_work(x01.float()))
            clean_blocks = to_blocks(w_pad, bs)
            coeffs = dctn(clean_blocks * 255.0 - 128.0, len(bs), self.options["dct_backend"])
        return coeffs, clean_blocks, sizes

    def reconstruct(self, coeffs: torch.Tensor, q: torch.Tensor, a, sizes):
        """Quantise / dequantise and invert: returns ``(x01_adv (B, C, *S), adv_blocks)``.

        ``X' = unblock(IDCT(phi(coeffs / q, a) * q) + 128) / 255``, cropped to ``sizes``, then
        with ``renormalize_slices`` the reference's per-slice rescale (each tile's own slices
        before stitching with tile tables; the tiles of the stitched image otherwise);
        ``adv_blocks`` are the blocks of that result. ``a = None`` skips the rounding (then ``q``
        cancels and ``X' = X`` exactly up to floating point). Differentiable w.r.t. ``q``. fp32,
        autocast disabled.
        """
        bs = self.options["block_size"]
        with torch.autocast(device_type=coeffs.device.type, enabled=False):
            scaled = coeffs / q
            rounded = scaled if a is None else soft_round(scaled, a)
            adv_blocks = (idctn(rounded * q, len(bs), self.options["dct_backend"]) + 128.0) / 255.0
            work = self._crop(from_blocks(adv_blocks, bs), sizes)
            if not self.options["renormalize_slices"]:
                return self.from_work(work), adv_blocks
            if self._boxes is not None:
                work = _minmax(work, self._work_slice_dims(work))
                return self.from_work(work), to_blocks(self._pad(work)[0], bs)
            x01_adv = self._renormalize(self.from_work(work))
            return x01_adv, to_blocks(self._pad(self.to_work(x01_adv))[0], bs)

    # ------------------------------------------------------------------ attack
    def perturb(self, ctx: AttackContext):
        o = self.options
        k = len(o["block_size"])
        lo, hi, x01 = self.vafa_window(ctx)
        width = hi - lo
        dev_type = ctx.x0.device.type

        # The transforms run in fp32 even under autocast: DCT coefficients of 255-scaled
        # blocks reach ~1e3 and fp16 would swamp the small changes of q. The clean
        # coefficients are constant, so they are computed once (the reference recomputes them).
        coeffs, clean_blocks, sizes = self.frequency_coefficients(x01)
        q = torch.full_like(coeffs, float(o["q_max"] if o["q_init"] is None else o["q_init"]))
        steps = int(o["steps"])
        a0, a1 = (float(v) for v in o["temperature"])
        da = (a1 - a0) / steps
        done = torch.zeros(ctx.B, dtype=torch.bool, device=ctx.x0.device)
        result = x01.clone()
        x01_adv = x01
        for i in range(steps):
            q.requires_grad_(True)
            x01_adv, adv_blocks = self.reconstruct(coeffs, q, a0 + i * da, sizes)
            out = self.forward(ctx, lo + x01_adv * width)
            # J = -objective (+ 1 - SSIM): q descends J, i.e. ascends the attack objective.
            J = -self.objective(ctx, out)
            if o["use_ssim_loss"]:
                with torch.autocast(device_type=dev_type, enabled=False):
                    J = J + (1.0 - block_ssim(clean_blocks, adv_blocks, k, data_range=1.0, win_size=3))
            ctx.trace.append(-float(J.detach()))  # the objective VAFA ascends (J descends)
            g = self.grad_of(ctx, J, q)
            with torch.no_grad():
                q = (q - float(o["q_step"]) * g.sign()).clamp_(float(o["q_min"]), float(o["q_max"]))
                if o["early_stop"]:
                    ref = self.voxel_labels(ctx)
                    if ctx.regions:
                        # sigmoid regions: a voxel is misclassified when any region is (ignore voxels count)
                        hit = ((full_res(out) > 0).float() != ref).any(1)
                        if ctx.region_mask is not None:
                            hit = hit | (ctx.region_mask[:, 0] == 0)
                    else:
                        pred = full_res(out).argmax(1)
                        hit = (pred == ref) if self.is_targeted() else (pred != ref)
                    success = hit.flatten(1).all(1) & ~done
                    if bool(success.any()):
                        result = torch.where(per_sample_view(success, result.dim()), x01_adv.detach(), result)
                        done |= success
                        if bool(done.all()):
                            break
        # the learnt tables, as the reference returns them: (B, C, [T,] [n_slices,] n.., b..), see q_tables
        self.q_tables = q.detach()
        with torch.no_grad():
            result = torch.where(per_sample_view(done, result.dim()), result, x01_adv.detach())
            return self.clamp_box(ctx, lo + result.clamp(0.0, 1.0) * width)


class VAFA2D(VAFA3D):
    """VAFA-2D: the same algorithm with 2D DCT on ``h x h`` blocks of every slice.

    3D images: every slice along ``slice_axis`` (default 0, the first spatial axis) is split
    into ``h x h`` blocks over the two remaining axes; 2D images: the image itself.
    Defaults (reference ``VAFA_2D``): steps 10, q_max 20, q_min 5, block_size (8, 8) (the
    README suggests 32), use_ssim_loss False (the reference has no SSIM term; when enabled it
    is a 2D block SSIM), other options as :class:`VAFA3D`.
    Shapes: images ``(B, C, H, W)`` or ``(B, C, D, H, W)`` -> same.
    """

    name = "vafa-2d"
    summary = "VAFA-2D: the authors' quantisation (q from q_max, q_min 5) with CE, no rescale, block 8"
    block_ndim = 2
    defaults = {**VAFA3D.defaults, "steps": 10, "block_size": (8, 8), "use_ssim_loss": False}

    def check_input(self, images: torch.Tensor) -> None:
        nsp = images.dim() - 2
        if nsp == 3:
            self._slice_axis(nsp)
        self._check_block_fits(images)

    def _block_dim_sizes(self, images) -> Tuple[int, ...]:
        sp = self._extent(images)
        if len(sp) == 2:
            return sp
        s = self._slice_axis(3)
        return tuple(v for d, v in enumerate(sp) if d != s)

    def to_work(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x
        w = super().to_work(x)                           # (B, C, *S) or tiles (B, C, T, *t)
        off = w.dim() - 3
        return w.movedim(off + self._slice_axis(3), off)  # (B, C, [T,] n_slices, a, b)

    def from_work(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() == 4:
            return w
        off = w.dim() - 3
        return super().from_work(w.movedim(off, off + self._slice_axis(3)))

    def _work_slice_dims(self, w: torch.Tensor) -> Tuple[int, ...]:
        return (w.dim() - 2, w.dim() - 1)                # the slice axis is first of the three


# ============================================================================= the authors' code
#: What the reference code does beyond the paper's algorithm (``attacks/vafa/vafa.py`` and
#: ``generate_adv_samples.py`` of asif-hanif/vafa): the volume attacked tile by tile (96^3 voxels of
#: its 1.5 x 1.5 x 2 mm grid: ``tile_mm`` (192, 144, 144) in nnU-Net's (z, y, x) order), one
#: quantisation table per tile, every axial slice of each tile min-max rescaled to [0, 1] in every
#: step and in the output, the image clipped to its window.
REF_OPTIONS = {"renormalize_slices": True, "rescale_tile": None, "tile_mm": REF_TILE_MM, "tile_tables": True,
               "clip_to_window": True}


def _loss_unless_given(attack: VAFA3D, ctx: AttackContext, output, loss_fn) -> torch.Tensor:
    """``loss_fn(output, labels)`` unless a ``loss`` option is given (a trainer passes its own
    training loss, as the reference's VAFT crafts with its training loss)."""
    if attack.options.get("loss") is not None:
        return VAFA3D.base_loss(attack, ctx, output)
    return loss_fn(output, attack.voxel_labels(ctx))


def _reference_loss(attack: VAFA3D, ctx: AttackContext, output) -> torch.Tensor:
    """The reference code's attack loss, MONAI's DiceCE (:func:`nnunet_adv.losses.monai_dice_ce`)."""
    return _loss_unless_given(attack, ctx, output, monai_dice_ce)


def _paper_loss(attack: VAFA3D, ctx: AttackContext, output) -> torch.Tensor:
    """The paper's attack loss, "the Dice loss" (Eq. 2, Alg. 1): the Dice term of the reference's
    DiceCE (:func:`nnunet_adv.losses.monai_dice_loss`; the paper gives no smoothing or class
    settings, so the authors' code's are kept)."""
    return _loss_unless_given(attack, ctx, output, monai_dice_loss)


class VAFA3DPaper(VAFA3D):
    """VAFA-3D as the paper's text writes it (``vafa-3d-paper``; Hanif et al. 2023, Eq. 2 and
    Alg. 1): q initialised to 1 and bounded to [1, q_max] (the authors' code: from q_max, bounded
    to [5, q_max]), the objective ``L_dice(f(X'), Y) - L_ssim(X, X')`` (the Dice loss, not
    :class:`VAFA3D`'s CE nor the code's DiceCE), blocks of 32^3 (the paper's main results), no
    per-slice rescale, no tiles, no clip to the window (the paper's algorithm on nnU-Net's grid).
    Options and other defaults: as :class:`VAFA3D` (q_max 20, 20 steps, SSIM term on).
    Label targets only (no regions).
    """

    name = "vafa-3d-paper"
    summary = "VAFA-3D as the paper writes it (q from 1, q_min 1, Dice loss, SSIM term, block 32)"
    defaults = {**VAFA3D.defaults, "q_init": 1.0, "q_min": 1.0, "block_size": (32, 32, 32)}
    supports_regions = False
    base_loss = _paper_loss


class VAFA3DRef(VAFA3D):
    """VAFA-3D as the authors' code runs it (``vafa-3d-ref``): :class:`VAFA3D` (q from q_max,
    q_min 5) with the reference's geometry and extras: tiles of the reference's physical size
    (``tile_mm`` (192, 144, 144) mm, nnU-Net's (z, y, x) order, converted with the case's
    ``spacing``; ``rescale_tile`` in voxels instead; tiles as MONAI's ``dense_patch_slices``),
    one quantisation table per tile (``tile_tables``), blocks of 32^3 (the reference's
    experiments: README ``--block_size 32 32 32``), every axial slice of each tile min-max
    rescaled to [0, 1] in every step and in the output (gradients through the slice extrema),
    MONAI's DiceCE loss (softmax, squared denominators, smooth_nr 0, smooth_dr 1e-6, background
    included, CE mean) and the image clipped to its window (``clip_to_window``; with
    ``window_raw=(-175,250)`` in the attack configuration, the reference's fixed CT window).
    What stays ours: the gradient runs through nnU-Net's sliding-window prediction of the whole
    stitched volume (the reference predicts each tile alone), the early stop is per volume (the
    reference's: per batch of 6 tiles), a tile's blocks that do not divide it are padded
    (the reference asserts divisibility), a constant slice becomes 0 (the reference divides by
    zero). Label targets only (no regions). Options and other defaults: as :class:`VAFA3D`.
    """

    name = "vafa-3d-ref"
    summary = ("VAFA-3D as the authors' code runs it (144x144x192 mm tiles, a table per tile, block 32, "
               "per-slice rescale, DiceCE loss, window clip)")
    defaults = {**VAFA3D.defaults, **REF_OPTIONS, "block_size": (32, 32, 32)}
    supports_regions = False
    base_loss = _reference_loss


class VAFA2DRef(VAFA2D):
    """VAFA-2D as the authors' code runs it (``vafa-2d-ref``): :class:`VAFA2D` with the
    reference's tiles, tables per tile and per-slice rescale (a 2D image is one slice and one
    tile; a 3D volume's slices inside tiles of ``tile_mm``), MONAI's DiceCE loss and the clip to
    the window, as :class:`VAFA3DRef`. Block 8 x 8 (the reference's class default; its README
    suggests 32)."""

    name = "vafa-2d-ref"
    summary = "VAFA-2D as the authors' code runs it (per-slice rescale, DiceCE loss, window clip)"
    defaults = {**VAFA2D.defaults, **REF_OPTIONS}
    supports_regions = False
    base_loss = _reference_loss


class SliceRescale(Attack):
    """Control for the authors' VAFA (``slice-rescale``): the reference code's per-slice (per
    96^3 tile) min-max rescale applied to the clean image, no optimisation and no model call.
    A report then shows how much of the ``vafa-3d-ref`` / ``vafa-2d-ref`` effect is the rescale.

    Options: rescale_tile None, tile_mm (192, 144, 144), spacing None (the tile as
    :class:`VAFA3DRef`'s: voxels, else mm over the spacing); slice_axis 0; clip_to_window True;
    lower / upper (the window, as VAFA's). Shapes: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` -> same.
    """

    name = "slice-rescale"
    summary = "control: the authors' per-slice rescale of VAFA alone, no attack"
    control = True
    defaults = {**COMMON_DEFAULTS, "rescale_tile": None, "tile_mm": REF_TILE_MM, "spacing": None, "slice_axis": 0,
                "clip_to_window": True}
    tile = VAFA3D.tile

    def validate(self) -> None:
        o = self.options
        o["rescale_tile"] = check_tile(o["rescale_tile"])
        o["tile_mm"] = check_mm(o["tile_mm"], "tile_mm")
        o["spacing"] = check_mm(o["spacing"], "spacing", lengths=(2, 3))
        if not isinstance(o["clip_to_window"], bool):
            raise ValueError(f"clip_to_window must be True or False, got {o['clip_to_window']!r}")
        if isinstance(o["slice_axis"], bool) or not isinstance(o["slice_axis"], numbers.Integral):
            raise ValueError(f"slice_axis must be an integer, got {o['slice_axis']!r}")

    def perturb(self, ctx: AttackContext):
        lo, hi, x01 = unit_window(ctx, *self.window(ctx), clip=self.options["clip_to_window"])
        with torch.no_grad():
            rescaled = rescale_slices(x01, int(self.options["slice_axis"]), self.tile())
            return self.clamp_box(ctx, lo + rescaled * (hi - lo))
