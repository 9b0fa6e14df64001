"""The threat model in nnU-Net's network-input space.

Papers state attack budgets on images scaled to [0, 1] (``eps = 4/255``). nnU-Net feeds
its networks normalised intensities, so a budget must be converted per channel, using
the normalisation nnU-Net applied to that channel (``plans['configurations'][c]
['normalization_schemes']``):

==========================  ===========================================  ===========================
scheme                      intensity window in network units            projection box
==========================  ===========================================  ===========================
CTNormalization             (p99.5 - p0.5) / std   (dataset statistics)  [(p0.5-mean)/std, (p99.5-mean)/std]
ZScoreNormalization         max - min of the clean patch (per sample)    [min, max] of the clean patch
NoNormalization             max - min of the clean patch (per sample)    [min, max] of the clean patch
RescaleTo01Normalization    1                                            [0, 1]
RGBTo01Normalization        1                                            [0, 1]
==========================  ===========================================  ===========================

A budget is given either as a fraction of the window (``eps_frac``, the papers'
convention: ``4/255``) or in raw intensity units (``eps_raw``, e.g. HU), which become
``eps_raw / std`` for CT, ``eps_raw / image_std`` for z-scored channels (the raw image's
standard deviation must then be supplied: it is not recoverable from a patch),
``eps_raw`` for NoNormalization and ``eps_raw / 255`` for RGB.

Z-scored data are never clamped to [0, 1] (a published benchmark did that and its
attacks destroyed the images whatever eps was): their box is the clean patch's range.

This module needs no nnU-Net import: it reads plain plans dictionaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

# Schemes whose window comes from the clean patch itself (per sample, per channel).
_PATCH_RANGE_SCHEMES = {"ZScoreNormalization", "NoNormalization"}
_UNIT_RANGE_SCHEMES = {"RescaleTo01Normalization", "RGBTo01Normalization"}
_CT_SCHEMES = {"CTNormalization"}
KNOWN_SCHEMES = _PATCH_RANGE_SCHEMES | _UNIT_RANGE_SCHEMES | _CT_SCHEMES
_CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


class ThreatModelError(ValueError):
    """A budget or a dataset that the threat model cannot handle (one-line message)."""


@dataclass
class Budget:
    """A perturbation budget in network-input units, broadcastable to (B, C, *spatial).

    Attributes:
        eps: (B, C, 1, ..., 1) L-inf radius per sample and channel.
        lower: (B, C, 1, ..., 1) lower projection bound.
        upper: (B, C, 1, ..., 1) upper projection bound.
        window: (B, C, 1, ..., 1) the intensity window the fraction refers to.
    """

    eps: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    window: torch.Tensor

    def scaled(self, fraction_of_eps: float) -> torch.Tensor:
        """A step size such as ``alpha = 2.5 * eps / steps``, same shape as ``eps``."""
        return self.eps * fraction_of_eps


class ThreatModel:
    """Converts user budgets into network-input units for one nnU-Net configuration.

    Args:
        normalization_schemes: one scheme class name per input channel, as in the plans.
        intensity_properties: ``foreground_intensity_properties_per_channel`` of the plans
            (keys ``"0"``, ``"1"``, ...; required for CT channels).
    """

    def __init__(self, normalization_schemes: Sequence[str],
                 intensity_properties: Optional[Mapping[str, Mapping[str, float]]] = None):
        self.schemes = list(normalization_schemes)
        if not self.schemes:
            raise ThreatModelError("the configuration lists no normalization_schemes")
        intensity_properties = intensity_properties or {}
        self._ct_stats = {}
        for c, scheme in enumerate(self.schemes):
            if scheme not in KNOWN_SCHEMES:
                raise ThreatModelError(
                    f"channel {c}: normalization scheme {scheme!r} is not supported "
                    f"(supported: {', '.join(sorted(KNOWN_SCHEMES))})")
            if scheme in _CT_SCHEMES:
                props = intensity_properties.get(str(c), intensity_properties.get(c))
                missing = [k for k in _CT_KEYS if props is None or k not in props]
                if missing:
                    raise ThreatModelError(
                        f"channel {c} is CT-normalised but the plans lack its intensity statistics "
                        f"({', '.join(missing)}) in foreground_intensity_properties_per_channel; "
                        f"re-run nnUNetv2_plan_and_preprocess (or nnUNetv2_extract_fingerprint)")
                if float(props["std"]) <= 0:
                    raise ThreatModelError(f"channel {c}: CT intensity std must be > 0 (got {props['std']})")
                self._ct_stats[c] = {k: float(props[k]) for k in _CT_KEYS}

    @classmethod
    def from_plans(cls, plans: Mapping, configuration: str) -> "ThreatModel":
        """Build from an nnU-Net plans dict (``nnUNetPlans.json``) and a configuration name."""
        configs = plans.get("configurations", {})
        if configuration not in configs:
            raise ThreatModelError(f"configuration {configuration!r} not in plans "
                                   f"(available: {', '.join(configs)})")
        cfg = _resolve_configuration(configs, configuration)
        props = plans.get("foreground_intensity_properties_per_channel",
                          plans.get("foreground_intensity_properties_by_modality"))
        return cls(cfg.get("normalization_schemes", []), props)

    @classmethod
    def from_managers(cls, plans_manager, configuration_manager) -> "ThreatModel":
        """Build from nnU-Net's PlansManager / ConfigurationManager (as trainers and predictors hold them)."""
        props = plans_manager.plans.get("foreground_intensity_properties_per_channel",
                                        plans_manager.plans.get("foreground_intensity_properties_by_modality"))
        return cls(configuration_manager.normalization_schemes, props)

    @property
    def num_channels(self) -> int:
        return len(self.schemes)

    def budget(self, x: torch.Tensor, eps_frac: Optional[float | Sequence[float]] = None,
               eps_raw: Optional[float | Sequence[float]] = None,
               raw_std: Optional[torch.Tensor] = None) -> Budget:
        """Budget for a batch of clean network inputs.

        Args:
            x: (B, C, *spatial) clean, normalised network inputs.
            eps_frac: fraction of each channel's intensity window (``4/255``); a float or
                one value per channel. Exactly one of eps_frac / eps_raw must be given.
            eps_raw: budget in raw image units (HU for CT); a float or one per channel.
            raw_std: (B, C) standard deviation each z-scored raw image was divided by;
                required only for eps_raw on ZScoreNormalization channels.
        Returns:
            A :class:`Budget` with tensors of shape (B, C, 1, ..., 1) on x's device.
        """
        if (eps_frac is None) == (eps_raw is None):
            raise ThreatModelError("give exactly one of eps_frac (fraction of the intensity window) "
                                   "or eps_raw (raw intensity units)")
        if x.ndim < 3 or x.shape[1] != self.num_channels:
            raise ThreatModelError(f"expected input of shape (B, {self.num_channels}, *spatial), "
                                   f"got {tuple(x.shape)}")
        value = eps_frac if eps_frac is not None else eps_raw
        per_channel = _per_channel(value, self.num_channels, "eps_frac" if eps_frac is not None else "eps_raw")

        b = x.shape[0]
        bshape = (b, self.num_channels) + (1,) * (x.ndim - 2)
        xf = x.detach().float().reshape(b, self.num_channels, -1)
        patch_min, patch_max = xf.min(-1).values, xf.max(-1).values  # (B, C)
        lower, upper, window, eps = (torch.empty(b, self.num_channels, device=x.device) for _ in range(4))
        for c, scheme in enumerate(self.schemes):
            lo, hi = self._box(c, scheme, patch_min[:, c], patch_max[:, c])
            lower[:, c], upper[:, c] = lo, hi
            window[:, c] = hi - lo
            if eps_frac is not None:
                eps[:, c] = per_channel[c] * window[:, c]
            else:
                eps[:, c] = per_channel[c] / self._raw_unit(c, scheme, raw_std, b, x.device)
        return Budget(*(t.reshape(bshape) for t in (eps, lower, upper, window)))

    def _box(self, c, scheme, patch_min, patch_max):
        if scheme in _CT_SCHEMES:
            s = self._ct_stats[c]
            lo = (s["percentile_00_5"] - s["mean"]) / s["std"]
            hi = (s["percentile_99_5"] - s["mean"]) / s["std"]
            return torch.full_like(patch_min, lo), torch.full_like(patch_min, hi)
        if scheme in _UNIT_RANGE_SCHEMES:
            return torch.zeros_like(patch_min), torch.ones_like(patch_min)
        return patch_min, patch_max

    def _raw_unit(self, c, scheme, raw_std, b, device) -> torch.Tensor:
        """How many raw intensity units one network unit is, per sample: shape (B,)."""
        if scheme in _CT_SCHEMES:
            return torch.full((b,), self._ct_stats[c]["std"], device=device)
        if scheme == "RGBTo01Normalization":
            return torch.full((b,), 255.0, device=device)
        if scheme == "NoNormalization":
            return torch.ones(b, device=device)
        if scheme == "ZScoreNormalization":
            if raw_std is None:
                raise ThreatModelError(
                    f"channel {c} is z-score normalised per image: eps_raw needs the raw image's std "
                    f"(whole-volume attacks know it; patch-based training does not: use eps_frac)")
            return torch.as_tensor(raw_std, dtype=torch.float32, device=device).reshape(b, -1)[:, c]
        raise ThreatModelError(f"channel {c}: eps_raw is not defined for {scheme} "
                               f"(its raw range is per image); use eps_frac")


def _resolve_configuration(configs: Mapping, name: str) -> dict:
    """Follow nnU-Net's ``inherits_from`` chain (e.g. 3d_cascade_fullres -> 3d_fullres)."""
    cfg = dict(configs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ThreatModelError(f"configuration {name!r} inherits from unknown/cyclic {parent!r}")
        seen.add(parent)
        merged = dict(configs[parent])
        merged.update(cfg)
        cfg = merged
    return cfg


def _per_channel(value, num_channels: int, name: str) -> list:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * num_channels
    if len(values) != num_channels:
        raise ThreatModelError(f"{name} has {len(values)} values but the data has {num_channels} channels")
    for v in values:
        if not v >= 0:  # also rejects NaN
            raise ThreatModelError(f"{name} must be >= 0 (got {v})")
    return values
