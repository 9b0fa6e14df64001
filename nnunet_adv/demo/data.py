"""A small real-MRI demo dataset in nnU-Net v2 raw format, built offline.

Source: Debian's ``mricron-data`` package ships the Colin27 T1 MRI (``ch2.nii.gz``,
181 x 217 x 181 voxels, 1 mm isotropic, uint8 intensities 0..254) and the AAL atlas
(``aal.nii.gz``) on the same grid. From them this module cuts small crops around the
hippocampus + amygdala of either hemisphere, optionally mirrors them left-right and applies
mild seeded augmentations (intensity scale/shift/gamma; small rotation, scaling and smooth
elastic displacement, applied identically to image (linear) and labels (nearest)), so that
the cases are distinct but remain real anatomy.

Labels: 0 background, 1 hippocampus (AAL 37/38), 2 amygdala (AAL 41/42); or, with
``structures="caudate-putamen"`` (a second task of other anatomy), 1 caudate (AAL 71/72) and
2 putamen (AAL 73/74).

Where the package is missing (a machine without root, a system other than Debian), the same crops
are cut from the ICBM 2009a nonlinear symmetric T1 template that the ``nilearn`` wheel bundles
(``nilearn/datasets/data``: the T1 and its grey- and white-matter probability maps on one 1 mm grid,
read as files, nilearn itself is never imported), centred on the same MNI coordinates, with labels
1 grey matter and 2 white matter (probability >= 0.5, the larger of the two): real anatomy, installed
by pip. Only where neither is found, a synthetic dataset with the same layout is generated (smooth
blobs of two classes in a noisy, smoothly varying background).

Layout written (nnU-Net v2 raw format)::

    raw_root/DatasetNNN_Name/
        dataset.json                    channel_names {"0": "T1"}, labels, numTraining, ...
        demo_cases.json                 provenance of each case (not read by nnU-Net)
        imagesTr/case_XXXX_0000.nii.gz  float32, shape = crop size, 1 mm
        labelsTr/case_XXXX.nii.gz       uint8 in {0, 1, 2}
        imagesTs/, labelsTs/            the same for the held-out test cases

Test cases are numbered after the training cases so that every case identifier is unique.

Nothing here imports torch or nnU-Net at module level: building the dataset must stay fast
and usable before nnU-Net is configured.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy import ndimage
from tqdm import tqdm

from nnunet_adv.errors import UserError

# --------------------------------------------------------------------------- constants

#: Environment variable that overrides the folder holding ch2.nii.gz / aal.nii.gz.
TEMPLATE_DIR_ENV = "NNUNET_ADV_MRICRON_DIR"
#: Where Debian's ``mricron-data`` installs its templates.
DEFAULT_TEMPLATE_DIR = Path("/usr/share/mricron/templates")
T1_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
TEMPLATE_FILES = (T1_FILE, ATLAS_FILE)
INSTALL_HINT = "apt-get install -y mricron-data"

#: Environment variable that overrides the folder holding the ICBM 2009a files (default: nilearn's data).
ICBM_DIR_ENV = "NNUNET_ADV_ICBM152_DIR"
ICBM_T1, ICBM_GM, ICBM_WM = (f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm"))
ICBM_FILES = (ICBM_T1, ICBM_GM, ICBM_WM)
#: labels of a dataset cut from the ICBM template (tissue maps, no atlas of structures)
ICBM_LABELS = {"background": 0, "grey matter": 1, "white matter": 2}



@dataclass(frozen=True)
class Structures:
    """The two AAL structures a demo dataset segments: label 1 and label 2, left and right
    collapsed into one class each.

    Attributes:
        names: the two label names (dataset.json).
        aal: per structure, its (left, right) AAL atlas values.
    """

    names: Tuple[str, str]
    aal: Tuple[Tuple[int, int], Tuple[int, int]]
    #: world (MNI, mm) centre of the (left, right) structures: the bounding-box centres of their AAL labels
    #: in Colin27 (which is registered to MNI space); where the ICBM template's crops are centred
    mni_centres: Tuple[Tuple[float, float, float], Tuple[float, float, float]]

    @property
    def labels(self) -> Dict[str, int]:
        return {"background": 0, self.names[0]: 1, self.names[1]: 2}

    @property
    def aal_to_demo(self) -> Dict[int, int]:
        """AAL atlas value -> demo label."""
        return {value: label for label, pair in enumerate(self.aal, start=1) for value in pair}

    @property
    def aal_by_side(self) -> Dict[str, Tuple[int, int]]:
        """AAL values of both structures per hemisphere (they centre the crops)."""
        return {"left": (self.aal[0][0], self.aal[1][0]), "right": (self.aal[0][1], self.aal[1][1])}


#: the structures a demo dataset can segment: the default, and a second task of other anatomy (the
#: basal ganglia: larger, higher-contrast structures) for checking that a result generalises
STRUCTURES = {"hippocampus-amygdala": Structures(("hippocampus", "amygdala"), ((37, 38), (41, 42)),
                                                 ((-24.5, -17.0, -7.5), (26.0, -16.5, -8.5))),
              "caudate-putamen": Structures(("caudate", "putamen"), ((71, 72), (73, 74)),
                                            ((-18.5, 1.5, 7.0), (19.0, 2.5, 7.0)))}
DEFAULT_STRUCTURES = "hippocampus-amygdala"

#: the default structures' maps (AAL value -> demo label; AAL values per hemisphere; labels)
AAL_TO_DEMO = STRUCTURES[DEFAULT_STRUCTURES].aal_to_demo
AAL_BY_SIDE = STRUCTURES[DEFAULT_STRUCTURES].aal_by_side
LABELS = STRUCTURES[DEFAULT_STRUCTURES].labels
CHANNEL_NAMES = {"0": "T1"}  # not "CT": nnU-Net z-scores each image
FILE_ENDING = ".nii.gz"
MANIFEST_FILE = "demo_cases.json"

DEFAULT_DATASET_ID = 900
DEFAULT_NAME = "AdvDemoMRI"
DEFAULT_NUM_TRAIN = 20
DEFAULT_NUM_TEST = 4
DEFAULT_CROP_SIZE = 40
CROP_SIZE_RANGE = (16, 128)  # voxels; below 16 nnU-Net's U-Net has nothing to pool
SOURCES = ("auto", "mricron", "icbm152", "synthetic")
#: the sources that cut real anatomy from a template (:class:`Templates`), with the files they read
TEMPLATE_FILES_OF = {"mricron": TEMPLATE_FILES, "icbm152": ICBM_FILES}

# Augmentation ranges: mild on purpose, so that every case is still recognisable anatomy.
MAX_CENTRE_JITTER_VOX = 3
MAX_ROTATION_DEG = 6.0
SCALE_RANGE = (0.94, 1.06)
ELASTIC_MAX_MM = 2.0
ELASTIC_SMOOTHING_VOX = 6.0
INTENSITY_SCALE_RANGE = (0.9, 1.1)
INTENSITY_SHIFT_RANGE = (-0.04, 0.04)  # fraction of the T1's full range (255)
GAMMA_LOG_RANGE = 0.2  # gamma in [exp(-0.2), exp(0.2)] ~ [0.82, 1.22]
T1_FULL_RANGE = 255.0
MAX_DRAWS_PER_CASE = 20  # re-draw augmentations until both classes are in the crop

# Split codes mixed into the seed, so that a case's content depends only on
# (seed, split, index) and not on how many cases the other split has.
_SPLIT_CODE = {"train": 0, "test": 1}


# --------------------------------------------------------------------------- errors


class DemoDataError(UserError):
    """Base class of this module's errors; the message is always one line."""


class DatasetExistsError(DemoDataError, FileExistsError):
    """A dataset with the requested id already exists in the raw folder."""


class TemplatesMissingError(DemoDataError, FileNotFoundError):
    """``mricron-data`` (ch2.nii.gz / aal.nii.gz) is not installed where we looked."""


class DemoDataConfigError(DemoDataError, ValueError):
    """An argument is out of range or malformed."""


# --------------------------------------------------------------------------- templates


@dataclass
class Templates:
    """A T1 template and the demo label map on its grid (Colin27 with AAL, or the ICBM 2009a template with
    its tissue maps; the shapes below are Colin27's, the ICBM's are 197 x 233 x 189).

    Attributes:
        t1: float32 (181, 217, 181), raw T1 intensities 0..254.
        labels: uint8 (181, 217, 181), 0/1/2 (the structures' AAL values mapped to 1 and 2; the ICBM's:
            grey and white matter).
        affine: float64 (4, 4) voxel -> world (mm, RAS) of both volumes.
        centres: side -> float (3,) voxel centre the crops of that side start from (the bounding box
            of its structures in AAL; their MNI coordinates in the ICBM template).
    """

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    centres: Dict[str, np.ndarray]


def template_dir(override: Union[str, os.PathLike, None] = None) -> Path:
    """Folder searched for ch2.nii.gz / aal.nii.gz: argument, else $NNUNET_ADV_MRICRON_DIR,
    else Debian's default :data:`DEFAULT_TEMPLATE_DIR`."""
    if override is not None:
        return Path(override)
    env = os.environ.get(TEMPLATE_DIR_ENV)
    return Path(env) if env else DEFAULT_TEMPLATE_DIR


def missing_template_files(folder: Union[str, os.PathLike, None] = None) -> List[str]:
    """Names of the template files absent from ``template_dir(folder)`` (empty: all there)."""
    root = template_dir(folder)
    return [f for f in TEMPLATE_FILES if not (root / f).is_file()]


def mricron_available(folder: Union[str, os.PathLike, None] = None) -> bool:
    """True where both ch2.nii.gz and aal.nii.gz exist in ``template_dir(folder)``."""
    return not missing_template_files(folder)


def _missing_message(folder: Path, missing: Sequence[str]) -> str:
    return (f"mricron-data is missing ({', '.join(missing)} not found in {folder}); "
            f"install it with `{INSTALL_HINT}` or point ${TEMPLATE_DIR_ENV} at its templates")


def load_templates(folder: Union[str, os.PathLike, None] = None,
                   structures: str = DEFAULT_STRUCTURES) -> Templates:
    """Load Colin27 T1 + AAL from ``template_dir(folder)``, the AAL labels of ``structures``
    (a key of :data:`STRUCTURES`) mapped to 1 and 2.

    Raises:
        TemplatesMissingError: a template file is absent.
        DemoDataError: the two volumes are not on the same grid, or a structure is absent.
    """
    root = template_dir(folder)
    missing = missing_template_files(root)
    if missing:
        raise TemplatesMissingError(_missing_message(root, missing))
    t1_img = nib.load(str(root / T1_FILE))
    atlas_img = nib.load(str(root / ATLAS_FILE))
    if t1_img.shape != atlas_img.shape or not np.allclose(t1_img.affine, atlas_img.affine):
        raise DemoDataError(f"{T1_FILE} and {ATLAS_FILE} in {root} are not on the same grid")
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    atlas = np.asarray(atlas_img.dataobj).astype(np.int32)
    chosen = STRUCTURES[structures]
    # A lookup table maps every AAL value to 0/1/2 in one pass.
    lut = np.zeros(max(int(atlas.max()), max(chosen.aal_to_demo)) + 1, dtype=np.uint8)
    for aal_value, demo_label in chosen.aal_to_demo.items():
        lut[aal_value] = demo_label
    centres = {side: _bbox_centre(np.isin(atlas, values), f"AAL {values} in {ATLAS_FILE}")
               for side, values in chosen.aal_by_side.items()}
    return Templates(t1=t1, labels=lut[atlas], affine=t1_img.affine.astype(np.float64),
                     centres=centres)


def icbm152_dir(override: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """Folder searched for the ICBM 2009a files: argument, else $NNUNET_ADV_ICBM152_DIR, else the installed
    nilearn's ``datasets/data`` (found without importing nilearn); None where nilearn is not installed."""
    if override is not None:
        return Path(override)
    env = os.environ.get(ICBM_DIR_ENV)
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def icbm152_available(folder: Union[str, os.PathLike, None] = None) -> bool:
    """True where the ICBM 2009a T1 and its grey- and white-matter maps are found (:func:`icbm152_dir`)."""
    root = icbm152_dir(folder)
    return root is not None and all((root / f).is_file() for f in ICBM_FILES)


def load_icbm152(folder: Union[str, os.PathLike, None] = None,
                 structures: str = DEFAULT_STRUCTURES) -> Templates:
    """The ICBM 2009a T1 (197 x 233 x 189 voxels, 1 mm, uint8 0..255) with labels 1 grey matter and 2 white
    matter (probability >= 0.5 and at least the other's; everything else 0), the crops centred on the MNI
    coordinates of ``structures`` (:data:`STRUCTURES`).

    Raises:
        TemplatesMissingError: a file is absent.
        DemoDataError: the three volumes are not on one grid.
    """
    root = icbm152_dir(folder)
    if not icbm152_available(root):
        raise TemplatesMissingError(f"the ICBM 2009a template was not found in {root or 'nilearn (not installed)'}: "
                                    f"pip install nilearn, or point ${ICBM_DIR_ENV} at {', '.join(ICBM_FILES)}")
    t1_img, gm_img, wm_img = (nib.load(str(root / f)) for f in ICBM_FILES)
    if not all(img.shape == t1_img.shape and np.allclose(img.affine, t1_img.affine) for img in (gm_img, wm_img)):
        raise DemoDataError(f"the ICBM 2009a files in {root} are not on one grid")
    gm, wm = (np.asarray(img.dataobj, dtype=np.float32) for img in (gm_img, wm_img))
    half = 0.5 * (255.0 if np.issubdtype(gm_img.get_data_dtype(), np.integer) else 1.0)  # nilearn's: uint8
    labels = np.zeros(t1_img.shape, dtype=np.uint8)
    labels[(gm >= half) & (gm >= wm)] = 1
    labels[(wm >= half) & (wm > gm)] = 2
    to_voxel = np.linalg.inv(t1_img.affine)
    centres = {side: nib.affines.apply_affine(to_voxel, np.array(centre))
               for side, centre in zip(("left", "right"), STRUCTURES[structures].mni_centres)}
    return Templates(t1=np.asarray(t1_img.dataobj, dtype=np.float32), labels=labels,
                     affine=t1_img.affine.astype(np.float64), centres=centres)


def _bbox_centre(mask: np.ndarray, what: str) -> np.ndarray:
    """Voxel centre (float (3,)) of the bounding box of a boolean mask."""
    coords = np.nonzero(mask)
    if coords[0].size == 0:
        raise DemoDataError(f"{what} is empty: not the expected atlas")
    return np.array([(c.min() + c.max()) / 2.0 for c in coords])


# --------------------------------------------------------------------------- case recipes


@dataclass
class CaseParams:
    """Everything that defines one real-MRI case (JSON-serialisable, recorded in the manifest).

    Attributes:
        side: "left" or "right" hemisphere of the template the crop is centred on.
        flip: mirror the crop left-right (axis 0) after sampling.
        jitter: int (3,) voxel shift of the crop centre.
        rotation_deg: (3,) rotations about the crop centre (axes 0, 1, 2), degrees.
        scale: isotropic scaling about the crop centre (>1 zooms out).
        elastic_mm: maximum smooth elastic displacement, mm (= voxels at 1 mm).
        elastic_seed: seed of the elastic displacement field.
        intensity_scale, intensity_shift, gamma: ``255 * (scale * (x/255)**gamma + shift)``.
    """

    side: str
    flip: bool = False
    jitter: Tuple[int, int, int] = (0, 0, 0)
    rotation_deg: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    elastic_mm: float = 0.0
    elastic_seed: int = 0
    intensity_scale: float = 1.0
    intensity_shift: float = 0.0
    gamma: float = 1.0


def sample_case_params(rng: np.random.Generator, side: str) -> CaseParams:
    """Draw a mildly augmented recipe for ``side`` (ranges: module constants)."""
    return CaseParams(
        side=side,
        flip=bool(rng.random() < 0.5),
        jitter=tuple(int(v) for v in rng.integers(-MAX_CENTRE_JITTER_VOX,
                                                   MAX_CENTRE_JITTER_VOX + 1, size=3)),
        rotation_deg=tuple(float(v) for v in rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)),
        scale=float(rng.uniform(*SCALE_RANGE)),
        elastic_mm=float(rng.uniform(0.5, 1.0) * ELASTIC_MAX_MM),
        elastic_seed=int(rng.integers(0, 2**31 - 1)),
        intensity_scale=float(rng.uniform(*INTENSITY_SCALE_RANGE)),
        intensity_shift=float(rng.uniform(*INTENSITY_SHIFT_RANGE)),
        gamma=float(np.exp(rng.uniform(-GAMMA_LOG_RANGE, GAMMA_LOG_RANGE))),
    )


def _rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """(3, 3) rotation: about axis 0, then 1, then 2 (degrees)."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _elastic_field(shape: Tuple[int, int, int], max_mm: float, seed: int) -> np.ndarray:
    """Smooth random displacement, float (3, *shape) in voxels, max |component| = max_mm."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), ELASTIC_SMOOTHING_VOX,
                                              mode="reflect") for _ in range(3)])
    peak = np.abs(field).max()
    return field * (max_mm / peak) if peak > 0 else field


def crop_start(templates: Templates, params: CaseParams, size: Tuple[int, int, int]) -> np.ndarray:
    """Int (3,) first voxel of the nominal crop in the template's voxels, clamped inside the volume."""
    centre = templates.centres[params.side]
    start = np.round(centre - (np.array(size) - 1) / 2.0).astype(int) + np.array(params.jitter)
    return np.clip(start, 0, np.array(templates.t1.shape) - np.array(size))


def case_affine(template_affine: np.ndarray, start: np.ndarray, size: Sequence[int],
                flip: bool) -> np.ndarray:
    """Voxel -> world (mm) of a crop starting at voxel ``start`` of the template.

    Un-flipped: the template's own geometry, translated to the crop. Flipped: the crop is
    treated as the mirrored subject, so world x is negated (``Mx @ A @ T @ F``, where F maps
    voxel i to size-1-i along axis 0); the result keeps positive 1 mm axes.
    """
    translate = np.eye(4)
    translate[:3, 3] = start
    affine = template_affine @ translate
    if flip:
        flip_vox = np.eye(4)
        flip_vox[0, 0], flip_vox[0, 3] = -1.0, size[0] - 1
        mirror_world = np.diag([-1.0, 1.0, 1.0, 1.0])
        affine = mirror_world @ affine @ flip_vox
    return affine


def sampling_coordinates(start: np.ndarray, size: Tuple[int, int, int],
                         params: CaseParams) -> np.ndarray:
    """Template voxel coordinates sampled for each output voxel, float (3, *size).

    p(j) = start + c + s R (j - c) + d(j), c = crop centre: rotation and scaling happen about
    the crop centre so that the structures stay in view.
    """
    grid = np.indices(size, dtype=np.float64)
    centre = (np.array(size, dtype=np.float64) - 1) / 2.0
    rel = grid - centre[:, None, None, None]
    matrix = params.scale * _rotation_matrix(params.rotation_deg)
    coords = np.einsum("ij,j...->i...", matrix, rel) + (centre + start)[:, None, None, None]
    if params.elastic_mm > 0:
        coords += _elastic_field(size, params.elastic_mm, params.elastic_seed)
    return coords


def _adjust_intensity(image: np.ndarray, params: CaseParams) -> np.ndarray:
    """``255 * (scale * (x/255)**gamma + shift)``; identity for the default parameters."""
    if (params.intensity_scale, params.intensity_shift, params.gamma) == (1.0, 0.0, 1.0):
        return image  # keep the reference case bit-exact
    x = np.clip(image, 0.0, None) / T1_FULL_RANGE
    return (T1_FULL_RANGE * (params.intensity_scale * x ** params.gamma
                             + params.intensity_shift)).astype(np.float32)


def render_template_case(templates: Templates, params: CaseParams,
                        size: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One real-MRI case cut from a template (Colin27 or ICBM).

    Returns:
        image float32 ``size``, labels uint8 ``size`` in {0, 1, 2}, affine float64 (4, 4).
    """
    start = crop_start(templates, params, size)
    coords = sampling_coordinates(start, size, params)
    # Linear for the image, nearest for the labels: same coordinates, so they stay aligned.
    image = ndimage.map_coordinates(templates.t1, coords, order=1, mode="nearest")
    labels = ndimage.map_coordinates(templates.labels, coords, order=0, mode="nearest")
    image = _adjust_intensity(image.astype(np.float32), params)
    if params.flip:
        image, labels = image[::-1], labels[::-1]
    affine = case_affine(templates.affine, start, size, params.flip)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels, np.uint8), affine


# --------------------------------------------------------------------------- synthetic fallback


def render_synthetic_case(rng: np.random.Generator,
                          size: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic case: two touching smooth blobs (labels 1 and 2) in a noisy background.

    Intensities loosely mimic a T1 crop (background ~100, class 1 ~150, class 2 ~60, noise
    sigma ~8), with a smooth bias field and 1-voxel partial-volume blur.

    Returns:
        image float32 ``size``, labels uint8 ``size`` in {0, 1, 2}, affine float64 (4, 4)
        (1 mm, origin at the volume centre).
    """
    shape = np.array(size, dtype=np.float64)
    grid = np.indices(size, dtype=np.float64)

    def smooth_noise(sigma: float) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.standard_normal(size), sigma, mode="reflect")
        return field / (np.abs(field).max() + 1e-12)

    def blob(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        dist = np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
        return dist + 0.35 * smooth_noise(4.0) < 1.0  # wobbly, not a perfect ellipsoid

    centre1 = shape / 2 + rng.uniform(-0.1, 0.1, 3) * shape
    radii1 = rng.uniform(0.18, 0.26, 3) * shape
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    # Class 2 sits on the rim of class 1 (like the amygdala at the hippocampal head).
    centre2 = centre1 + direction * radii1 * rng.uniform(0.9, 1.2)
    radii2 = rng.uniform(0.11, 0.16, 3) * shape
    labels = np.zeros(size, dtype=np.uint8)
    labels[blob(centre1, radii1)] = 1
    labels[blob(centre2, radii2) & (labels == 0)] = 2

    means = np.array([100.0, 150.0, 60.0]) + rng.uniform(-10, 10, 3)
    image = means[labels] * (1.0 + 0.1 * smooth_noise(10.0))
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0.0, 8.0, size)
    affine = np.eye(4)
    affine[:3, 3] = -(shape - 1) / 2
    return image.astype(np.float32), labels, affine


# --------------------------------------------------------------------------- planning


@dataclass
class CaseRecord:
    """Where one case goes and how it was made (one entry of demo_cases.json)."""

    identifier: str
    split: str  # "train" or "test"
    source: str  # "mricron", "icbm152" or "synthetic"
    params: Optional[dict] = None  # CaseParams as dict for the template sources' cases
    crop_start: Optional[List[int]] = None  # template voxel of the nominal crop


def _case_rng(seed: int, split: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, attempt])


def _has_all_classes(labels: np.ndarray) -> bool:
    return set(np.unique(labels).tolist()) >= set(LABELS.values())


def _template_case(templates: Templates, split: str, index: int, seed: int,
                   size: Tuple[int, int, int]):
    """Render case ``index`` of ``split`` from a template (Colin27 or ICBM); returns (image, labels,
    affine, params).

    Training case 0 is the un-augmented left crop (the same for every seed): a fixed anchor
    that is exactly the template. Other cases alternate hemispheres and are augmented; a recipe is
    re-drawn (deterministically) until both foreground classes are in view.
    """
    side = ("left", "right")[index % 2]
    if split == "train" and index == 0:
        candidates = [CaseParams(side=side)]
    else:
        candidates = (sample_case_params(_case_rng(seed, split, index, a), side)
                      for a in range(MAX_DRAWS_PER_CASE))
    for params in candidates:
        image, labels, affine = render_template_case(templates, params, size)
        if _has_all_classes(labels):
            return image, labels, affine, params
    raise DemoDataError(f"could not fit both structures into a {size} crop; use a larger crop size")


def _synthetic_case(split: str, index: int, seed: int, size: Tuple[int, int, int]):
    """Render synthetic case ``index`` of ``split``; returns (image, labels, affine, None)."""
    for attempt in range(MAX_DRAWS_PER_CASE):
        image, labels, affine = render_synthetic_case(_case_rng(seed, split, index, attempt), size)
        if _has_all_classes(labels):
            return image, labels, affine, None
    raise DemoDataError(f"could not draw a synthetic case with both classes in a {size} volume")


def _case_plan(num_train: int, num_test: int) -> Iterator[Tuple[str, int, str]]:
    """(split, index within split, identifier); test identifiers follow the training ones."""
    for i in range(num_train):
        yield "train", i, f"case_{i:04d}"
    for i in range(num_test):
        yield "test", i, f"case_{num_train + i:04d}"


# --------------------------------------------------------------------------- validation


def _normalise_size(crop_size: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    sizes = (crop_size,) * 3 if isinstance(crop_size, (int, np.integer)) else tuple(crop_size)
    lo, hi = CROP_SIZE_RANGE
    if len(sizes) != 3 or not all(isinstance(s, (int, np.integer)) and lo <= s <= hi
                                  for s in sizes):
        raise DemoDataConfigError(f"crop size must be an int or 3 ints in [{lo}, {hi}], "
                                  f"got {crop_size!r}")
    return tuple(int(s) for s in sizes)


def _validate(raw_root: Path, dataset_id: int, name: str, num_train: int, num_test: int,
              source: str, seed: int = 0) -> None:
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise DemoDataConfigError(f"dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name or ""):
        raise DemoDataConfigError(f"dataset name must be letters, digits, '_' or '-', got {name!r}")
    if not isinstance(num_train, (int, np.integer)) or num_train < 1:
        raise DemoDataConfigError(f"number of training cases must be >= 1, got {num_train!r}")
    if not isinstance(num_test, (int, np.integer)) or num_test < 0:
        raise DemoDataConfigError(f"number of test cases must be >= 0, got {num_test!r}")
    if source not in SOURCES:
        raise DemoDataConfigError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:  # NumPy's seeds
        raise DemoDataConfigError(f"--seed must be an integer in 0..{2 ** 32 - 1}, got {seed!r}")
    if not raw_root.is_dir():
        raise DemoDataConfigError(f"raw folder {raw_root} is a file, not a folder" if raw_root.exists()
                                  else f"raw folder does not exist: {raw_root}")


def existing_datasets(raw_root: Union[str, os.PathLike], dataset_id: int) -> List[str]:
    """Entries of ``raw_root`` that nnU-Net would take for dataset ``dataset_id``.

    Same rule as nnU-Net's ``find_candidate_datasets``: the name starts with ``DatasetNNN``.
    """
    prefix = f"Dataset{dataset_id:03d}"
    return sorted(p.name for p in Path(raw_root).iterdir() if p.name.startswith(prefix))


def _refuse_existing(raw_root: Path, dataset_id: int) -> None:
    found = existing_datasets(raw_root, dataset_id)
    if found:
        raise DatasetExistsError(f"dataset id {dataset_id} already exists in {raw_root} "
                                 f"({', '.join(found)}); remove it or choose another id")


def resolve_source(source: str, folder: Union[str, os.PathLike, None] = None) -> str:
    """The source a request uses: "auto" takes mricron-data, else the ICBM template nilearn installs, else
    synthetic volumes, saying so on stderr when it falls back.

    Raises:
        TemplatesMissingError: ``source == "mricron"`` and the templates are missing.
    """
    if source in ("synthetic", "icbm152"):
        return source
    root = template_dir(folder)
    missing = missing_template_files(root)
    if not missing:
        return "mricron"
    if source == "mricron":
        raise TemplatesMissingError(_missing_message(root, missing))
    if icbm152_available():
        print(f"nnunet_adv: {_missing_message(root, missing)}; using the ICBM 2009a T1 template that nilearn "
              f"installs (real MRI; labels grey and white matter)", file=sys.stderr, flush=True)
        return "icbm152"
    print(f"nnunet_adv: {_missing_message(root, missing)}, and nilearn's ICBM 2009a template was not found "
          f"(pip install nilearn); using a synthetic 3D dataset instead", file=sys.stderr, flush=True)
    return "synthetic"


# --------------------------------------------------------------------------- writing


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    # Both qform and sform: SimpleITK (nnU-Net's default reader) prefers the qform.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _write_case(folder: Path, split: str, identifier: str, image: np.ndarray,
                labels: np.ndarray, affine: np.ndarray) -> None:
    suffix = "Tr" if split == "train" else "Ts"
    _save_nifti(image, affine, folder / f"images{suffix}" / f"{identifier}_0000{FILE_ENDING}")
    _save_nifti(labels, affine, folder / f"labels{suffix}" / f"{identifier}{FILE_ENDING}")


def _write_dataset_json(folder: Path, name: str, num_train: int, num_test: int,
                        source: str, seed: int, structures: str = DEFAULT_STRUCTURES) -> None:
    chosen = STRUCTURES[structures]
    labels = chosen.labels
    if source == "mricron":
        description = (f"Crops around {chosen.names[0]} (1) and {chosen.names[1]} (2) of the Colin27 T1 MRI "
                       "with AAL labels (Debian mricron-data), flipped and mildly augmented.")
        reference = "Holmes et al. 1998 (Colin27); Tzourio-Mazoyer et al. 2002 (AAL)"
    elif source == "icbm152":
        labels = ICBM_LABELS
        description = (f"Crops of the ICBM 2009a nonlinear symmetric T1 template around the "
                       f"{' and '.join(chosen.names)} (MNI), grey matter (1) and white matter (2) from its tissue "
                       "probability maps (as nilearn installs them), flipped and mildly augmented.")
        reference = "Fonov et al. 2011 and 2009 (ICBM 2009a nonlinear symmetric)"
    else:
        description = "Synthetic 3D blobs (classes 1 and 2) in noisy background."
        reference = "nnunet_adv.demo.data (synthetic)"
    generate_dataset_json(
        str(folder), channel_names=CHANNEL_NAMES, labels=labels, num_training_cases=num_train,
        file_ending=FILE_ENDING, dataset_name=name, description=description,
        reference=reference, license="see the licenses of mricron-data (Colin27, AAL) or of the ICBM 2009a template",
        converted_by="nnunet_adv.demo.data", numTest=num_test,
        nnunet_adv_source=source, nnunet_adv_seed=seed)


def build_demo_dataset(raw_root: Union[str, os.PathLike], dataset_id: int = DEFAULT_DATASET_ID,
                       name: str = DEFAULT_NAME, num_train: int = DEFAULT_NUM_TRAIN,
                       num_test: int = DEFAULT_NUM_TEST,
                       crop_size: Union[int, Sequence[int]] = DEFAULT_CROP_SIZE, seed: int = 0,
                       source: str = "auto",
                       template_folder: Union[str, os.PathLike, None] = None,
                       progress: bool = False, structures: str = DEFAULT_STRUCTURES) -> Path:
    """Write ``raw_root/Dataset{dataset_id:03d}_{name}`` in nnU-Net v2 raw format.

    Args:
        raw_root: existing folder (usually $nnUNet_raw).
        dataset_id: 1..999.
        name: dataset name (letters, digits, '_', '-').
        num_train: training cases (>= 1; nnU-Net's default 5-fold split needs >= 5).
        num_test: held-out test cases (>= 0), written to imagesTs/labelsTs.
        crop_size: voxels (1 mm) per axis, int or 3 ints in [16, 128]; 40 -> 40^3 volumes.
        seed: the same seed writes bit-identical arrays; training case 0 of a real-MRI
            dataset is the un-augmented crop and does not depend on the seed.
        source: "mricron" (real MRI, error if missing), "icbm152" (the ICBM template nilearn installs,
            labels grey and white matter; error if missing), "synthetic", or "auto" (mricron where the
            templates exist, else icbm152, else synthetic, with a one-line message on stderr).
        template_folder: folder with ch2.nii.gz / aal.nii.gz (default: $NNUNET_ADV_MRICRON_DIR,
            else /usr/share/mricron/templates).
        progress: show a tqdm bar while writing cases.
        structures: which AAL structures are labels 1 and 2 (:data:`STRUCTURES`): the default
            hippocampus and amygdala, or caudate and putamen (a second task of other anatomy).

    Returns:
        The dataset folder.

    Raises:
        DemoDataConfigError: bad argument or missing raw folder.
        DatasetExistsError: any ``DatasetNNN*`` entry for this id exists in ``raw_root``.
        TemplatesMissingError: ``source="mricron"`` / ``"icbm152"`` and its files are missing.

    The dataset is written into a hidden ``.DatasetNNN_Name.partial-*`` folder next to the
    final one and renamed at the end: an interrupted run never leaves a half-written dataset
    under the final name (a killed process may leave the hidden folder behind).
    """
    raw_root = Path(raw_root)
    _validate(raw_root, dataset_id, name, num_train, num_test, source, seed)
    if structures not in STRUCTURES:
        raise DemoDataConfigError(f"structures must be one of {', '.join(STRUCTURES)}, got {structures!r}")
    size = _normalise_size(crop_size)
    final = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    _refuse_existing(raw_root, int(dataset_id))
    used_source = resolve_source(source, template_folder)
    templates = None
    if used_source == "mricron":
        templates = load_templates(template_folder, structures)
    elif used_source == "icbm152":
        templates = load_icbm152(structures=structures)

    # os.mkdir (not mkdtemp) so the folder gets the usual umask permissions, not 0700.
    partial = raw_root / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(partial)
    try:
        _write_all(partial, templates, used_source, name, num_train, num_test, size,
                   int(seed), progress, structures)
        _refuse_existing(raw_root, int(dataset_id))  # someone may have created it meanwhile
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _write_all(folder: Path, templates: Optional[Templates], source: str, name: str,
               num_train: int, num_test: int, size: Tuple[int, int, int], seed: int,
               progress: bool, structures: str = DEFAULT_STRUCTURES) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    records = []
    plan = list(_case_plan(num_train, num_test))
    for split, index, identifier in tqdm(plan, desc="writing demo cases", unit="case",
                                         disable=not progress, file=sys.stderr):
        if source in TEMPLATE_FILES_OF:
            image, labels, affine, params = _template_case(templates, split, index, seed, size)
            start = crop_start(templates, params, size)
            record = CaseRecord(identifier, split, source, asdict(params),
                                [int(v) for v in start])
        else:
            image, labels, affine, _ = _synthetic_case(split, index, seed, size)
            record = CaseRecord(identifier, split, source)
        _write_case(folder, split, identifier, image, labels, affine)
        records.append(asdict(record))
    _write_dataset_json(folder, name, num_train, num_test, source, seed, structures)
    manifest = {"source": source, "seed": seed, "crop_size": list(size), "structures": structures,
                "template_files": list(TEMPLATE_FILES_OF[source]) if source in TEMPLATE_FILES_OF else None,
                "cases": records}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
