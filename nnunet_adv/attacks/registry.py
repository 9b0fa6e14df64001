"""Attacks by name: the registry that :func:`build_attack` and the ensemble read.

It imports no attack module (the package ``__init__`` registers each attack class), so an attack
that builds others by name, such as :class:`~nnunet_adv.attacks.ensemble.Ensemble`, imports this
module without an import cycle.
"""
from __future__ import annotations

from typing import Dict, List, Type

from .base import Attack
from .options import canonical_name

_REGISTRY: Dict[str, Type[Attack]] = {}


def register(*classes: Type[Attack]) -> None:
    """Make each attack class buildable by its ``name``."""
    for cls in classes:
        _REGISTRY[cls.name] = cls


def available_attacks() -> List[str]:
    """Sorted names accepted by :func:`build_attack`."""
    return sorted(_REGISTRY)


def attack_class(name: str) -> Type[Attack]:
    """The class of attack ``name``; names are case-insensitive and ``_`` may stand for ``-``
    (``"VAFA_3D"`` == ``"vafa-3d"``). ``ValueError`` for unknown names."""
    if not isinstance(name, str):
        raise ValueError(f"attack name must be a string, got {name!r}; valid: {available_attacks()}")
    cls = _REGISTRY.get(canonical_name(name))
    if cls is None:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {available_attacks()}")
    return cls


def build_attack(name: str, **options) -> Attack:
    """Build the attack ``name`` with ``options`` (``ValueError`` for unknown names/options)."""
    return attack_class(name)(**options)


def attack_defaults(name: str) -> dict:
    """The published defaults (and every accepted option) of attack ``name``."""
    return dict(attack_class(name).defaults)
