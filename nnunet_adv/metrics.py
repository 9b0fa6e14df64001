"""Segmentation and image-similarity metrics for robustness evaluation.

Segmentation overlap follows nnU-Net's conventions (per foreground class, NaN when a class is absent
from both maps so that the case does not count towards the mean). Everything here is numpy/scipy
based; torch tensors are accepted (converted with ``.detach().cpu().numpy()``). nnU-Net and
scikit-image are imported lazily, inside the functions that reuse them.

Label maps are integer arrays of any spatial shape (2D ``(X, Y)`` or 3D ``(Z, Y, X)``; the same axis
order must be used for ``spacing``). A *class* in ``classes`` is either an integer label or, like in
nnU-Net's region-based training, a tuple of labels whose union forms the region (e.g. ``(1, 2)``).

Summary of conventions (see each function for details):

* Dice / IoU: NaN if the class is absent from prediction and reference, 0 if present in only one.
* NSD: normalised surface Dice at a tolerance in mm (MONAI's implementation of DeepMind's method);
  NaN when both masks are empty, 0 when one is.
* HD95: millimetres (units of ``spacing``); 95th percentile of the *union* of both directed
  surface-distance sets (medpy's ``hd95``); ``mode="max"`` gives MONAI's
  ``compute_hausdorff_distance(percentile=95)`` (max of the two directed 95th percentiles).
  Both masks empty -> NaN; exactly one empty -> +inf (what MONAI returns in these cases).
* SSIM: scikit-image's ``structural_similarity``; uniform 7-voxel window with sample covariance by
  default, or Wang et al.'s Gaussian window (sigma 1.5, 11 taps, population covariance).
"""
import importlib.util
import os
import warnings
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from nnunetv2.evaluation.evaluate_predictions import compute_metrics
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
from skimage.metrics import structural_similarity

LabelOrRegion = Union[int, Tuple[int, ...]]


def _np(x) -> np.ndarray:
    """numpy view of an array-like or a (possibly CUDA, grad-requiring) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Boolean mask of a label (int) or a region (tuple of labels, union)."""
    if np.isscalar(label_or_region):
        return seg == label_or_region
    return np.isin(seg, np.asarray(label_or_region))


def _check_shapes(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")


# --------------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------------
def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice of each class between two label maps of the same shape.

    Args:
        pred, ref: integer label maps, same shape (any number of dimensions).
        classes: labels (ints) to evaluate; a tuple of labels is evaluated as a region (union).

    Returns:
        (len(classes),) float array in [0, 1]; NaN for a class absent from both maps (nnU-Net's
        rule: such a case does not count towards the mean); 0 for a class in only one map.
    """
    pred, ref = _np(pred), _np(ref)
    _check_shapes(pred, ref)
    out = np.empty(len(classes), dtype=np.float64)
    for i, c in enumerate(classes):
        p, r = _mask(pred, c), _mask(ref, c)
        denom = p.sum() + r.sum()
        out[i] = np.nan if denom == 0 else 2.0 * np.logical_and(p, r).sum() / denom
    return out


def iou_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[LabelOrRegion],
                  ignore_mask: np.ndarray = None) -> np.ndarray:
    """Intersection over union (Jaccard index) of each class or region.

    Args:
        pred, ref: integer label maps, same shape.
        classes: labels (ints) or regions (tuples of labels, evaluated as their union).
        ignore_mask: optional boolean array, same shape; True voxels are excluded from counting
            (nnU-Net's ignore label: pass ``ref == ignore_label``).

    Returns:
        (len(classes),) float array in [0, 1]: TP / (TP + FP + FN); NaN for a class absent from
        both maps (TP + FP + FN == 0, same rule as :func:`dice_per_class`), 0 for a class in only one.
    """
    pred, ref = _np(pred), _np(ref)
    _check_shapes(pred, ref)
    use = None if ignore_mask is None else ~_np(ignore_mask).astype(bool)
    out = np.empty(len(classes), dtype=np.float64)
    for i, c in enumerate(classes):
        p, r = _mask(pred, c), _mask(ref, c)
        if use is not None:
            p, r = p & use, r & use
        union = np.logical_or(p, r).sum()
        out[i] = np.nan if union == 0 else np.logical_and(p, r).sum() / union
    return out


def nnunet_metrics(reference_file: str, prediction_file: str,
                   labels_or_regions: Sequence[LabelOrRegion], ignore_label: int = None,
                   image_reader_writer=None) -> dict:
    """nnU-Net's own per-case metrics: a thin call to
    ``nnunetv2.evaluation.evaluate_predictions.compute_metrics``.

    Args:
        reference_file, prediction_file: segmentation files readable by ``image_reader_writer``.
        labels_or_regions: ints (labels) or tuples (regions), as in nnU-Net.
        ignore_label: voxels with this label in the reference are excluded.
        image_reader_writer: an nnU-Net ``BaseReaderWriter`` instance; default ``SimpleITKIO()``
            (nnU-Net's reader for .nii.gz/.nrrd/.mha).

    Returns:
        nnU-Net's dict, unchanged: ``{'reference_file', 'prediction_file', 'metrics': {label_or_region:
        {'Dice', 'IoU', 'TP', 'FP', 'FN', 'TN', 'n_pred', 'n_ref'}}}``; Dice/IoU are NaN when
        TP + FP + FN == 0.
    """
    if image_reader_writer is None:
        image_reader_writer = SimpleITKIO()
    return compute_metrics(reference_file, prediction_file, image_reader_writer,
                           list(labels_or_regions), ignore_label)


# --------------------------------------------------------------------------------------------------
# surface distance
# --------------------------------------------------------------------------------------------------
def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask minus its binary erosion (face connectivity, i.e. the cross-shaped
    structuring element; voxels on the array border count as surface)."""
    struct = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=struct, border_value=0)


def _directed_surface_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                                spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    dt = distance_transform_edt(~to_surface, sampling=spacing)
    return dt[from_surface]


def _spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing {tuple(sp)} does not match a {ndim}-D mask")
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(sp)}")
    return sp


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing=None, mode: str = "union",
         percentile: float = 95.0) -> float:
    """95th percentile symmetric Hausdorff distance between two binary masks, in millimetres.

    Surfaces are the masks minus their binary erosion (face connectivity). The directed distances
    are the Euclidean distances, with voxel size ``spacing``, from every surface voxel of one mask
    to the nearest surface voxel of the other (``scipy.ndimage.distance_transform_edt`` of the
    inverted surface, ``sampling=spacing``).

    Args:
        pred_mask, ref_mask: boolean (or 0/1) arrays of the same 2D or 3D shape.
        spacing: voxel size per axis in mm, same axis order as the arrays (e.g. ``(3, 1, 1)`` for
            3 mm slices along axis 0); a scalar for isotropic; None -> 1 (distances in voxels).
        mode: ``"union"`` (default, medpy's ``hd95``): percentile of the concatenation of both
            directed distance sets. ``"max"`` (MONAI ``compute_hausdorff_distance(percentile=95)``):
            maximum of the two directed percentiles. ``"max"`` >= ``"union"`` always.
        percentile: 95 for HD95; 100 gives the classic Hausdorff distance (both modes agree).

    Returns:
        float, mm. Both masks empty -> NaN (undefined; excluded from means like nnU-Net's NaN Dice).
        Exactly one mask empty -> +inf (the same values MONAI returns for these cases; medpy raises).
        Callers who need a finite number must substitute one explicitly (e.g. the image diagonal).
    """
    p = _np(pred_mask).astype(bool)
    r = _np(ref_mask).astype(bool)
    _check_shapes(p, r)
    if mode not in ("union", "max"):
        raise ValueError(f"mode must be 'union' or 'max', got {mode!r}")
    sp = _spacing(spacing, p.ndim)
    p_any, r_any = p.any(), r.any()
    if not p_any and not r_any:
        return float("nan")
    if not p_any or not r_any:
        return float("inf")
    sp_, sr = _surface(p), _surface(r)
    d_pr = _directed_surface_distances(sp_, sr, sp)
    d_rp = _directed_surface_distances(sr, sp_, sp)
    if mode == "union":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def hd95_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[LabelOrRegion], spacing=None,
                   mode: str = "union") -> np.ndarray:
    """:func:`hd95` of each class or region between two label maps.

    Args:
        pred, ref: integer label maps, same shape (2D or 3D).
        classes: labels (ints) or regions (tuples of labels).
        spacing: voxel size per axis in mm (same axis order as the arrays).
        mode: see :func:`hd95`.

    Returns:
        (len(classes),) float array in mm; NaN where a class is absent from both maps, +inf where
        it is present in only one.
    """
    pred, ref = _np(pred), _np(ref)
    _check_shapes(pred, ref)
    return np.array([hd95(_mask(pred, c), _mask(ref, c), spacing, mode=mode) for c in classes],
                    dtype=np.float64)


def normalized_surface_dice(pred_mask: np.ndarray, ref_mask: np.ndarray, tolerance: float, spacing=None) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at ``tolerance`` mm: the share of both masks'
    surfaces that lie within ``tolerance`` of the other mask's surface.

    Computed by MONAI's ``compute_surface_dice`` (the DeepMind ``surface-distance`` method nnU-Net's
    authors use: 3D surface elements with their areas, ``use_subvoxels=True``; in 2D boundary
    pixels), spacing-aware.

    Args:
        pred_mask, ref_mask: boolean arrays, same 2D or 3D shape.
        tolerance: mm (> 0); spacing: voxel size per axis in mm (None: 1).
    Returns:
        float in [0, 1]; both masks empty -> NaN (nnU-Net's rule); exactly one empty -> 0.
    """

    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 mm, got {tolerance}")
    p = _np(pred_mask).astype(bool)
    r = _np(ref_mask).astype(bool)
    _check_shapes(p, r)
    sp = _spacing(spacing, p.ndim)
    if not p.any() and not r.any():
        return float("nan")
    if not p.any() or not r.any():
        return 0.0

    def one_hot(mask):  # (1, 2, *S): background and the mask (MONAI's layout)
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notes and empty-class hints
        value = compute_surface_dice(one_hot(p), one_hot(r), class_thresholds=[float(tolerance)],
                                     spacing=tuple(float(v) for v in sp), use_subvoxels=p.ndim == 3)
    return float(value.flatten()[0])


def nsd_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[LabelOrRegion], tolerances,
                  spacing=None) -> np.ndarray:
    """:func:`normalized_surface_dice` of each class or region; ``tolerances`` one value for all
    classes or one per class (mm). Returns ``(len(classes),)`` (NaN where absent from both)."""
    pred, ref = _np(pred), _np(ref)
    _check_shapes(pred, ref)
    tol = np.broadcast_to(np.asarray(tolerances, dtype=np.float64), (len(classes),))
    return np.array([normalized_surface_dice(_mask(pred, c), _mask(ref, c), t, spacing) for c, t in zip(classes, tol)],
                    dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# attack effect
# --------------------------------------------------------------------------------------------------
def attack_success_rate(pred_clean: np.ndarray, pred_adv: np.ndarray, mask: np.ndarray = None) -> float:
    """Voxel attack success rate: fraction of voxels whose predicted label changed.

    Args:
        pred_clean, pred_adv: integer label maps (clean and adversarial prediction), same shape.
        mask: optional boolean array of the same shape restricting the voxels counted (e.g. the
            foreground of the reference, or voxels predicted correctly on the clean image).

    Returns:
        float in [0, 1]; NaN if ``mask`` selects no voxel.
    """
    a, b = _np(pred_clean), _np(pred_adv)
    _check_shapes(a, b)
    changed = a != b
    if mask is not None:
        m = _np(mask).astype(bool)
        _check_shapes(m, a)
        n = m.sum()
        return float("nan") if n == 0 else float(changed[m].sum() / n)
    return float(changed.mean()) if changed.size else float("nan")


def robust_fraction(case_dice, clean_mean_dice: float, factor: float = 0.5) -> float:
    """ROG protocol: fraction of cases whose (adversarial) Dice exceeds ``factor * clean_mean_dice``.

    Args:
        case_dice: (n_cases,) per-case Dice (typically the mean foreground Dice of each case under
            attack). NaN entries (cases where every class is absent from both maps) are dropped.
        clean_mean_dice: mean Dice of the model on clean images.
        factor: threshold as a fraction of the clean mean (0.5 in ROG).

    Returns:
        float in [0, 1] (strict ``>``); NaN if no non-NaN case is given.
    """
    d = np.asarray(_np(case_dice), dtype=np.float64).ravel()
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan")
    return float(np.mean(d > factor * float(clean_mean_dice)))


# --------------------------------------------------------------------------------------------------
# image similarity (adversarial vs clean image)
# --------------------------------------------------------------------------------------------------
def psnr(clean: np.ndarray, adv: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio of ``adv`` w.r.t. ``clean``, in dB.

    ``10 * log10(data_range**2 / MSE)`` over all elements (any shape, 2D/3D, with or without a
    channel axis).

    Args:
        clean, adv: images of the same shape.
        data_range: the intensity range (max - min) of the images, e.g. of the clean image or of the
            normalised intensity space; it must be given (no guessing from dtype).

    Returns:
        float dB; +inf for identical images.
    """
    x = _np(clean).astype(np.float64)
    y = _np(adv).astype(np.float64)
    _check_shapes(x, y)
    if data_range <= 0:
        raise ValueError("data_range must be positive")
    mse = np.mean((x - y) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(clean: np.ndarray, adv: np.ndarray, data_range: float, win_size: int = None,
         gaussian: bool = False, channel_axis: int = None) -> float:
    """Mean structural similarity between ``clean`` and ``adv`` (2D or 3D).

    Uses ``skimage.metrics.structural_similarity`` (n-dimensional: 3D volumes get a 3D window).
    Window:

    * ``gaussian=False`` (default): uniform window of ``win_size`` (default 7) voxels per axis with
      sample covariance (scikit-image's default).
    * ``gaussian=True``: Wang et al. (2004) settings: Gaussian window sigma = 1.5 voxels, truncated
      at 3.5 sigma (11 taps; ``win_size`` defaults to 11 and only sets the border crop), population
      covariance.

    K1 = 0.01, K2 = 0.03. The SSIM map is averaged after cropping ``(win_size - 1) // 2`` voxels at
    each border. Every spatial axis must be >= ``win_size``: pass ``win_size=3`` for thin volumes.

    Args:
        clean, adv: images of the same shape, e.g. (X, Y), (Z, Y, X), or with a channel axis.
        data_range: intensity range (max - min); required.
        win_size: odd window size; None -> 7 (uniform) / 11 (Gaussian).
        gaussian: window type, see above.
        channel_axis: axis holding channels (e.g. 0 for nnU-Net's (C, Z, Y, X)); SSIM is computed per
            channel and averaged. None: all axes are spatial.

    Returns:
        float in [-1, 1]; 1 for identical images.
    """
    x = _np(clean).astype(np.float64)
    y = _np(adv).astype(np.float64)
    _check_shapes(x, y)
    if data_range <= 0:
        raise ValueError("data_range must be positive")
    kw = dict(data_range=float(data_range), channel_axis=channel_axis)
    if gaussian:
        kw.update(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if win_size is not None:
        kw["win_size"] = int(win_size)
    ws = int(win_size) if win_size is not None else (11 if gaussian else 7)
    spatial = [s for i, s in enumerate(x.shape)
               if channel_axis is None or i != channel_axis % x.ndim]
    if min(spatial) < ws:
        raise ValueError(f"ssim window {ws} exceeds the image extent {tuple(spatial)}; "
                         f"pass a smaller odd win_size (e.g. 3)")
    return float(structural_similarity(x, y, **kw))


def lpips_available() -> bool:
    """True only if the ``lpips`` package is importable, ships its linear-layer weights, and the
    torchvision AlexNet backbone weights are already in the local torch hub cache (nothing is
    downloaded). Never raises."""
    try:
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            return False
        pkg_dir = list(spec.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(pkg_dir, "weights", "v0.1", "alex.pth")):
            return False
        ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        if not os.path.isdir(ckpt_dir):
            return False
        if not any(f.startswith("alexnet") and f.endswith(".pth") for f in os.listdir(ckpt_dir)):
            return False
        import lpips  # noqa: F401
        return True
    except (ImportError, OSError):  # not installed, unreadable hub folder, a broken install
        return False


_LPIPS_NET = None


def lpips_distance(clean: np.ndarray, adv: np.ndarray, data_range: float):
    """LPIPS (Zhang et al. 2018, AlexNet) of ``adv`` vs ``clean``, or None where it cannot be had.

    LPIPS is a 2D perceptual metric: a 2D image is compared as one picture, a 3D volume
    ``(Z, Y, X)`` slice by slice along the first axis and the slice distances averaged. Intensities
    are mapped to LPIPS's [-1, 1] with the clean image's minimum and ``data_range``; the grey
    slice is repeated into 3 channels.

    Returns:
        float >= 0 (0 for identical images), or None when :func:`lpips_available` is False or the
        network rejects the input (a RuntimeError, e.g. slices too small for AlexNet's pooling).
    Raises:
        ValueError: the two images differ in shape.
    """
    global _LPIPS_NET
    if not lpips_available() or data_range <= 0:
        return None
    import lpips
    x, y = np.squeeze(_np(clean)).astype(np.float32), np.squeeze(_np(adv)).astype(np.float32)
    _check_shapes(x, y)
    if x.ndim == 2:
        x, y = x[None], y[None]
    lo = float(x.min())

    def to_lpips(a):  # (N, Y, X) -> (N, 3, Y, X) in [-1, 1]
        t = torch.from_numpy(2.0 * (a - lo) / float(data_range) - 1.0)
        return t[:, None].expand(-1, 3, -1, -1).contiguous()

    if _LPIPS_NET is None:
        _LPIPS_NET = lpips.LPIPS(net="alex", verbose=False).eval()
    try:
        with torch.no_grad():
            d = _LPIPS_NET(to_lpips(x), to_lpips(y))
    except RuntimeError:  # the network rejects the input (too small for its pooling)
        return None
    return float(d.mean())


def input_gradient_stats(grad, mask=None, eps=None) -> dict:
    """What the gradient-masking check reads of an input gradient ``grad`` ``(B, C, *S)`` (torch):
    ``l1`` its L1 norm, ``zero_fraction`` the share of exactly-zero entries (a non-differentiable
    step such as a quantisation gives 1.0) and ``linear_gain`` ``sum_c eps_c ||g_c||_1``, the loss
    change a first-order step of the whole L-inf budget ``eps`` (C values, network units) promises
    (None without ``eps``). Only entries where ``mask`` ``(B, 1, *S)`` is > 0 count (voxels the
    attack may change)."""
    g = grad.detach().float()
    inside = torch.ones_like(g[:, :1], dtype=torch.bool) if mask is None else mask > 0
    inside = inside.expand_as(g)
    per_channel = torch.stack([g[:, c][inside[:, c]].abs().sum() for c in range(g.shape[1])])
    gain = None if eps is None else float((per_channel * torch.as_tensor(eps).reshape(-1).to(per_channel)).sum())
    return {"l1": float(per_channel.sum()), "zero_fraction": float((g[inside] == 0).float().mean()),
            "linear_gain": gain}
