"""An attack and its budget in user units: the one configuration type of every caller.

Trainer recipes (class attributes), the commands' flags (``--attack_name pgd --eps 4``) and the
attack strings of ``nnUNetv2_adv_evaluate`` (``"pgd:eps=4,steps=20"``) all become an
:class:`AttackConfig`; :meth:`AttackConfig.build` turns it into an attack of
:mod:`nnunet_adv.attacks` for one batch, with every budget converted to network units by the
threat model (:meth:`nnunet_adv.threat_model.ThreatModel.attack_budget`, the one place for unit
rules).

Units (users): ``eps_frac`` / ``alpha_frac`` / ``std_frac`` are fractions of each channel's
intensity window (the papers' ``4/255``); strings and flags write the numerator over 255
(``eps=4``, ``--alpha 2.55``). ``eps_raw`` is in raw intensity units (HU). Step size and noise
may instead be multiples of eps (``alpha_over_eps``, ``std_over_eps``: PGD-AT's ``2.5/steps``).
A budget the user leaves out is the attack's published default read in the same units (eps
4/255, PGD/BIM alpha 0.01 of the window, GN std 4/255).

Attack strings: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``. ``NAME`` is an attack of
:func:`attack_names`; every ``KEY`` is one of its options (``eps``, ``alpha``, ``std`` in x/255 of
the window, ``eps_raw`` in raw units, ``seed``, and the library's options). A key given alone is
true (``use_ssim_loss``); booleans also read ``true/false``, ``1/0``, ``yes/no``; ``block_size=32``
is 32 on every blocked axis, ``block_size=16x32x32`` per axis; brackets keep commas inside a value
(``temperature=(0.1,1e-20)``).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_adv.attack_strings import (
    Items,
    number,
    option_value,
    parse_bool,
    refuse_duplicate_keys,
    split_attack_string,
    split_members,
    split_top_level,
)
from nnunet_adv.attacks import attack_class, attack_defaults, available_attacks, build_attack, canonical_name
from nnunet_adv.errors import UserError
from nnunet_adv.threat_model import ThreatModel, from_x255, to_x255

__all__ = ["AttackConfig", "attack_names", "parse_bool", "WINDOW_UNITS", "RAW_UNITS"]

#: options written in x/255 of the intensity window by strings and flags
WINDOW_UNIT_KEYS = ("eps", "alpha", "std")
#: options computed per batch (never given by a user); ``spacing``: the case's voxel spacing (mm)
COMPUTED_KEYS = ("lower", "upper", "loss", "amp_loss_scale", "spacing")
WINDOW_UNITS = "x/255 of each channel's intensity window (the papers' and reference code's units)"
RAW_UNITS = "raw image intensity units (e.g. HU)"

def attack_names() -> List[str]:
    """Every attack a configuration can name (``ensemble`` with ``members``)."""
    return available_attacks()


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class AttackConfig:
    """An attack in user units.

    Attributes:
        name: attack name (:func:`attack_names`; case and ``_`` / ``-`` normalised).
        options: every other option of the attack (steps, q_max, block_size, random_start, ...),
            passed unchanged; never eps/alpha/std (use the fields) nor the per-batch options.
        eps_frac: L-inf/L2 radius as a fraction of each channel's window (a float or one per
            channel), or None.
        eps_raw: radius in raw intensity units, or None. At most one of eps_frac / eps_raw;
            neither: the attack's default (4/255) for attacks with an eps.
        alpha_frac / alpha_over_eps: step size as a fraction of the window / a multiple of eps.
        std_frac / std_over_eps: Gaussian-noise std likewise (``gn``).
        seed: the attack's private generator seed (None: drawn from torch's global RNG).
        window_raw: ``(lower, upper)`` in raw units (HU) replacing the threat model's CT window
            for this attack (budget fraction and box alike), e.g. the VAFA reference code's
            fixed ``(-175, 250)``; CT-normalised channels only. None: the threat model's window.
        members: ``ensemble`` only: the member configurations (each budgeted like this one
            where it leaves its own budget out).
        text: the attack string the user wrote, if any (the report's label).
    """

    name: str
    options: dict = field(default_factory=dict)
    eps_frac: Optional[object] = None
    eps_raw: Optional[object] = None
    alpha_frac: Optional[float] = None
    alpha_over_eps: Optional[float] = None
    std_frac: Optional[float] = None
    std_over_eps: Optional[float] = None
    seed: Optional[int] = None
    window_raw: Optional[Tuple[float, float]] = None
    members: Tuple["AttackConfig", ...] = ()
    text: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or canonical_name(self.name) not in available_attacks():
            raise UserError(f"unknown attack {self.name!r}; valid attacks: {', '.join(attack_names())}")
        self.name = canonical_name(self.name)
        self.options = dict(self.options)
        if self.name == "ensemble":
            self._ensemble_members()
        defaults = self.defaults
        bad = sorted(k for k in self.options if k not in defaults or k in WINDOW_UNIT_KEYS + COMPUTED_KEYS)
        relative = any(getattr(self, f"{k}_over_eps") is not None for k in ("alpha", "std"))
        for key in ("eps_frac", "eps_raw", "alpha_frac", "alpha_over_eps", "std_frac", "std_over_eps"):
            quantity = key.split("_")[0]
            usable = quantity in defaults or (quantity == "eps" and relative)  # eps: the unit of alpha/std
            if getattr(self, key) is not None and not usable and self.name != "ensemble":
                bad.append(key)
        if bad:
            raise UserError(f"option(s) {', '.join(bad)} not accepted by attack '{self.name}'; "
                            f"valid options: {', '.join(self.user_option_names())}")
        for a, b in (("eps_frac", "eps_raw"), ("alpha_frac", "alpha_over_eps"), ("std_frac", "std_over_eps")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise UserError(f"give at most one of {a} and {b}")
        for key in ("eps_frac", "eps_raw", "alpha_frac", "alpha_over_eps", "std_frac", "std_over_eps"):
            _check_budget_value(key, getattr(self, key))
        if self.window_raw is not None:
            try:
                lo, hi = (float(v) for v in self.window_raw)
            except (TypeError, ValueError):
                raise UserError(f"window_raw must be (lower, upper) in raw units, got {self.window_raw!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise UserError(f"window_raw must be two finite numbers, lower < upper, got {self.window_raw!r}")
            self.window_raw = (lo, hi)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.name != "ensemble":
            if self.uses("eps") and self.eps_frac is None and self.eps_raw is None:
                self.eps_frac = float(defaults["eps"])
            if self.uses("alpha") and self.alpha_frac is None and self.alpha_over_eps is None:
                self.alpha_frac = float(defaults["alpha"])
            if self.uses("std") and self.std_frac is None and self.std_over_eps is None:
                self.std_frac = float(defaults["std"])
            if self.options.get("target") is not None and not self.options.get("targeted", False) \
                    and not attack_class(self.name).always_targeted:
                raise UserError(f"target={self.options['target']!r} is given but attack '{self.name}' is not "
                                f"targeted: add targeted=true (--targeted), or leave target out")
            try:  # every other option now: a bad value fails before any model is loaded
                build_attack(self.name, **self._placeholder_options())
            except (ValueError, TypeError) as e:
                raise UserError(str(e)) from None

    def _ensemble_members(self) -> None:
        listed = self.options.pop("attacks", None) or []
        members = list(self.members)
        for item in listed:
            if isinstance(item, AttackConfig):
                members.append(item)
            elif isinstance(item, str):
                members.append(AttackConfig(item))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
                members.append(AttackConfig(item[0], dict(item[1])))
            else:
                raise UserError(f"ensemble member must be a name or a (name, options) pair, got {item!r}")
        if not members:
            raise UserError("ensemble needs members: a non-empty list of attacks")
        if any(m.name == "ensemble" for m in members):
            raise UserError("an ensemble cannot contain an ensemble")
        self.members = tuple(members)

    # ------------------------------------------------------------------ descriptions
    @property
    def defaults(self) -> dict:
        """The attack's published defaults (every option it accepts)."""
        if self.name == "ensemble":
            merged = {}
            for m in self.members:
                merged.update(m.defaults)
            return merged
        return attack_defaults(self.name)

    def uses(self, key: str) -> bool:
        """Whether the attack takes option ``key`` (``eps``, ``alpha``, ``std``, ``seed``, ...)."""
        return key in self.defaults

    def user_option_names(self) -> List[str]:
        """Options a user may set (names as in strings; eps/alpha/std in x/255 of the window)."""
        names = [k for k in self.defaults if k not in COMPUTED_KEYS]
        if "eps" in self.defaults:
            names.append("eps_raw")
        return sorted(names)

    @property
    def eps(self) -> Optional[float]:
        """eps in x/255 of the window (None: raw units, or an attack without eps)."""
        if self.eps_frac is None or not _is_number(self.eps_frac) or not self.uses("eps"):
            return None
        return to_x255(self.eps_frac)

    @property
    def label(self) -> str:
        """What reports call it: the user's string, else ``name:key=value,...``."""
        if self.text:
            return self.text
        parts = []
        for key in ("eps", "alpha", "std"):
            v = getattr(self, f"{key}_frac")
            if v is not None and key in self.given_budget_keys():
                parts.append(f"{key}={to_x255(v)}")
        if self.eps_raw is not None:
            parts.append(f"eps_raw={_fmt_value(self.eps_raw)}")
        if self.window_raw is not None:
            parts.append(f"window_raw=({self.window_raw[0]:g},{self.window_raw[1]:g})")
        parts += [f"{k}={_fmt_value(v)}" for k, v in self.options.items()]
        return self.name + (":" + ",".join(parts) if parts else "")

    def given_budget_keys(self) -> Tuple[str, ...]:
        """Budget keys that differ from the attack's defaults (shown in labels)."""
        d = self.defaults
        return tuple(k for k in ("eps", "alpha", "std")
                     if getattr(self, f"{k}_frac") is not None and k in d
                     and not (_is_number(getattr(self, f"{k}_frac"))
                              and float(getattr(self, f"{k}_frac")) == float(d[k])))

    def settings(self) -> dict:
        """Everything that determines the attack's result, JSON-ready: name, every option after
        defaults (:meth:`resolved_options`), budgets, seed, raw window, members."""
        out = {"name": self.name, "options": self.resolved_options()}
        if self.members:
            out["members"] = [m.settings() for m in self.members]
        return out

    def settings_hash(self) -> str:
        """8 hex digits of the SHA-1 of :meth:`settings` (canonical JSON)."""
        text = json.dumps(self.settings(), sort_keys=True, default=repr)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    @property
    def tag(self) -> str:
        """Folder-safe name, injective: a readable part from the string (``pgd_eps-4_steps-20``)
        and :meth:`settings_hash`, so two different settings never share a folder (a value the
        readable part cannot spell, such as a full-width digit, still changes the hash)."""
        return f"{self._readable_tag()}-{self.settings_hash()}"

    def _readable_tag(self) -> str:
        if self.text:
            name, _, rest = self.text.strip().partition(":")
            parts = [canonical_name(name)]
            for item in split_top_level(rest) if rest.strip() else []:
                key, eq, value = item.partition("=")
                parts.append(key.strip() if not eq else f"{key.strip()}-{value.strip()}")
        else:
            parts = [self.name] + [item.replace("=", "-") for item in self.label.partition(":")[2].split(",") if item]
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts)).strip("_")

    def resolved_options(self) -> dict:
        """Every option with its value after defaults, as attack.json records it: eps/alpha/std
        in x/255 of the window (or a multiple of eps where so given), per-batch options named."""
        out = {}
        for key, default in self.defaults.items():
            if key in ("lower", "upper"):
                out[key] = "per case: the threat model's box (network units)"
            elif key == "loss":
                out[key] = "cross-entropy on the full-resolution logits, voxel mean" if self.options.get(key) is None \
                    else repr(self.options[key])
            elif key in WINDOW_UNIT_KEYS:
                frac, over = getattr(self, f"{key}_frac"), getattr(self, f"{key}_over_eps", None)
                out[key] = _jsonable(to_x255(frac)) if frac is not None else None
                if over is not None:
                    out[f"{key}_over_eps"] = over
            elif key == "seed":
                out[key] = self.seed
            else:
                out[key] = _jsonable(self.options.get(key, default))
        if self.uses("eps"):
            out["eps_raw"] = _jsonable(self.eps_raw)
        out["window_raw"] = None if self.window_raw is None else list(self.window_raw)
        if self.members:
            out["members"] = [m.label for m in self.members]
        return out

    def units(self) -> dict:
        u = {}
        if self.uses("eps"):
            u["eps"] = WINDOW_UNITS
            u["eps_raw"] = RAW_UNITS
        for key in ("alpha", "std"):
            if self.uses(key):
                u[key] = WINDOW_UNITS if getattr(self, f"{key}_over_eps") is None else "a multiple of eps"
        return u

    def warnings(self) -> List[str]:
        """One-line notes about settings that run but probably do not do what was meant."""
        notes = []
        frac = self.eps_frac if _is_number(self.eps_frac) else None
        if frac is not None and self.uses("eps") and frac > 1.0:
            notes.append(f"eps {to_x255(frac):g}/255 exceeds the whole intensity window (255/255): the perturbation "
                         f"is bounded by the window only")
        steps = self.options.get("steps", self.defaults.get("steps"))
        if frac and frac <= 1.0 and self.alpha_frac is not None and self.uses("alpha") and isinstance(steps, int) \
                and self.alpha_frac * steps < frac and self.name not in ("apgd-ce", "apgd-rog"):
            notes.append(f"alpha {to_x255(self.alpha_frac):g}/255 x {steps} steps cannot reach eps "
                         f"{to_x255(frac):g}/255; "
                         f"alpha is in x/255 of the window (the reference code's alpha 0.01 on [0, 1] images is "
                         f"alpha=2.55)")
        return notes

    def check_for(self, plans: dict, configuration: str, dataset_json: Optional[dict] = None) -> None:
        """What can be checked before a model is loaded: the configuration's threat model accepts
        this attack's raw window, and a targeted attack's class ``target`` is one of the model's
        output classes (with ``dataset_json``); :class:`UserError` otherwise."""
        if self.window_raw is not None:
            ThreatModel.from_plans(plans, configuration).with_raw_window(*self.window_raw)
        target = self.options.get("target")
        if dataset_json is not None and isinstance(target, numbers.Integral) and not isinstance(target, bool):
            # nnU-Net here, not at the top: the commands import this module before reading their flags
            from nnunetv2.utilities.label_handling.label_handling import LabelManager

            labels = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
            classes = labels.num_segmentation_heads
            if not 0 <= target < classes:
                raise UserError(f"target={target} is not a class of the model: its classes are 0..{classes - 1} "
                                f"(dataset.json labels)")
        for member in self.members:
            member.check_for(plans, configuration, dataset_json)

    # ------------------------------------------------------------------ building
    def _placeholder_options(self) -> dict:
        o = dict(self.options)
        for key in WINDOW_UNIT_KEYS:
            if self.uses(key):
                o[key] = 0.01
        if self.seed is not None and self.uses("seed"):
            o["seed"] = self.seed
        return o

    def build(self, threat_model: ThreatModel, data: torch.Tensor, loss: Optional[Callable] = None,
              raw_std: Optional[torch.Tensor] = None, spacing: Optional[Sequence[float]] = None, **overrides):
        """The attack for the batch ``data`` (B, C, *spatial), every budget in network units.

        eps, alpha, std and the projection box come from the threat model for ``data`` and go to
        the attacks that take them; ``spacing`` (mm per voxel of ``data``'s grid, its axis order)
        goes to the attacks that take it (VAFA's tile in mm); ``overrides`` (attack options, e.g.
        fewer steps for validation) win over the configuration's options.
        """
        return build_attack(self.name, **self.network_options(threat_model, data, loss, raw_std, spacing, **overrides))

    def network_options(self, threat_model: ThreatModel, data: torch.Tensor, loss: Optional[Callable] = None,
                        raw_std: Optional[torch.Tensor] = None, spacing: Optional[Sequence[float]] = None,
                        **overrides) -> dict:
        """The options :meth:`build` passes to the attack (budget tensors (B, C, 1, ..., 1))."""
        if self.name == "ensemble":
            options = {**self.options, **overrides}
            options["attacks"] = [self._member(m).build(threat_model, data, loss=loss, raw_std=raw_std, spacing=spacing)
                                  for m in self.members]
            return options
        if self.window_raw is not None:
            threat_model = threat_model.with_raw_window(*self.window_raw)
        budget = threat_model.attack_budget(data, eps_frac=self.eps_frac, eps_raw=self.eps_raw, raw_std=raw_std,
                                            alpha_frac=self.alpha_frac, alpha_over_eps=self.alpha_over_eps,
                                            std_frac=self.std_frac, std_over_eps=self.std_over_eps)
        computed = {k: v for k, v in budget.items() if k != "window"}
        if loss is not None:
            computed["loss"] = loss
        if spacing is not None:
            computed["spacing"] = tuple(float(s) for s in spacing)
        if self.seed is not None:
            computed["seed"] = self.seed
        options = {**self.options, **overrides}
        accepted = self.defaults
        options.update({k: v for k, v in computed.items() if k in accepted and k not in options})
        return options

    def _member(self, member: "AttackConfig") -> "AttackConfig":
        """A member with this ensemble's budget where the member left its own to the default."""
        changes = {}
        if self.eps_frac is not None or self.eps_raw is not None:
            if member.uses("eps") and "eps" not in member.given_budget_keys() and member.eps_raw is None:
                changes.update(eps_frac=self.eps_frac, eps_raw=self.eps_raw)
        for key in ("alpha", "std"):
            for field_name in (f"{key}_frac", f"{key}_over_eps"):
                v = getattr(self, field_name)
                if v is not None and member.uses(key) and key not in member.given_budget_keys():
                    changes.update({f"{key}_frac": None, f"{key}_over_eps": None, field_name: v})
        if self.seed is not None and member.seed is None:
            changes["seed"] = self.seed
        return replace(member, **changes) if changes else member

    # ------------------------------------------------------------------ strings and flags
    @classmethod
    def parse(cls, text: str) -> "AttackConfig":
        """An attack string (module docstring) -> configuration; :class:`UserError` naming the
        string and the problem if it is bad."""
        try:
            name, items = split_attack_string(text)
            return cls.from_options(name, items, text=text.strip())
        except UserError as e:
            raise UserError(f"attack {text!r}: {e}") from None

    @classmethod
    def from_options(cls, name: str, items: Items, text: Optional[str] = None) -> "AttackConfig":
        """The one way in for attack strings and the commands' flags: ``items`` are
        ``(key, value text)`` pairs as a string writes them (eps/alpha/std in x/255 of the window,
        ``eps_raw`` in raw units, ``window_raw=(LO,HI)``, ``seed``, the attack's options; for the
        ensemble ``members=A+B(...)``); :class:`UserError` for anything the attack does not take."""
        name = canonical_name(name)
        if name not in attack_names():
            raise UserError(f"unknown attack {name!r}; valid attacks: {', '.join(attack_names())}")
        refuse_duplicate_keys(items)
        if name == "ensemble":
            return cls._ensemble_from_options(items, text)
        defaults = attack_defaults(name)
        fields: Dict[str, object] = {}
        options: Dict[str, object] = {}
        for key, value in items:
            if key in WINDOW_UNIT_KEYS or key == "eps_raw":
                quantity = "eps" if key == "eps_raw" else key
                if quantity not in defaults:
                    raise UserError(f"{key} does not apply to attack '{name}'; valid options: "
                                    f"{', '.join(_string_keys(name))}")
                fields.update([_budget_field(key, value)])
            elif key in ("seed", "window_raw"):
                fields[key] = _field_value(name, key, value)
            elif key not in defaults or key in COMPUTED_KEYS:
                raise UserError(f"option {key!r} does not apply to attack '{name}'; valid options: "
                                f"{', '.join(_string_keys(name))}")
            else:
                options[key] = option_value(name, key, value, defaults[key])
        return cls(name, options, text=text, **fields)

    @classmethod
    def _ensemble_from_options(cls, items: Items, text: Optional[str]) -> "AttackConfig":
        """``ensemble:members=pgd(steps=10)+apgd-ce+segpgd,eps=4,seed=1``: per case the member image
        with the lowest Dice; eps/alpha/seed given here go to the members that leave theirs out."""
        fields: Dict[str, object] = {}
        members = None
        for key, value in items:
            if key == "members" and value:
                members = [cls.parse(member) for member in split_members(value)]
            elif key in ("eps", "alpha", "eps_raw") and value:
                fields.update([_budget_field(key, value)])
            elif key in ("seed", "window_raw") and value:
                fields[key] = _field_value("ensemble", key, value)
            else:
                raise UserError(f"ensemble takes members=A+B(KEY=VALUE,...)+..., eps, alpha, eps_raw, seed and "
                                f"window_raw; cannot use {key if value is None else f'{key}={value}'!r}")
        if not members:
            raise UserError("ensemble needs members=A+B+... (e.g. ensemble:members=pgd+apgd-ce+segpgd,eps=4)")
        return cls("ensemble", members=tuple(members), text=text, **fields)


def _budget_field(key: str, value: Optional[str]) -> Tuple[str, float]:
    """``(field, value)`` of a budget as a string writes it: eps/alpha/std in x/255 -> ``KEY_frac``,
    ``eps_raw`` in raw units as it is."""
    return ("eps_raw", number(key, value)) if key == "eps_raw" else (f"{key}_frac", from_x255(number(key, value)))


def _field_value(name: str, key: str, value: Optional[str]):
    """``seed`` (an integer >= 0) or ``window_raw`` (``(LOWER,UPPER)`` in raw units) from its text."""
    if key == "seed":
        return int(number(key, value))
    parsed = option_value(name, key, value, None)
    if not (isinstance(parsed, (tuple, list)) and len(parsed) == 2):
        raise UserError(f"window_raw must be (LOWER,UPPER) in raw units, e.g. window_raw=(-175,250); got {value!r}")
    return tuple(parsed)


def _string_keys(name: str) -> List[str]:
    d = attack_defaults(name)
    keys = [k for k in d if k not in COMPUTED_KEYS]
    if "eps" in d:
        keys.append("eps_raw")
    return sorted(keys + ["window_raw"])


def _check_budget_value(key: str, value) -> None:
    """A budget must be finite and >= 0; the message gives a fraction of the window (``eps_frac``) in
    the units users write it in (``eps -1 (x/255)``), not as the fraction ``-0.0039``."""
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not (_is_number(v) and math.isfinite(v) and v >= 0):
            if key.endswith("_frac") and all(_is_number(x) for x in values):
                quantity = key[:-len("_frac")]
                shown = _fmt_value(to_x255(value)) if isinstance(value, (list, tuple)) else f"{to_x255(value):g}"
                raise UserError(f"{quantity} must be a finite number >= 0 (x/255 of the window), got {quantity} "
                                f"{shown} (x/255)")
            raise UserError(f"{key} must be a finite number >= 0, got {value!r}")


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(tuple(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)
