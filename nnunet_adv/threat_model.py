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
convention: ``4/255``; the commands and attack strings write the numerator, ``eps=4``) or in
raw intensity units (``eps_raw``, e.g. HU). One network unit is this many raw units
(:meth:`ThreatModel.raw_unit`, used for budgets and by the exporter alike):

==========================  ===================================  ==============================
scheme                      raw units per network unit           raw box (whole-volume export)
==========================  ===================================  ==============================
CTNormalization             the dataset's foreground std         [p0.5, p99.5] of the dataset
ZScoreNormalization         the image's std (inside nnU-Net's    [min, max] of the image inside
                            mask where use_mask_for_norm)        nnU-Net's crop
NoNormalization             1                                    [min, max] of the crop
RescaleTo01Normalization    max - min of the image               [min, max] of the crop
RGBTo01Normalization        255                                  [0, 255]
==========================  ===================================  ==============================

The image's std (z-score) and range (RescaleTo01) are per image: a patch cannot recover them,
so ``eps_raw`` on such channels needs them supplied (whole-volume attacks know them).
Step sizes and noise levels are given the same way as eps (a fraction of the window) or as a
multiple of eps (``alpha_over_eps``, e.g. PGD-AT's ``2.5 / steps``): :meth:`ThreatModel.attack_budget`
converts all of them for one batch.

Z-scored data are never clamped to [0, 1] (a published benchmark did that and its
attacks destroyed the images whatever eps was): their box is the clean patch's range.

Cascades: a ``3d_cascade_fullres`` network reads the image channels followed by the previous stage's
one-hot segmentation (one channel per foreground label, nnU-Net's ``convert_labelmap_to_one_hot``).
Those channels are not part of the image and are never perturbed: ``previous_stage_channels`` counts
them, :attr:`ThreatModel.num_channels` counts the image channels only, every budget, window and box is
per image channel, and :meth:`ThreatModel.split` / :meth:`ThreatModel.join` separate and rejoin the two
parts of a network input (attacks see the image channels only, through
:class:`nnunet_adv.network.WithPreviousStage`). A budget asked for the whole network input gives the
previous stage's channels a zero radius and no box (:meth:`ThreatModel.budget`).

This module needs no nnU-Net import: it reads plain plans dictionaries.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import torch

from nnunet_adv.errors import UserError

# Schemes whose window comes from the clean patch itself (per sample, per channel).
_PATCH_RANGE_SCHEMES = {"ZScoreNormalization", "NoNormalization"}
_UNIT_RANGE_SCHEMES = {"RescaleTo01Normalization", "RGBTo01Normalization"}
_CT_SCHEMES = {"CTNormalization"}
KNOWN_SCHEMES = _PATCH_RANGE_SCHEMES | _UNIT_RANGE_SCHEMES | _CT_SCHEMES
_CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
# Schemes whose raw unit is a property of each image (its std, its range).
_PER_IMAGE_UNIT_SCHEMES = {"ZScoreNormalization", "RescaleTo01Normalization"}
_EPS = 1e-8  # nnU-Net's normalisers divide by max(std, 1e-8)


def from_x255(value):
    """A budget the user wrote in x/255 of the window (``eps=4``) as a fraction of the window
    (``4/255``); a list or tuple element-wise (one value per channel)."""
    if isinstance(value, (list, tuple)):
        return [from_x255(v) for v in value]
    return float(value) / 255.0


def to_x255(value):
    """A fraction of the window as the user writes it (``4/255`` -> ``4.0``, rounded to 10
    significant digits so that ``from_x255`` round-trips the user's number)."""
    if isinstance(value, (list, tuple)):
        return [to_x255(v) for v in value]
    return float(f"{float(value) * 255.0:.10g}")


def to_raw(value, raw_units):
    """Network units -> raw intensity units: ``value * raw_units`` (raw units per network unit,
    :meth:`ThreatModel.raw_unit`; arrays broadcast per channel)."""
    return value * raw_units


def to_network(value, raw_units):
    """Raw intensity units -> network units: the inverse of :func:`to_raw`."""
    return value / raw_units


class ThreatModelError(UserError):
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
        normalization_schemes: one scheme class name per image channel, as in the plans.
        intensity_properties: ``foreground_intensity_properties_per_channel`` of the plans
            (keys ``"0"``, ``"1"``, ...; required for CT channels).
        previous_stage_channels: channels after the image channels that carry a previous cascade
            stage's one-hot segmentation (0 unless the configuration has a ``previous_stage``); never
            perturbed. None: a cascade stage whose labels were not given; budgets of its image channels
            work, :meth:`split` does not.
    """

    def __init__(self, normalization_schemes: Sequence[str],
                 intensity_properties: Optional[Mapping[str, Mapping[str, float]]] = None,
                 previous_stage_channels: Optional[int] = 0):
        self.schemes = list(normalization_schemes)
        self.previous_stage_channels = previous_stage_channels
        if previous_stage_channels is not None and not int(previous_stage_channels) >= 0:
            raise ThreatModelError(f"previous_stage_channels must be >= 0, got {previous_stage_channels}")
        if not self.schemes:
            raise ThreatModelError("the configuration lists no normalization_schemes")
        intensity_properties = intensity_properties or {}
        self._ct_stats = {}
        self._patch_windows = False  # with_patch_windows(): every window is the patch's own range
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
    def from_plans(cls, plans: Mapping, configuration: str, dataset_json: Optional[Mapping] = None) -> "ThreatModel":
        """Build from an nnU-Net plans dict (``nnUNetPlans.json``) and a configuration name; a cascade
        stage (``previous_stage`` in the configuration) needs ``dataset_json`` (its labels) to :meth:`split`."""
        configs = plans.get("configurations", {})
        if configuration not in configs:
            raise ThreatModelError(f"configuration {configuration!r} not in plans "
                                   f"(available: {', '.join(configs)})")
        cfg = _resolve_configuration(configs, configuration)
        props = plans.get("foreground_intensity_properties_per_channel",
                          plans.get("foreground_intensity_properties_by_modality"))
        previous = 0
        if cfg.get("previous_stage"):
            previous = None if dataset_json is None else \
                len([v for k, v in dataset_json["labels"].items() if k != "ignore" and v != 0])
        return cls(cfg.get("normalization_schemes", []), props, previous_stage_channels=previous)

    @classmethod
    def from_managers(cls, plans_manager, configuration_manager, label_manager=None) -> "ThreatModel":
        """Build from nnU-Net's PlansManager / ConfigurationManager (as trainers and predictors hold them);
        a cascade stage (``previous_stage_name``) needs the ``label_manager`` to :meth:`split`: its input
        carries one channel per foreground label of the previous stage (nnU-Net's
        ``determine_num_input_channels``)."""
        props = plans_manager.plans.get("foreground_intensity_properties_per_channel",
                                        plans_manager.plans.get("foreground_intensity_properties_by_modality"))
        previous = 0
        if configuration_manager.previous_stage_name is not None:
            previous = None if label_manager is None else len(label_manager.foreground_labels)
        return cls(configuration_manager.normalization_schemes, props, previous_stage_channels=previous)

    def with_raw_window(self, lower: float, upper: float) -> "ThreatModel":
        """The same threat model with every CT channel's window ``[p0.5, p99.5]`` replaced by the raw
        window ``[lower, upper]`` (HU; e.g. the VAFA reference code's fixed ``[-175, 250]``), for
        budgets and boxes alike. Only CT channels have a fixed raw-to-network map."""
        if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
            raise ThreatModelError(f"window_raw must be two finite numbers, lower < upper, got ({lower}, {upper})")
        other = [f"{c} ({s})" for c, s in enumerate(self.schemes) if s not in _CT_SCHEMES]
        if other:
            raise ThreatModelError(f"window_raw needs CT-normalised channels (a fixed raw-to-network map); "
                                   f"channel(s) {', '.join(other)} are normalised per image")
        copy = ThreatModel.__new__(ThreatModel)
        copy.schemes = list(self.schemes)
        copy.previous_stage_channels = self.previous_stage_channels
        copy._ct_stats = {c: {**stats, "percentile_00_5": float(lower), "percentile_99_5": float(upper)}
                          for c, stats in self._ct_stats.items()}
        copy._patch_windows = self._patch_windows
        return copy

    def with_patch_windows(self) -> "ThreatModel":
        """The same threat model with every channel's window and box the clean patch's own
        ``[min, max]`` per sample, CT channels included: SEAT's convention (``b_eps = (b_max - b_min)
        * eps`` over each patch, TrustAI/SEAT ``libs/trainer.py``), where ours gives CT channels the
        dataset window. Raw units are unchanged."""
        patched = copy.copy(self)  # every other attribute (the previous stage's channels, ...) as it is
        patched._patch_windows = True
        return patched

    @property
    def num_channels(self) -> int:
        """Image channels: the channels an attack perturbs."""
        return len(self.schemes)

    @property
    def num_input_channels(self) -> int:
        """Channels of the network input: the image channels, then the previous stage's."""
        if self.previous_stage_channels is None:
            raise ThreatModelError("a cascade stage's threat model needs its labels (dataset.json / label manager) "
                                   "to tell the previous stage's channels from the image's")
        return self.num_channels + self.previous_stage_channels

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A network input (B, num_input_channels, *S) as (image channels (B, num_channels, *S), the
        previous stage's channels (B, previous_stage_channels, *S) or None when there are none)."""
        if x.shape[1] != self.num_input_channels:
            raise ThreatModelError(f"expected a network input of shape (B, {self.num_input_channels}, *spatial), "
                                   f"got {tuple(x.shape)}")
        if not self.previous_stage_channels:
            return x, None
        return x[:, :self.num_channels], x[:, self.num_channels:]

    @staticmethod
    def join(images: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`: (B, C_img, *S) and (B, C_prev, *S) or None -> the network input."""
        return images if previous is None else torch.cat([images, previous.to(images.dtype)], 1)

    def budget(self, x: torch.Tensor, eps_frac: Optional[float | Sequence[float]] = None,
               eps_raw: Optional[float | Sequence[float]] = None,
               raw_std: Optional[torch.Tensor] = None) -> Budget:
        """Budget for a batch of clean network inputs.

        Args:
            x: (B, C, *spatial) clean, normalised network inputs: the image channels (C =
                :attr:`num_channels`) or the whole input of a cascade stage (C = :attr:`num_input_channels`);
                then the previous stage's channels get eps 0, window 0 and an unbounded box, so that a
                projection onto the budget leaves them as they are.
            eps_frac: fraction of each channel's intensity window (``4/255``); a float or
                one value per channel. Exactly one of eps_frac / eps_raw must be given.
            eps_raw: budget in raw image units (HU for CT); a float or one per channel.
            raw_std: (B, C) raw units per network unit of each image (:meth:`raw_unit`: the std
                nnU-Net divided a z-scored image by, the range of a RescaleTo01 image); required
                only for eps_raw on those channels.
        Returns:
            A :class:`Budget` with tensors of shape (B, C, 1, ..., 1) on x's device.
        """
        if (eps_frac is None) == (eps_raw is None):
            raise ThreatModelError("give exactly one of eps_frac (fraction of the intensity window) "
                                   "or eps_raw (raw intensity units)")
        if x.ndim >= 3 and self.previous_stage_channels and x.shape[1] == self.num_input_channels:
            images = self.budget(x[:, :self.num_channels], eps_frac, eps_raw, raw_std)
            fixed = (x.shape[0], self.previous_stage_channels) + (1,) * (x.ndim - 2)
            pads = (torch.zeros(fixed, device=x.device), torch.full(fixed, -math.inf, device=x.device),
                    torch.full(fixed, math.inf, device=x.device), torch.zeros(fixed, device=x.device))
            return Budget(*(torch.cat([getattr(images, k), pad], 1)
                            for k, pad in zip(("eps", "lower", "upper", "window"), pads)))
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
        if self._patch_windows:
            return patch_min, patch_max
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
        if scheme in _PER_IMAGE_UNIT_SCHEMES:
            if raw_std is None:
                raise ThreatModelError(
                    f"channel {c} is normalised per image ({scheme}): eps_raw needs the raw image's "
                    f"{'std' if scheme == 'ZScoreNormalization' else 'range'} "
                    f"(whole-volume attacks know it; patch-based training does not: use eps_frac)")
            return torch.as_tensor(raw_std, dtype=torch.float32, device=device).reshape(b, -1)[:, c]
        return torch.full((b,), self.raw_unit(c), device=device)

    def raw_unit(self, c: int, image_std: Optional[float] = None, image_range: Optional[float] = None) -> float:
        """Raw intensity units per network unit of channel ``c`` (the module docstring's table).

        Args:
            image_std: the std nnU-Net divided this image by (ZScoreNormalization only).
            image_range: ``max - min`` of the image (RescaleTo01Normalization only).
        """
        scheme = self.schemes[c]
        if scheme in _CT_SCHEMES:
            return max(self._ct_stats[c]["std"], _EPS)
        if scheme == "RGBTo01Normalization":
            return 255.0
        if scheme == "NoNormalization":
            return 1.0
        value = image_std if scheme == "ZScoreNormalization" else image_range
        if value is None:
            raise ThreatModelError(f"channel {c}: {scheme} is per image; its raw scale needs the image")
        return max(float(value), _EPS)

    def raw_box(self, c: int, image_min: float, image_max: float) -> Tuple[float, float]:
        """Projection box of channel ``c`` in raw units for one image (the module docstring's table)."""
        scheme = self.schemes[c]
        if scheme in _CT_SCHEMES:
            return self._ct_stats[c]["percentile_00_5"], self._ct_stats[c]["percentile_99_5"]
        if scheme == "RGBTo01Normalization":
            return 0.0, 255.0
        return float(image_min), float(image_max)

    def attack_budget(self, x: torch.Tensor, eps_frac=None, eps_raw=None, raw_std=None,
                      alpha_frac: Optional[float] = None, alpha_over_eps: Optional[float] = None,
                      std_frac: Optional[float] = None, std_over_eps: Optional[float] = None) -> dict:
        """Every budget-derived attack option for the batch ``x`` (B, C, *spatial), in network units.

        eps from ``eps_frac`` or ``eps_raw`` (neither: a zero-radius budget, only the box is used,
        e.g. VAFA); the step ``alpha`` from ``alpha_frac`` (fraction of the window) or
        ``alpha_over_eps``; the noise ``std`` likewise. Returns a dict with ``eps``, ``lower``,
        ``upper``, ``window`` and, where asked for, ``alpha`` and ``std``: tensors (B, C, 1, ..., 1).
        """
        if eps_frac is None and eps_raw is None:
            eps_frac = 0.0
        budget = self.budget(x, eps_frac=eps_frac, eps_raw=eps_raw, raw_std=raw_std)
        out = {"eps": budget.eps, "lower": budget.lower, "upper": budget.upper, "window": budget.window}
        for key, frac, over_eps in (("alpha", alpha_frac, alpha_over_eps), ("std", std_frac, std_over_eps)):
            if frac is not None and over_eps is not None:
                raise ThreatModelError(f"give at most one of {key}_frac and {key}_over_eps")
            if frac is not None:
                out[key] = budget.window * float(frac)
            elif over_eps is not None:
                out[key] = budget.scaled(float(over_eps))
        return out


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
