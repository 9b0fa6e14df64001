"""Natural corruptions at five severities, with TorchIO (the artefacts MRI and CT users meet).

TorchIO (https://torchio.readthedocs.io) is the well-kept medical-imaging library for these
artefacts (k-space motion, ghosting and spikes, MRI bias fields, anisotropic resampling); it is an
optional dependency: ``pip install "nnunet_adv[corruptions]"``.

A corruption is applied to the raw image in its own geometry (the reader's array and spacing),
seeded per case, and written like an adversarial image. Intensity-dependent corruptions work on
each channel rescaled to [0, 1] by its own min/max and are mapped back, so a severity means the
same on MRI and on CT (HU); blur and low resolution work on the raw intensities (linear). Nothing
is clipped: artefacts may leave the clean range, as real ones do.

Severity table (1 = mild ... 5 = severe; ``range`` = the channel's max - min):

=============  ==================================  =========================================================
name           TorchIO transform                   severities 1..5
=============  ==================================  =========================================================
``noise``      RandomNoise(std)                    std 0.02, 0.04, 0.06, 0.08, 0.10 x range
``blur``       RandomBlur(std, mm)                 sigma 0.5, 1.0, 1.5, 2.0, 3.0 mm
``bias``       RandomBiasField(coefficients, 3)    coefficients U(-c, c), c 0.1, 0.2, 0.3, 0.4, 0.6
``motion``     RandomMotion(degrees, mm, 3)        3 movements of 1, 2, 4, 6, 8 degrees and mm
``ghosting``   RandomGhosting(num_ghosts, inten.)  (2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8), (10, 1.0)
``spike``      RandomSpike(num_spikes, intensity)  (1, 0.2), (1, 0.4), (2, 0.6), (2, 0.8), (3, 1.0)
``gamma``      RandomGamma(log_gamma)              gamma = e^b, b = +-0.1, 0.2, 0.3, 0.4, 0.5 (sign drawn)
``lowres``     RandomAnisotropy(downsampling)      one axis down by 1.5, 2, 3, 4, 6 and back (linear)
=============  ==================================  =========================================================
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence

import numpy as np
import torch

from nnunet_adv.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)

#: name -> (TorchIO transform name, intensity-rescaled?, parameters per severity 1..5)
_TABLE: Dict[str, tuple] = {
    "noise": ("RandomNoise", True, [{"mean": 0.0, "std": (s, s)} for s in (0.02, 0.04, 0.06, 0.08, 0.10)]),
    "blur": ("RandomBlur", False, [{"std": (s, s)} for s in (0.5, 1.0, 1.5, 2.0, 3.0)]),
    "bias": ("RandomBiasField", True, [{"coefficients": c, "order": 3} for c in (0.1, 0.2, 0.3, 0.4, 0.6)]),
    "motion": ("RandomMotion", True, [{"degrees": (d, d), "translation": (d, d), "num_transforms": 3}
                                      for d in (1, 2, 4, 6, 8)]),
    "ghosting": ("RandomGhosting", True, [{"num_ghosts": (n, n), "intensity": (i, i)}
                                          for n, i in ((2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8), (10, 1.0))]),
    "spike": ("RandomSpike", True, [{"num_spikes": (n, n), "intensity": (i, i)}
                                    for n, i in ((1, 0.2), (1, 0.4), (2, 0.6), (2, 0.8), (3, 1.0))]),
    "gamma": ("RandomGamma", True, [{"log_gamma": b} for b in (0.1, 0.2, 0.3, 0.4, 0.5)]),
    "lowres": ("RandomAnisotropy", False, [{"downsampling": (f, f)} for f in (1.5, 2.0, 3.0, 4.0, 6.0)]),
}
CORRUPTIONS: List[str] = list(_TABLE)


def torchio_available() -> bool:
    try:
        import torchio  # noqa: F401
    except ImportError:
        return False
    return True


def check_corruption(name: str, severity: int) -> None:
    """:class:`UserError` for an unknown name, a severity outside 1-5, or TorchIO missing."""
    if name not in _TABLE:
        raise UserError(f"unknown corruption {name!r}; valid corruptions: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(f"corruption severity must be one of 1-5, got {severity!r}")
    if not torchio_available():
        raise UserError("corruptions need TorchIO: pip install \"nnunet_adv[corruptions]\" (or: pip install torchio)")


def parse_corruptions(items: Sequence[str]) -> List[tuple]:
    """``["noise", "blur:3", "all"]`` -> ``[(name, severity), ...]``: a name alone (or ``all``) means
    severities 1-5, ``NAME:S`` one severity."""
    out = []
    for item in items:
        name, _, sev = item.strip().lower().partition(":")
        names = CORRUPTIONS if name == "all" else [name]
        try:
            severities = list(SEVERITIES) if not sev else [int(sev)]
        except ValueError:
            raise UserError(f"corruption {item!r}: the severity must be an integer 1-5 (NAME:S)") from None
        for n in names:
            for s in severities:
                check_corruption(n, s)
                out.append((n, s))
    return list(dict.fromkeys(out))


def case_seed(seed: int, case: str, name: str, severity: int) -> int:
    """A per-case, per-corruption seed (the same case always gets the same artefact)."""
    digest = hashlib.sha256(f"{seed}:{case}:{name}:{severity}".encode()).hexdigest()
    return int(digest[:8], 16)


def corrupt(raw: np.ndarray, spacing: Sequence[float], name: str, severity: int, seed: int) -> np.ndarray:
    """The corrupted image.

    Args:
        raw: ``(C, *S)`` float image as the dataset's reader returns it (S: 2 or 3 axes; nnU-Net reads
            2D images as ``(C, 1, Y, X)``).
        spacing: the reader's spacing, one value per axis of ``S`` (mm).
        name, severity: see the module docstring; seed: the TorchIO draw's seed.
    Returns:
        ``(C, *S)`` float32.
    """
    import torchio as tio

    check_corruption(name, severity)
    transform_name, rescale, table = _TABLE[name]
    params = dict(table[severity - 1])
    if name == "lowres":  # one axis of the volume; a 2D image (one slice) is downsampled in-plane
        params["axes"] = tuple(i for i, s in enumerate(raw.shape[1:]) if s > 1)[:1] or (0,)
    image = np.asarray(raw, dtype=np.float32)
    lo = image.reshape(image.shape[0], -1).min(1).reshape(-1, *([1] * (image.ndim - 1)))
    hi = image.reshape(image.shape[0], -1).max(1).reshape(-1, *([1] * (image.ndim - 1)))
    width = np.where(hi > lo, hi - lo, 1.0)
    work = (image - lo) / width if rescale else image
    spatial = work.shape[1:]
    tensor = torch.from_numpy(np.ascontiguousarray(work.reshape(work.shape[0], *spatial, *([1] * (3 - len(spatial))))))
    spacing3 = list(spacing)[:len(spatial)] + [1.0] * (3 - len(spatial))
    subject = tio.Subject(image=tio.ScalarImage(tensor=tensor, affine=np.diag(spacing3 + [1.0])))
    torch.manual_seed(int(seed))
    out = getattr(tio, transform_name)(**params)(subject)["image"].data.numpy().reshape(work.shape)
    if rescale:
        out = lo + out * width
    return out.astype(np.float32)
