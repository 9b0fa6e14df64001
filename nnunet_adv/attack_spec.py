"""Attack strings of ``nnUNetv2_adv_evaluate``: ``"pgd:eps=4,steps=20"`` -> ``nnUNetv2_adv_attack`` flags.

Grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``. ``NAME`` is an attack of ``nnUNetv2_adv_attack
--list_attacks``; every ``KEY`` is one of its options with the same meaning and units (``eps``,
``alpha`` and ``std`` in x/255 of each channel's intensity window, ``eps_raw`` in raw units). A flag
option given alone is true (``use_ssim_loss``), ``block_size=32`` is 32 on every axis and
``block_size=16x32x32`` per axis; brackets keep commas inside a value (``temperature=(0.1,1e-20)``).
Options that ``nnUNetv2_adv_attack`` has no flag for become ``--attack_option KEY=VALUE``.

A spec is validated with the attack command's own parser and option checks, so an evaluation
fails on a bad string before any model is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from nnunet_adv.cli.common import CLIError

_BUDGET_FLAGS = ("eps", "eps_raw")


@dataclass(frozen=True)
class AttackSpec:
    """One parsed attack string.

    Attributes:
        text: the string as the user wrote it (the report's column name).
        name: canonical attack name (``vafa-3d``).
        options: ((key, value text), ...) in the user's order.
    """

    text: str
    name: str
    options: Tuple[Tuple[str, Optional[str]], ...]

    @property
    def tag(self) -> str:
        """Folder-safe name, unique per distinct string (``pgd_eps-4_steps-20``)."""
        parts = [self.name] + [k if v is None else f"{k}-{v}" for k, v in self.options]
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts)).strip("_")

    @property
    def eps(self) -> Optional[float]:
        """eps in x/255 of the window as given (None: the attack's default or no eps)."""
        for key, value in self.options:
            if key == "eps":
                return float(value)
        return None

    def attack_argv(self) -> List[str]:
        """The ``nnUNetv2_adv_attack`` arguments of this attack (no model / folders)."""
        from nnunet_adv.cli.attack import _ATTACK_FLAGS

        argv = ["--attack_name", self.name]
        for key, value in self.options:
            if key in _BUDGET_FLAGS or key in _ATTACK_FLAGS or key == "seed":
                argv.append(f"--{key}")
                if value is not None:
                    argv += self._block_size(value) if key == "block_size" else [value]
            elif value is None:
                argv += ["--attack_option", f"{key}=True"]
            else:
                argv += ["--attack_option", f"{key}={value}"]
        return argv


    def _block_size(self, value: str) -> List[str]:
        """'16x32x32' -> per axis; '32' -> the same size on every block axis of the attack."""
        if "x" in value:
            return value.split("x")
        return [value] * (3 if self.name.endswith("3d") else 2)


def _split_top_level(text: str) -> List[str]:
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


def parse_attack_spec(text: str) -> AttackSpec:
    """Parse and validate one attack string; CLIError (one line, naming the string) if it is bad."""
    from nnunet_adv.cli.attack import AttackCommand, build_parser
    from nnunet_adv.volume_attack import attack_names

    name, _, rest = text.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    if name not in attack_names():
        raise CLIError(f"attack {text!r}: unknown attack {name!r}; valid attacks: {', '.join(attack_names())}")
    options = []
    for item in _split_top_level(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or (eq and not value.strip()):
            raise CLIError(f"attack {text!r}: cannot parse {item.strip()!r}; expected KEY=VALUE "
                           f"(e.g. 'pgd:eps=4,steps=20')")
        options.append((key, value.strip() if eq else None))
    spec = AttackSpec(text=text.strip(), name=name, options=tuple(options))
    argv = spec.attack_argv()
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            raise CLIError(f"unknown option(s) {' '.join(unknown)}")
        AttackCommand(args, argv).attack_config()
    except CLIError as e:
        raise CLIError(f"attack {text!r}: {e}") from None
    return spec
