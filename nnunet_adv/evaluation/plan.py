"""What a robustness evaluation computes: models, settings and their evaluations.

A *setting* is one column of the report: the clean images, one attack, one eps of the sweep, one
corruption at one severity, or the worst case over the attacks (derived: no images of its own).
An *evaluation* is one model predicting the images of one setting, crafted on itself (white box)
or on another model (transfer); clean and corrupted images are the same for every model. Each has
a folder-safe key that names its cached results.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import attack_class
from nnunet_adv.attacks.ensemble import Ensemble
from nnunet_adv.attacks.targeted import nlcen_iterations
from nnunet_adv.errors import UserError
from nnunet_adv.evaluation.checks import SATURATION_EPS
from nnunet_adv.evaluation.corruptions import parse_corruptions


@dataclass
class Model:
    """A trained nnU-Net model folder and its name in the report; for an ensemble of configurations
    (:mod:`nnunet_adv.volume.deployed_ensemble`) ``folder`` is its first member, ``members`` the others;
    ``postprocessing``: the postprocessing.pkl applied to its predictions (nnUNetv2_apply_postprocessing)."""

    name: str
    folder: Path
    members: tuple = ()
    postprocessing: Optional[Path] = None


@dataclass
class Setting:
    """One column of the report: clean, an attack (``attack``), one eps of the sweep (``sweep``),
    a corruption (``corruption`` = (name, severity)) or the worst case over the attacks (``worst``)."""

    label: str
    attack: Optional[AttackConfig] = None
    sweep: bool = False
    corruption: Optional[Tuple[str, int]] = None
    worst: bool = False
    #: an attack the checks add (:mod:`nnunet_adv.evaluation.checks`): "gradient-free", "saturation"
    #: or "convergence"; None for the user's own settings
    check: Optional[str] = None

    @property
    def tag(self) -> str:
        if self.worst:
            return "worst-case"
        if self.corruption is not None:
            return f"corruption_{self.corruption[0]}-{self.corruption[1]}"
        return "clean" if self.attack is None else self.attack.tag

    @property
    def eps(self) -> Optional[float]:
        """eps in x/255 of the window (0 for clean, None for attacks without an eps and the rest)."""
        if self.worst or self.corruption is not None:
            return None
        return 0.0 if self.attack is None else self.attack.eps

    @property
    def crafted(self) -> bool:
        """Images made against each model (attacks, sweep points), not shared by all models."""
        return self.attack is not None


@dataclass
class Evaluation:
    """Predictions of ``model`` on the images of ``setting`` crafted on ``source``."""

    model: Model
    setting: Setting
    source: Optional[Model]  # None: clean images

    @property
    def transfer(self) -> bool:
        return self.source is not None and self.source.name != self.model.name

    @property
    def key(self) -> str:
        return self.setting.tag + (f"__from_{self.source.name}" if self.transfer else "")


def corruption_settings(items: Sequence[str]) -> List[Setting]:
    """Settings of ``--corruptions`` items (``noise``, ``blur:3``, ``all``; see
    :func:`nnunet_adv.evaluation.corruptions.parse_corruptions`)."""
    return [Setting(f"{name}:{severity}", corruption=(name, severity)) for name, severity in parse_corruptions(items)]


def worst_case_setting(settings: Sequence[Setting]) -> List[Setting]:
    """The worst case over the attacks of ``settings`` (not the sweep, not controls such as
    ``slice-rescale``; AutoAttack's rule: per case the lowest Dice), where there is an attack."""
    return [Setting("worst case", worst=True)] if worst_case_members(settings) else []


def worst_case_members(settings: Sequence[Setting]) -> List[Setting]:
    """Every attack run at the evaluation's budgets (AutoAttack's rule): the user's, the checks'
    gradient-free attack and convergence re-run; not the sweep, controls or the saturation check."""
    return [s for s in settings if s.attack is not None and not s.sweep and s.check != "saturation"
            and not attack_class(s.attack.name).control]


def threat_model(setting: Setting) -> str:
    """The budget that bounds an attack setting, as reports name it: ``L-inf 4/255`` (eps in x/255 of the
    window), ``L2 ...``, ``L-inf eps_raw=10`` (raw units); an attack without an eps (VAFA, Gaussian noise,
    ...) is its own: its label."""
    attack = setting.attack
    if attack is None or not attack.uses("eps"):
        return setting.label
    norm = "L2" if {**attack.defaults, **attack.options}.get("norm", "linf") == "l2" else "L-inf"
    if attack.eps is not None:
        return f"{norm} {attack.eps:g}/255"
    return f"{norm} eps_raw={attack.eps_raw}" if attack.eps_raw is not None else setting.label


def worst_case_threat_models(settings: Sequence[Setting]) -> List[str]:
    """The threat models the worst case spans, in order. More than one: the worst case is the lowest Dice over
    several budgets (say L-inf 4/255 and 8/255, or VAFA and L-inf), which is no robustness number for any one of
    them; reports say so."""
    return list(dict.fromkeys(threat_model(s) for s in worst_case_members(settings)))


def uses_gradients(setting: Setting) -> bool:
    """Whether the setting's attack follows the attacked model's input gradient (white box)."""
    if setting.attack is None:
        return False
    cls = attack_class(setting.attack.name)
    return not (cls.gradient_free or cls.control)


def check_settings(settings: Sequence[Setting], seed: int, queries: int) -> List[Setting]:
    """The attacks the checks add: Square at the largest eps of the attacks (unless one of them is
    already Square: the one inside ``autoattack-rog`` counts as white box, since the preset's worst
    case mixes it with gradient attacks) and PGD at the saturation budget."""
    members = worst_case_members(settings)
    if not members:
        return []
    out = []
    eps = [s.attack.eps for s in members if s.attack.eps is not None]
    if eps and not any(s.attack.name == "square" for s in members):
        out.append(Setting(f"square:eps={max(eps):g},queries={queries}",
                           _seeded(AttackConfig.parse(f"square:eps={max(eps):g},queries={queries}"), seed),
                           check="gradient-free"))
    # Madry's step rule (2.5 eps / steps): five steps cross the ball from any random start
    text = f"pgd:eps={SATURATION_EPS:g},alpha={SATURATION_EPS / 2:g},steps=5"
    out.append(Setting(text, _seeded(AttackConfig.parse(text), seed), check="saturation"))
    return out


def convergence_candidate(settings: Sequence[Setting], mean_dice: Callable[[Setting], float]) -> Optional[Setting]:
    """The attack the convergence check re-runs: of the white-box attacks with steps in the worst case,
    the one with the lowest ``mean_dice``; a single attack before a preset of several (``autoattack-rog``):
    the preset is already the minimum over its members, and re-running all of them at ``factor`` x their
    steps would cost several times the whole evaluation (FAB alone is ~116 PGD steps per case at 1x)
    where the question, "do more steps still lower the Dice?", is one attack's. A preset is re-run only
    where it is the only candidate."""
    candidates = [s for s in worst_case_members(settings) if s.check is None and uses_gradients(s)
                  and s.attack.uses("steps")]
    single = [s for s in candidates if not issubclass(attack_class(s.attack.name), Ensemble)]
    return min(single or candidates, key=mean_dice, default=None)


def convergence_setting(setting: Setting, factor: int) -> Optional[Setting]:
    """``setting``'s attack with ``factor`` x its steps (the convergence check), or None where the
    attack has no steps."""
    config = setting.attack
    if config is None or not config.uses("steps"):
        return None
    steps = int(config.options.get("steps", config.defaults["steps"])) * factor
    rerun = replace(config, options={**config.options, "steps": steps}, text=None)
    return Setting(f"{rerun.label} ({factor}x the steps of {setting.label})", rerun, check="convergence")


def attack_settings(texts: Sequence[str], seed: int) -> List[Setting]:
    """Settings of attack strings (:meth:`AttackConfig.parse`); ``seed`` where a string sets none."""
    return [Setting(text, _seeded(AttackConfig.parse(text), seed)) for text in texts]


def sweep_settings(base: str, eps_values: Sequence[float], seed: int) -> List[Setting]:
    """One setting per eps (x/255) of ``base`` (an attack string without eps). NLCEN's targeted
    I-FGSM without ``steps`` takes NLCEN's ``min(eps + 4, ceil(1.25 eps))`` iterations."""
    base_config = AttackConfig.parse(base)
    if any(item.split("=")[0].strip() in ("eps", "eps_raw") for item in base.partition(":")[2].split(",")):
        raise UserError(f"--sweep_attack {base!r}: leave eps out, --eps_sweep sets it")
    if not base_config.uses("eps"):
        raise UserError(f"--sweep_attack {base!r}: the attack has no eps to sweep")
    nlcen_rule = base_config.name == "ifgsm-targeted" and "steps" not in base_config.options
    out = []
    for eps in eps_values:
        text = f"{base}{',' if ':' in base else ':'}eps={eps:g}"
        if nlcen_rule:  # NLCEN's protocol: alpha 1/255, iterations from eps
            text += f",steps={nlcen_iterations(eps)}"
        out.append(Setting(text, _seeded(AttackConfig.parse(text), seed), sweep=True))
    return out


def _seeded(config: AttackConfig, seed: int) -> AttackConfig:
    if config.seed is None and config.uses("seed"):
        return replace(config, seed=seed)
    return config


def evaluations_of(models: Sequence[Model], settings: Sequence[Setting],
                   transfer_from: Optional[Model] = None) -> List[Evaluation]:
    """White-box evaluations of every model and setting, then (with ``transfer_from``) every other
    model on the images crafted on the source."""
    out = [Evaluation(m, s, m if s.crafted else None) for m in models for s in settings if not s.worst]
    if transfer_from is not None:
        for s in settings:
            if s.crafted:
                out += [Evaluation(m, s, transfer_from) for m in models if m.name != transfer_from.name]
    return out
