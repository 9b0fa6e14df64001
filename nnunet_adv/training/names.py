"""Recipe settings in the trainer's name: no Python needed for another eps, step count or schedule.

``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerPGDAT_eps-8_steps-5_ep-20_its-50``

Grammar: ``BASE`` then ``_KEY-VALUE`` items. ``BASE`` is one of our trainers (``nnUNetTrainerPGDAT``,
``nnUNetTrainerVAFT``, ...); ``KEY`` a setting of that trainer (lower case, no underscores: nnU-Net
splits folder names on ``__``); ``VALUE`` a number (``8``, ``0.5``, ``1e-3``), ``true``/``false``, a
word (``ref``, ``pgd``) or sizes (``16`` or ``16x32x32``). Each name is its own trainer class, so each
setting gets its own nnU-Net output folder (``nnUNetTrainerPGDAT_eps-8__nnUNetPlans__3d_fullres``) and
every stock nnU-Net tool (``nnUNetv2_predict``, the predictor, ``find_best_configuration``,
``ensemble``) finds it by name like any trainer. The values are class attributes, so the run's
``debug.json`` records them (and ``name_settings``, the parsed items). ``nnUNetv2_adv_trainer_settings
BASE`` lists the keys, what they set, their units and defaults.

Keys: :data:`COMMON` (every adversarial trainer), the options of the trainer's attack (``steps``,
``qmax``, ``blocksize``, ``randomstart``, ...), :data:`ALIASES` of recipe attributes (``fc``,
``variant``, ``period``, ...), and every other number, switch or word attribute of the recipe by its
name without underscores (``saatgamma``).

A name that starts with one of our recipes and ``_`` is ours: breaking the grammar (an empty item,
an item that is not ``KEY-VALUE``), giving a key twice (``eps-8_eps-4``; ``eps`` and ``epsraw``
both), or a value out of its range (``ep-0``, ``lr-nan``, ``steps-0``) is a one-line
:class:`UserError` when nnU-Net looks the name up, before nnU-Net creates any folder.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from nnunet_adv.attack_config import COMPUTED_KEYS, WINDOW_UNIT_KEYS, parse_bool
from nnunet_adv.attacks import attack_defaults
from nnunet_adv.errors import UserError
from nnunet_adv.threat_model import from_x255


@dataclass(frozen=True)
class NameSetting:
    """One key of the name grammar: where its value goes and in which units."""

    key: str
    target: str          # "attr:NAME", "schedule:NAME", "attack:OPTION", "val:OPTION"
    kind: type           # int, float, bool, str, tuple
    doc: str
    convert: Optional[Callable] = None  # user value -> stored value (eps: x/255 -> fraction)
    valid: Optional[Tuple[str, Callable]] = None  # (what is valid, test of the user value); None: see _in_range
    renamed_to: Optional[str] = None  # a deprecated key: the key that replaces it


_NON_NEGATIVE = ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)


COMMON: List[NameSetting] = [
    NameSetting("eps", "attr:eps_frac", float, "L-inf radius in x/255 of each channel's intensity window",
                from_x255, _NON_NEGATIVE),
    NameSetting("epsraw", "attr:eps_raw", float, "radius in raw intensity units (HU); replaces eps",
                valid=_NON_NEGATIVE),
    NameSetting("alphaeps", "attr:alpha_over_eps", float, "attack step as a multiple of eps", valid=_NON_NEGATIVE),
    NameSetting("stdeps", "attr:std_over_eps", float, "Gaussian-noise std as a multiple of eps", valid=_NON_NEGATIVE),
    # before 0.2 these were alpha and std, which on the commands and in attack strings mean x/255
    NameSetting("alpha", "attr:alpha_over_eps", float, "deprecated: alphaeps (a multiple of eps)",
                valid=_NON_NEGATIVE, renamed_to="alphaeps"),
    NameSetting("std", "attr:std_over_eps", float, "deprecated: stdeps (a multiple of eps)",
                valid=_NON_NEGATIVE, renamed_to="stdeps"),
    NameSetting("clean", "attr:clean_loss_weight", float, "weight of the clean loss", valid=_NON_NEGATIVE),
    NameSetting("adv", "attr:adversarial_loss_weight", float, "weight of the adversarial loss", valid=_NON_NEGATIVE),
    # nnU-Net divides by the iteration counts and indexes the last epoch's log: 0 crashes inside it
    NameSetting("ep", "schedule:num_epochs", int, "epochs (nnU-Net's num_epochs)", valid=_AT_LEAST_ONE),
    NameSetting("its", "schedule:num_iterations_per_epoch", int, "training iterations per epoch",
                valid=_AT_LEAST_ONE),
    NameSetting("valits", "schedule:num_val_iterations_per_epoch", int, "validation iterations per epoch",
                valid=_AT_LEAST_ONE),
    # a NaN or infinite rate trains a NaN model without an error; 0 trains nothing
    NameSetting("lr", "schedule:initial_lr", float, "initial learning rate (nnU-Net's poly schedule)",
                valid=("a finite number > 0", lambda v: math.isfinite(v) and v > 0)),
    NameSetting("save", "schedule:save_every", int, "epochs between checkpoint_latest saves", valid=_AT_LEAST_ONE),
    NameSetting("valsteps", "val:steps", int, "attack steps of the robust validation", valid=_AT_LEAST_ONE),
    # NumPy's seed takes 0 .. 2**32 - 1
    NameSetting("seed", "attr:training_seed", int, "seeds Python, NumPy and torch when training starts "
                                                   "(repeatable with nnUNet_n_proc_DA=0)",
                valid=(f"an integer in 0..{2 ** 32 - 1}", lambda v: 0 <= v < 2 ** 32)),
]
#: keys that set the same thing: at most one of them in a name
_SAME_TARGET = {"attr:eps_raw": "attr:eps_frac"}
#: short keys of recipe attributes (the long form, the name without underscores, works too)
ALIASES: Dict[str, str] = {"fc": "frequency_consistency_weight", "variant": "vafa_variant",
                           "period": "saat_check_period", "gamma": "saat_gamma", "mmax": "saat_m_max",
                           "inner": "saat_inner_attack", "robustval": "robust_validation"}
#: attack options whose default, None, does not tell their type (sizes in voxels or mm, like block_size)
_NONE_DEFAULT_KINDS = {"rescale_tile": tuple, "tile_mm": tuple, "q_init": float}
_ITEM = re.compile(r"([a-z][a-z0-9]*)-([A-Za-z0-9.+]+(?:-[0-9]+)?)")
_SKIP_ATTRS = {"attack_name", "attack_kwargs", "val_attack_overrides", "training_schedule", "network_changes",
               "progress_panel_keys", "vafa_block_candidates", "name_settings"}


def settings_of(base: type) -> Dict[str, NameSetting]:
    """Every key ``base``'s name grammar accepts."""
    out = {s.key: s for s in COMMON}
    for option, default in attack_defaults(base.attack_name).items():
        if option in COMPUTED_KEYS or option in WINDOW_UNIT_KEYS or option in ("seed", "target", "loss"):
            continue
        kind = _NONE_DEFAULT_KINDS.get(option, str) if default is None else bool if isinstance(default, bool) \
            else tuple if isinstance(default, tuple) else int if isinstance(default, int) \
            else float if isinstance(default, float) else str
        key = option.replace("_", "")
        out.setdefault(key, NameSetting(key, f"attack:{option}", kind, f"attack option {option} of "
                                                                      f"{base.attack_name}"))
    attrs = {}
    for cls in reversed(base.__mro__):
        attrs.update({k: v for k, v in vars(cls).items() if not k.startswith("_")})
    for attr, value in attrs.items():
        if attr in _SKIP_ATTRS or callable(value) or isinstance(value, (property, classmethod, staticmethod)):
            continue
        if not isinstance(value, (bool, int, float, str)) or attr in {s.target[5:] for s in COMMON}:
            continue
        kind = bool if isinstance(value, bool) else type(value)
        key = attr.replace("_", "")
        out.setdefault(key, NameSetting(key, f"attr:{attr}", kind, f"recipe attribute {attr}"))
    for alias, attr in ALIASES.items():
        if attr.replace("_", "") in out:
            out[alias] = NameSetting(alias, f"attr:{attr}", out[attr.replace("_", "")].kind, f"recipe attribute {attr}")
    return out


def default_of(base: type, setting: NameSetting):
    where, _, name = setting.target.partition(":")
    if where == "attr":
        return getattr(base, name, None)
    if where == "schedule":
        return (base.training_schedule or {}).get(name, "nnU-Net's")
    if where == "attack":
        return base.attack_kwargs.get(name, attack_defaults(base.attack_name).get(name))
    return base.val_attack_overrides.get(name, base.attack_kwargs.get(name))


def _value(setting: NameSetting, text: str, name: str):
    try:
        if setting.kind is bool:
            return parse_bool(text)
        if setting.kind is int:
            value = int(text)
        elif setting.kind is float:
            value = float(text)
        elif setting.kind is tuple and text.lower() == "none" and setting.key == "rescaletile":
            value = None  # no tile in voxels: tile_mm decides (the -ref variants' default)
        elif setting.kind is tuple:
            value = tuple(_size(v) for v in text.lower().split("x"))
            value = value[0] if len(value) == 1 else value  # one size: every axis
        else:
            value = text
    except ValueError:
        raise UserError(f"trainer {name!r}: {setting.key}-{text}: {setting.key} takes "
                        f"{'true/false' if setting.kind is bool else setting.kind.__name__} values "
                        f"({setting.doc})") from None
    valid = _in_range(setting)
    if valid is not None and not valid[1](value):
        raise UserError(f"trainer {name!r}: {setting.key}-{text}: {setting.key} must be {valid[0]} ({setting.doc})")
    return setting.convert(value) if setting.convert else value


def _size(text: str):
    """One size of a tuple option: voxels (int) or, for tile_mm, millimetres (float)."""
    return int(text) if text.isdigit() else float(text)


def _in_range(setting: NameSetting) -> Optional[Tuple[str, Callable]]:
    """What values of a key are valid (user units): its own rule, else every number of a recipe
    attribute finite and >= 0 (no recipe attribute means anything negative; the recipe's constructor
    checks the finer rules), attack options by the attack itself (:func:`_check_attack`)."""
    if setting.valid is not None:
        return setting.valid
    if setting.kind in (int, float) and setting.target.startswith("attr:"):
        return _NON_NEGATIVE
    if setting.kind is float:
        return ("a finite number", math.isfinite)
    return None


def split_name(name: str, bases: Dict[str, type]) -> Optional[Tuple[type, List[Tuple[str, str]]]]:
    """``(base class, [(key, value text), ...])`` when ``name`` is one of ``bases`` followed by
    ``_KEY-VALUE`` items; None when the name does not start with one of ``bases`` and ``_`` (not
    ours to resolve). A name that does, but breaks the grammar, is a :class:`UserError` naming the
    item: nnU-Net would otherwise report only that it found no such trainer."""
    base_name = next((b for b in sorted(bases, key=len, reverse=True) if name.startswith(b + "_")), None)
    if base_name is None:
        return None
    example = f"e.g. {base_name}_eps-8_steps-5"
    if "__" in name:
        raise UserError(f"trainer {name!r}: '__' cannot be in a trainer name (nnU-Net's folders are "
                        f"TRAINER__PLANS__CONFIGURATION); items are joined by one '_' ({example})")
    items = name[len(base_name) + 1:].split("_")
    for item in items:
        if not item:
            raise UserError(f"trainer {name!r}: an empty item (a '_' at the end); items are KEY-VALUE joined by "
                            f"'_' ({example})")
        if "--" in item:
            raise UserError(f"trainer {name!r}: {item}: a negative value; every value in a trainer name is >= 0")
        if not _ITEM.fullmatch(item):
            raise UserError(f"trainer {name!r}: cannot read {item!r}; items are KEY-VALUE joined by '_', keys "
                            f"have no underscores (randomstart-true, not random_start-true; {example}; "
                            f"nnUNetv2_adv_trainer_settings {base_name} lists the keys)")
    return bases[base_name], [tuple(item.split("-", 1)) for item in items]


def trainer_from_name(name: str, bases: Dict[str, type]) -> type:
    """The trainer class a settings name describes (created once; see the module docstring).

    Raises:
        AttributeError: the name is not a recipe name of ours (nnU-Net then looks elsewhere);
        UserError: it is ours, but a key or value is bad (one line naming the valid keys).
    """
    found = split_name(name, bases)
    if found is None:
        raise AttributeError(name)
    base, items = found
    known = settings_of(base)
    attrs: Dict[str, object] = {"name_settings": {}}
    schedule = dict(base.training_schedule or {})
    attack_kwargs, val_overrides = dict(base.attack_kwargs), dict(base.val_attack_overrides)
    given: Dict[str, str] = {}  # target -> the item that set it
    for key, text in items:
        setting = known.get(key)
        if setting is None:
            raise UserError(f"trainer {name!r}: unknown setting {key!r} for {base.__name__}; valid keys: "
                            f"{', '.join(sorted(known))} (nnUNetv2_adv_trainer_settings {base.__name__})")
        target = _SAME_TARGET.get(setting.target, setting.target)
        if target in given:
            raise UserError(f"trainer {name!r}: {given[target]} and {key}-{text} set the same setting; give it once")
        given[target] = f"{key}-{text}"
        value = _value(setting, text, name)
        if setting.renamed_to:
            print(f"nnunet_adv: trainer {name!r}: {key}-{text} is deprecated, write {setting.renamed_to}-{text} "
                  f"(the same multiple of eps; '{key}' on the commands and in attack strings is x/255)",
                  file=sys.stderr)
        where, _, target = setting.target.partition(":")
        if where == "attr":
            attrs[target] = value
            if target == "eps_raw":
                attrs["eps_frac"] = None
            if target == "eps_frac":
                attrs["eps_raw"] = None
        elif where == "schedule":
            schedule[target] = value
        elif where == "attack":
            attack_kwargs[target] = value
        else:
            val_overrides[target] = value
        attrs["name_settings"][key] = text
    attrs.update(training_schedule=schedule or None, attack_kwargs=attack_kwargs, val_attack_overrides=val_overrides,
                 __module__="nnunet_adv.trainers", __qualname__=name,
                 __doc__=f"{base.__name__} with {', '.join(f'{k}={v}' for k, v in attrs['name_settings'].items())} "
                         f"(recipe settings by name, nnunet_adv.training.names).")
    cls = type(name, (base,), attrs)
    _check_attack(cls, name)
    return cls


def _check_attack(cls: type, name: str) -> None:
    """The attack options a name sets (``steps-0``) checked by the attack itself, for training and
    for the robust validation, before nnU-Net creates the run's folder (the trainer checks them
    again with the configuration's threat model)."""
    try:
        config = cls.attack_config.fget(cls)  # the property on the class: its attributes are class attributes
        replace(config, options={**config.options, **cls.val_attack_overrides})
    except UserError as e:
        raise UserError(f"trainer {name!r}: attack {cls.attack_name!r}: {e}") from None
