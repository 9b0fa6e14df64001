"""The VAFA reference code's tiles (``generate_adv_samples.py`` of asif-hanif/vafa) on nnU-Net's grid.

The reference attacks each volume tile by tile: non-overlapping 96^3 voxel tiles of MONAI's grid
(MONAI's ``dense_patch_slices`` with ``scan_interval = roi``: the last tile of an axis moved back
to end at the border), every tile attacked on its own with its own quantisation tables, the
results stitched by overwriting in tile order (a later tile wins in the overlap of a moved-back
one). Its grid is 1.5 x 1.5 x 2.0 mm in MONAI's (x, y, z) axis order (``--space_x/y/z``, RAS
orientation, after a foreground crop: ``utils/data_utils.py``), so a tile covers
144 x 144 x 192 mm. nnU-Net's grid lists axes as (z, y, x) (its first spatial axis is the
out-of-plane one, the axis VAFA's ``slice_axis`` 0 indexes), so here the tile is
:data:`REF_TILE_MM` = (192, 144, 144) mm and the reference's spacing :data:`REF_SPACING` =
(2.0, 1.5, 1.5) mm, both in nnU-Net's axis order.

Shapes: images ``(B, C, *S)``; tiles stacked as ``(B, C, T, *t)`` (T tiles of extent ``t``;
every tile of a volume has the same extent ``min(tile, S)`` per axis).
"""
from __future__ import annotations

import itertools
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

#: The reference's voxel spacing in mm, nnU-Net's axis order (z, y, x): MONAI's (1.5, 1.5, 2.0) (x, y, z).
REF_SPACING = (2.0, 1.5, 1.5)
#: The reference's tile in mm, nnU-Net's axis order (z, y, x): 96 voxels of :data:`REF_SPACING`.
REF_TILE_MM = tuple(96 * s for s in REF_SPACING)

Box = Tuple[Tuple[int, int], ...]


def tile_starts(size: int, tile: int) -> List[int]:
    """Start indices of the reference code's tiles along one axis: MONAI's ``dense_patch_slices``
    with ``scan_interval = tile`` (non-overlapping, the last tile moved back to end at the border);
    an axis no longer than the tile is one tile."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tile_boxes(spatial: Sequence[int], tile: Sequence[int]) -> List[Box]:
    """Every tile's ``((start, stop), ...)`` per axis, in the reference's order (the last axis
    fastest, as ``dense_patch_slices``): later boxes overwrite earlier ones when stitching."""
    ranges = [[(a, min(a + t, n)) for a in tile_starts(n, t)] for n, t in zip(spatial, tile)]
    return list(itertools.product(*ranges))


def _index(box: Box):
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)


def gather_tiles(x: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, C, T, *t)``: the tiles of ``boxes`` (all of one extent ``t``)."""
    return torch.stack([x[_index(box)] for box in boxes], dim=2)


def stitch_tiles(tiles: torch.Tensor, boxes: Sequence[Box], spatial: Sequence[int]) -> torch.Tensor:
    """``(B, C, T, *t)`` -> ``(B, C, *S)``: the tiles written in order, a later one overwriting the
    overlap of an earlier one (the reference's stitching); differentiable (the overwritten part of
    an earlier tile gets no gradient)."""
    out = tiles.new_zeros(tiles.shape[:2] + tuple(spatial))
    for k, box in enumerate(boxes):
        out[_index(box)] = tiles[:, :, k]
    return out


def _numbers(value, name: str, integral: bool, lengths=(3,)) -> Optional[tuple]:
    """None, one number or ``lengths`` numbers (> 0; integers when ``integral``) -> a tuple or None
    (one number: repeated 3 times)."""
    if value is None:
        return None
    kind = numbers.Integral if integral else numbers.Real
    values = (value,) * 3 if isinstance(value, kind) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if len(values) not in lengths or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0
                                             for v in values):
        what = "integers >= 1" if integral else "numbers > 0"
        count = " or ".join(str(n) for n in lengths)
        raise ValueError(f"{name} must be None, one or {count} {what}, got {value!r}")
    return tuple(int(v) if integral else float(v) for v in values)


def check_tile(value, name: str = "rescale_tile") -> Optional[Tuple[int, int, int]]:
    """A voxel tile option: None, an integer or 3 integers >= 1 -> a 3-tuple or None."""
    return _numbers(value, name, integral=True)


def check_mm(value, name: str, lengths=(3,)) -> Optional[Tuple[float, ...]]:
    """A millimetre option: None, a number or ``lengths`` numbers > 0 (``tile_mm``: 3; ``spacing``:
    2 or 3, a 2D configuration's patches having 2)."""
    return _numbers(value, name, integral=False, lengths=lengths)


def reference_tile(rescale_tile, tile_mm, spacing) -> Optional[Tuple[int, int, int]]:
    """The reference's tile in voxels of a grid of ``spacing`` mm: ``rescale_tile`` when given, else
    ``tile_mm`` / ``spacing`` (:func:`tile_voxels`), else None (no tiles). The options as a user gives
    them (checked here: :class:`ValueError` for a bad one)."""
    rescale_tile, tile_mm = check_tile(rescale_tile), check_mm(tile_mm, "tile_mm")
    if rescale_tile is not None or tile_mm is None:
        return rescale_tile
    return tile_voxels(tile_mm, spacing)


def tile_voxels(tile_mm: Sequence[float], spacing: Optional[Sequence[float]]) -> Tuple[int, int, int]:
    """The tile in voxels of a grid of ``spacing`` mm: ``round(tile_mm / spacing)`` per axis, at
    least 1 (both in the image's axis order). ``spacing`` None: the reference's
    (:data:`REF_SPACING`), so :data:`REF_TILE_MM` is the reference's 96^3 voxels."""
    spacing = REF_SPACING if spacing is None else spacing
    if len(spacing) != len(tile_mm):
        raise ValueError(f"spacing {tuple(spacing)} must give one value per axis of tile_mm {tuple(tile_mm)} "
                         f"(a 3D volume needs a 3D spacing)")
    # floor(v + 0.5): half up, not Python's round-half-to-even, so 0.5-voxel cases do not alternate
    return tuple(max(1, int(float(m) / float(s) + 0.5)) for m, s in zip(tile_mm, spacing))
