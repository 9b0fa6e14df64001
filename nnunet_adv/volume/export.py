"""Perturbations from nnU-Net's network space back to the raw image geometry, and image writing.

nnU-Net's preprocessing of one case (``DefaultPreprocessor.run_case_npy``) is, per channel c::

    raw (C, *S)  --transpose_forward-->  --crop to the nonzero bbox-->  --normalise c-->
                 --resampling_fn_data (to the target spacing)-->  network input (C, *S_net)

An attack changes the network input by ``delta`` (network units). :func:`perturbation_to_raw`
maps ``delta`` back by undoing the steps in reverse order, for the *perturbation* only (the
clean raw image is never resampled):

1. normalisation scale: ``delta_c * scale_c`` where ``scale_c`` is what nnU-Net divided the
   channel by (:func:`raw_intensity_maps`: the raw image's std for ZScoreNormalization,
   recomputed exactly as nnU-Net does, nonzero mask included; the dataset std for
   CTNormalization; 1 for NoNormalization; max - min of the cropped image for
   RescaleTo01Normalization; 255 for RGBTo01Normalization). The offset (mean) cancels in a
   difference;
2. un-resample to ``properties['shape_after_cropping_and_before_resampling']`` with the
   configuration's own ``resampling_fn_data`` (target spacing -> original spacing; spline
   order 3, separate-z order 0 for anisotropic data, as nnU-Net's forward resampling);
3. where a z-scored channel uses ``use_mask_for_norm``: zero outside the nonzero mask (nnU-Net
   leaves those voxels at 0 and would re-derive the mask from the adversarial image);
4. un-crop into zeros of ``properties['shape_before_cropping']`` at
   ``properties['bbox_used_for_cropping']``;
5. un-transpose with ``plans_manager.transpose_backward``.

The exported image is then (:func:`apply_raw_budget`)::

    d      = delta_raw, projected onto the raw budget:
             L-inf: |d_c| <= eps_raw_c voxel-wise;
             L2:    ||d_c / scale_c||_2 over all channels, times sqrt(N_net / N_crop), <= eps_net
    adv    = raw + d
    adv_c  = clip(adv_c, min(raw_c, lower_c), max(raw_c, upper_c))      (voxel-wise)

``eps_raw_c = eps_net_c * scale_c`` is the budget the attack used, in raw units (with
``--eps_raw E`` exactly E). ``[lower_c, upper_c]`` is the threat model's projection box in raw
units: CT channels the dataset window ``[percentile_00_5, percentile_99_5]``; z-scored,
NoNormalization and RescaleTo01 channels the range ``[min, max]`` of the raw image inside
the crop (the region nnU-Net normalises); RGB ``[0, 255]``. The box always contains the clean
voxel (as in the attacks), so a raw voxel outside the CT window (air below p0.5, metal above
p99.5) may move towards the window but never further out, and the clip never moves a voxel
further from its clean value: ``|adv - raw| <= eps_raw`` holds after it.

Images are written with the input's geometry (:func:`write_image_like`) as float32.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import nibabel
import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

from nnunet_adv.errors import UserError
from nnunet_adv.threat_model import ThreatModel, to_network, to_raw

__all__ = ["ExportError", "WriteError", "capture_c_stderr", "RawIntensityMaps", "raw_intensity_maps",
           "perturbation_to_raw", "apply_raw_budget",
           "write_image_like", "supported_writer", "perturbation_norms", "transpose_forward", "spacings",
           "labels_to_network"]



class WriteError(UserError):
    """An output file could not be written as meant (a full or failing disk): the run stops, as
    every later case would fail alike; the file never gets its final name."""


class ExportError(UserError):
    """Something about a case or a dataset that the exporter cannot handle (one-line message)."""


@dataclass
class RawIntensityMaps:
    """How the raw intensities of one case relate to nnU-Net's network units, per channel.

    Attributes:
        schemes: normalisation scheme per channel (as in the plans).
        scales: (C,) raw units per network unit (what nnU-Net divided the channel by).
        lower, upper: (C,) the threat model's projection box in raw units.
        keep_mask: bool array on the cropped, transposed raw grid (nnU-Net's nonzero mask) where
            a z-scored channel uses ``use_mask_for_norm``; the perturbation is zero outside it.
            None: the whole crop may be perturbed.
        bbox: nnU-Net's bounding box of the crop (on the transposed grid).
        crop_voxels: number of voxels in the crop (one channel).
    """

    schemes: List[str]
    scales: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    keep_mask: Optional[np.ndarray]
    bbox: list
    crop_voxels: int


def transpose_forward(data: np.ndarray, plans_manager) -> np.ndarray:
    """(C, *S) reader layout -> nnU-Net's transposed layout (``plans['transpose_forward']``)."""
    return data.transpose([0, *[i + 1 for i in plans_manager.transpose_forward]])


def raw_intensity_maps(raw: np.ndarray, plans_manager, configuration_manager) -> RawIntensityMaps:
    """Per-channel scale and raw box of one case, recomputed from the raw image as nnU-Net does.

    Args:
        raw: (C, *S) the case as the dataset's reader returns it (``rw.read_images``).
    Returns:
        :class:`RawIntensityMaps`.

    The z-score std is computed with the same operations, in the same dtype and memory layout,
    as ``DefaultPreprocessor.run_case_npy`` + ``ZScoreNormalization.run`` (float32 copy,
    transpose, ``crop_to_nonzero``, mask ``seg >= 0`` when ``use_mask_for_norm``), so it is the
    value nnU-Net divided by.
    """
    threat_model = ThreatModel.from_managers(plans_manager, configuration_manager)
    schemes = list(configuration_manager.normalization_schemes)
    if len(schemes) != raw.shape[0]:
        raise ExportError(f"the image has {raw.shape[0]} channel(s) but the configuration normalises "
                          f"{len(schemes)}")
    use_mask = list(configuration_manager.use_mask_for_norm)
    data = transpose_forward(raw.astype(np.float32), plans_manager)
    cropped, seg, bbox = crop_to_nonzero(data, None)
    mask = seg[0] >= 0
    c_count = len(schemes)
    scales, lower, upper = (np.empty(c_count, dtype=np.float64) for _ in range(3))
    keep = None
    for c, scheme in enumerate(schemes):
        image = cropped[c]
        lo, hi = float(image.min()), float(image.max())
        std = None
        if scheme == "ZScoreNormalization":  # the std ZScoreNormalization divided by
            std = image[mask].std() if use_mask[c] else image.std()
            keep = mask if use_mask[c] else keep
        scales[c] = threat_model.raw_unit(c, image_std=std, image_range=hi - lo)
        lower[c], upper[c] = threat_model.raw_box(c, lo, hi)
    return RawIntensityMaps(schemes, scales, lower, upper, keep, bbox, int(np.prod(cropped.shape[1:])))


def spacings(properties: dict, plans_manager, configuration_manager):
    """(original spacing, target spacing) on the transposed grid, as run_case_npy computes them."""
    original = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target = list(configuration_manager.spacing)
    if len(target) < len(original):  # 2D configurations keep the out-of-plane spacing
        target = [original[0]] + target
    return original, target


def labels_to_network(seg: np.ndarray, properties: dict, plans_manager, configuration_manager,
                      net_shape) -> np.ndarray:
    """A raw segmentation ``(1, *S)`` (reader layout) on nnU-Net's network grid: transposed, cropped
    to the case's bbox and resampled with the configuration's ``resampling_fn_seg``, as
    ``run_case_npy`` does. Returns ``(*S_net)`` int64 class indices."""
    seg = transpose_forward(seg, plans_manager)
    seg = seg[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))]
    if tuple(seg.shape[1:]) != tuple(net_shape):
        original, target = spacings(properties, plans_manager, configuration_manager)
        seg = configuration_manager.resampling_fn_seg(seg, net_shape, original, target)
    return np.asarray(seg[0]).astype(np.int64)


def perturbation_to_raw(delta: np.ndarray, properties: dict, plans_manager, configuration_manager,
                        maps: RawIntensityMaps) -> np.ndarray:
    """Network-space perturbation of one case -> raw perturbation on the reader's grid.

    Args:
        delta: (C, *S_net) ``x_adv - x`` in network units (nnU-Net's preprocessed grid).
        properties: the case properties nnU-Net's preprocessing returned (bbox, shapes, spacing).
        maps: :func:`raw_intensity_maps` of the same case.
    Returns:
        (C, *S) float32 raw-unit perturbation, zero outside the crop, in the layout of
        ``rw.read_images`` (add it to the raw image).
    """
    delta = np.asarray(delta, dtype=np.float32)
    c_count = delta.shape[0]
    d = to_raw(delta, maps.scales.astype(np.float32).reshape(c_count, *([1] * (delta.ndim - 1))))
    shape_cropped = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    if tuple(d.shape[1:]) != shape_cropped:
        original, target = spacings(properties, plans_manager, configuration_manager)
        d = configuration_manager.resampling_fn_data(d, shape_cropped, target, original)
        d = np.asarray(d, dtype=np.float32)
    if maps.keep_mask is not None:
        d = d * maps.keep_mask[None]
    full = np.zeros((c_count, *[int(s) for s in properties["shape_before_cropping"]]), dtype=np.float32)
    slicer = bounding_box_to_slice(properties["bbox_used_for_cropping"])
    full[(slice(None), *slicer)] = d
    full = full.transpose([0, *[i + 1 for i in plans_manager.transpose_backward]])
    return np.ascontiguousarray(full)


def apply_raw_budget(raw: np.ndarray, delta_raw: np.ndarray, maps: RawIntensityMaps,
                     eps_raw: Optional[Sequence[float]] = None, norm: str = "linf",
                     eps_net_l2: Optional[float] = None, net_voxels: Optional[int] = None) -> np.ndarray:
    """The adversarial raw image: ``raw + delta_raw`` projected onto the raw budget and box.

    Args:
        raw: (C, *S) clean raw image (reader layout).
        delta_raw: (C, *S) from :func:`perturbation_to_raw`.
        eps_raw: (C,) L-inf radius in raw units per channel, or None (attacks without an Lp budget,
            e.g. VAFA: only the box applies).
        norm: ``'linf'`` or ``'l2'``; for L2 ``eps_net_l2`` (the network-unit radius over all channels
            and voxels) and ``net_voxels`` (voxels per channel of the network input) are needed.
    Returns:
        (C, *S) float32 adversarial image. See the module docstring for the exact rule.
    """
    c_count = raw.shape[0]
    shape = (c_count,) + (1,) * (raw.ndim - 1)
    raw64 = raw.astype(np.float64)
    d = delta_raw.astype(np.float64)
    if norm == "l2":
        if eps_net_l2 is not None:
            # the L2 norm in network units: per-voxel values in network units, and the voxel count
            # of the network grid (resampling keeps values, not sums)
            dn = to_network(d, maps.scales.reshape(shape))
            n = float(np.sqrt(np.sum(dn ** 2) * (net_voxels or maps.crop_voxels) / maps.crop_voxels))
            if n > eps_net_l2 > 0 or (eps_net_l2 == 0 and n > 0):
                d = d * (eps_net_l2 / n)
    elif norm == "linf":
        if eps_raw is not None:
            e = np.asarray(eps_raw, dtype=np.float64).reshape(shape)
            d = np.clip(d, -e, e)
    else:
        raise ExportError(f"norm must be 'linf' or 'l2', got {norm!r}")
    adv = raw64 + d
    lo = np.minimum(raw64, maps.lower.reshape(shape))
    hi = np.maximum(raw64, maps.upper.reshape(shape))
    adv = np.clip(adv, lo, hi)
    out = adv.astype(np.float32)
    if norm == "linf" and eps_raw is not None:
        # float32 rounding may overshoot eps by half an ulp: step such voxels one ulp towards the
        # clean value (which lies between, raw being float32), so |out - raw| <= eps holds exactly
        raw32 = raw.astype(np.float32)
        over = np.abs(out.astype(np.float64) - raw32.astype(np.float64)) > np.broadcast_to(e, out.shape)
        if over.any():
            out[over] = np.nextafter(out[over], raw32[over])
    return out


def perturbation_norms(raw: np.ndarray, adv: np.ndarray) -> dict:
    """Per-channel raw L-inf and L2 norm of ``adv - raw``."""
    d = adv.astype(np.float64) - raw.astype(np.float64)
    flat = d.reshape(d.shape[0], -1)
    return {"linf_raw": np.abs(flat).max(1).tolist(), "l2_raw": np.sqrt((flat ** 2).sum(1)).tolist()}


# ----------------------------------------------------------------------------------------------
# writing images with the input's geometry
# ----------------------------------------------------------------------------------------------
_WRITERS = ("SimpleITKIOWithReorient", "SimpleITKIO", "NibabelIOWithReorient", "NibabelIO")


def supported_writer(rw_class) -> str:
    """The writer used for images read by ``rw_class`` (an nnU-Net reader/writer class).

    nnU-Net's ``write_seg`` casts to uint8/uint16, so images are written here, mirroring each
    reader's axis conventions. Raises :class:`ExportError` for readers without an image writer.
    """
    for name in _WRITERS:
        if any(base.__name__ == name for base in rw_class.__mro__):
            return name
    raise ExportError(f"writing adversarial images for the reader/writer {rw_class.__name__} is not supported "
                      f"(supported: {', '.join(_WRITERS)}; dataset file endings .nii.gz/.nii/.nrrd/.mha/.gipl)")


def write_image_like(images: np.ndarray, input_files: Sequence[str], output_files: Sequence[str], rw_class,
                     properties: dict) -> None:
    """Write each channel of ``images`` as a float32 image with the geometry of its input file.

    Args:
        images: (C, *S) in the layout ``rw_class().read_images(input_files)`` returned.
        input_files: the C input files (geometry source, one per channel).
        output_files: the C files to write (same file ending as the inputs).
        rw_class: the dataset's nnU-Net reader/writer class.
        properties: the properties ``read_images`` returned.

    SimpleITK: spacing, origin and direction are copied from each input file's header
    (``ImageFileReader.ReadImageInformation``); with ``SimpleITKIOWithReorient`` the array is
    oriented back first. nibabel: the input's affine and header (data type set to float32,
    scaling removed); with ``NibabelIOWithReorient`` oriented back as nnU-Net's ``write_seg``.
    """
    writer = supported_writer(rw_class)
    if len(input_files) != images.shape[0] or len(output_files) != images.shape[0]:
        raise ExportError(f"{images.shape[0]} channels but {len(input_files)} input / {len(output_files)} output files")
    for c, (src, dst) in enumerate(zip(input_files, output_files)):
        arr = np.ascontiguousarray(images[c], dtype=np.float32)
        if writer.startswith("SimpleITK"):
            _write_sitk(arr, str(src), str(dst), properties, reorient=writer == "SimpleITKIOWithReorient")
        else:
            _write_nibabel(arr, str(src), str(dst), properties, reorient=writer == "NibabelIOWithReorient")


def _write_sitk(arr: np.ndarray, src: str, dst: str, properties: dict, reorient: bool) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(src)
    reader.ReadImageInformation()
    dim = reader.GetDimension()
    if dim == 2:
        arr = arr[0]  # nnU-Net reads 2D images as (1, Y, X)
    elif dim != 3:
        raise ExportError(f"{Path(src).name}: {dim}D images are not supported (one 2D or 3D image per channel file)")
    image = sitk.GetImageFromArray(arr)
    if reorient:
        stuff = properties["sitk_stuff"]
        image.SetSpacing(stuff["spacing"])
        image.SetOrigin(stuff["origin"])
        image.SetDirection(stuff["direction"])
        image = sitk.DICOMOrient(image, stuff["original_orientation"])
    if tuple(image.GetSize()) != tuple(reader.GetSize()):
        raise ExportError(f"{Path(src).name}: exported size {image.GetSize()} != input size {reader.GetSize()}")
    # the input's geometry, bit for bit
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    # ITK's NIfTI writer reports a short write (a full disk) on the C-level stderr and returns
    # normally: capture that text and make it an error (the caller also reads the file back)
    with capture_c_stderr() as messages:
        try:
            sitk.WriteImage(image, dst, True)
        except RuntimeError as e:
            raise WriteError(f"cannot write {dst}: {' '.join(str(e).split())[:300]}") from None
    text = " ".join("".join(messages).split())
    if text:
        raise WriteError(f"cannot write {dst}: {text[:300]} (is the disk full?)")


@contextlib.contextmanager
def capture_c_stderr():
    """Capture what C code writes to file descriptor 2 inside the block; yields a list that holds
    the captured text once the block has ended."""
    sys.stderr.flush()
    captured: List[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read())


def _write_nibabel(arr: np.ndarray, src: str, dst: str, properties: dict, reorient: bool) -> None:
    original = nibabel.load(src)
    data = arr.transpose((2, 1, 0))  # nnU-Net's nibabel readers transpose to SimpleITK's order
    if reorient:
        tmp = nibabel.Nifti1Image(data, affine=properties["nibabel_stuff"]["reoriented_affine"])
        from_canonical = ornt_transform(axcodes2ornt("RAS"),
                                        io_orientation(properties["nibabel_stuff"]["original_affine"]))
        data = np.asarray(tmp.as_reoriented(from_canonical).dataobj, dtype=np.float32)
    if data.shape != original.shape:
        raise ExportError(f"{Path(src).name}: exported shape {data.shape} != input shape {original.shape}")
    header = original.header.copy()
    header.set_data_dtype(np.float32)
    out = type(original)(np.ascontiguousarray(data, dtype=np.float32), original.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    nibabel.save(out, dst)


def tmp_folder(output_folder) -> Path:
    """Where images are written before being renamed into ``output_folder`` (same file system)."""
    return Path(output_folder) / ".nnunet_adv_partial"
