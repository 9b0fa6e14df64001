"""The attack-string grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` split into a name and its items,
and option values typed. It knows nothing of budgets or units: :meth:`AttackConfig.from_options`
(``nnunet_adv.attack_config``) turns the items into a configuration, for attack strings and for the
commands' flags alike (one front door, one validation).

A key given alone is true (``use_ssim_loss``); booleans also read ``true/false``, ``1/0``,
``yes/no``; ``block_size=32`` is 32 on every blocked axis, ``block_size=16x32x32`` per axis;
brackets keep commas inside a value (``temperature=(0.1,1e-20)``); ensemble members are
``NAME(KEY=VALUE,...)`` joined by ``+``.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Dict, List, Optional, Tuple

from nnunet_adv.attacks import canonical_name
from nnunet_adv.errors import UserError

__all__ = ["Items", "parse_bool", "split_attack_string", "split_members", "option_value", "number",
           "split_top_level", "refuse_duplicate_keys"]

#: an attack's items: ``(key, value text or None for a bare key)``, in the order given
Items = List[Tuple[str, Optional[str]]]

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")
_BOOLEAN_KEYS = ("random_start", "targeted", "use_ssim_loss", "renormalize_slices")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_bool(value) -> bool:
    """``True``/``False`` from a bool or the usual spellings (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def split_attack_string(text: str) -> Tuple[str, Items]:
    """``"pgd:eps=4,steps=20"`` -> ``("pgd", [("eps", "4"), ("steps", "20")])`` (name canonical;
    :class:`UserError` for an unreadable item or a key given twice)."""
    name, _, rest = text.strip().partition(":")
    items: Items = []
    for item in split_top_level(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not _KEY.fullmatch(key) or (eq and not value.strip()):
            raise UserError(f"cannot parse {item.strip()!r}; expected KEY=VALUE (e.g. 'pgd:eps=4,steps=20')")
        items.append((key, value.strip() if eq else None))
    refuse_duplicate_keys(items)
    return canonical_name(name), items


def refuse_duplicate_keys(items: Items) -> None:
    """``eps=4,eps=8``: a key given twice (the later would silently win) is refused; ``eps`` and
    ``eps_raw`` set one budget, so both count as the same key."""
    seen: Dict[str, str] = {}
    for key, value in items:
        shown = key if value is None else f"{key}={value}"
        group = "eps" if key == "eps_raw" else key
        if group in seen:
            raise UserError(f"{seen[group]!r} and {shown!r} set the same option; give it once")
        seen[group] = shown


def split_members(text: str) -> List[str]:
    """``pgd(steps=10)+apgd-ce+segpgd`` -> the members as attack strings (``pgd:steps=10``, ...)."""
    members, depth, current = [], 0, ""
    for ch in text + "+":
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            item = current.strip()
            current = ""
            if not item:
                raise UserError(f"members {text!r}: an empty member; write NAME or NAME(KEY=VALUE,...) joined by +")
            name, _, options = item.partition("(")
            if options and not options.endswith(")"):
                raise UserError(f"members {text!r}: cannot read {item!r}; write NAME(KEY=VALUE,...)")
            members.append(name + (":" + options[:-1] if options[:-1].strip() else ""))
        else:
            current += ch
    return members


def number(key: str, value: Optional[str]) -> float:
    """A budget's text as a finite number >= 0 (:class:`UserError` otherwise)."""
    if value is None:
        raise UserError(f"{key} needs a value ({key}=NUMBER)")
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        if key in ("eps", "alpha", "std"):  # in the units the user wrote them in
            raise UserError(f"{key} must be a finite number >= 0 (x/255 of the window), got {key} {v:g} (x/255)")
        raise UserError(f"{key} must be a finite number >= 0, got {value!r}")
    return v


def option_value(name: str, key: str, value: Optional[str], default):
    """A string option value of attack ``name``, typed after the attack's default (``block_size=8``:
    8 on every blocked axis; ``rescale_tile=20``: 20^3)."""
    if isinstance(default, bool) or key in _BOOLEAN_KEYS:
        try:
            return True if value is None else parse_bool(value)
        except ValueError as e:
            raise UserError(f"{key}: {e}") from None
    if value is None:
        raise UserError(f"{key} needs a value ({key}=VALUE)")
    if key in ("block_size", "rescale_tile"):
        if key == "rescale_tile" and value.strip().lower() == "none":
            return None
        try:
            ints = tuple(int(s) for s in value.lower().split("x"))
        except ValueError:
            raise UserError(f"{key} must be an integer or AxBxC, got {value!r}") from None
        if len(ints) == 1:
            return ints * (2 if key == "block_size" and "2d" in name else 3)
        return ints
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def split_top_level(text: str) -> List[str]:
    """Split at commas that are not inside (), [] or {}."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


