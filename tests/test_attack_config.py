"""The one attack configuration: attack strings ('pgd:eps=4,steps=20'), the attack command's flags
and trainer attributes give the same AttackConfig; tags; bad strings are one-line UserErrors."""
import pytest
import torch

from nnunet_adv.attack_config import AttackConfig, parse_bool
from nnunet_adv.cli.attack import attack_config_from_args, build_parser
from nnunet_adv.errors import UserError
from nnunet_adv.threat_model import ThreatModel


def _from_flags(argv):
    return attack_config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("text,argv", [
    ("pgd:eps=4,steps=20", ["--attack_name", "pgd", "--eps", "4", "--steps", "20"]),
    ("vafa-3d:q_max=20,steps=20,block_size=32",  # one block size = every axis
     ["--attack_name", "vafa-3d", "--q_max", "20", "--steps", "20", "--block_size", "32", "32", "32"]),
    ("vafa-2d:block_size=8", ["--attack_name", "vafa-2d", "--block_size", "8", "8"]),
    ("vafa-3d:block_size=8", ["--attack_name", "vafa-3d", "--block_size", "8"]),  # one flag value = every axis
    ("vafa-2d:block_size=8", ["--attack_name", "vafa-2d", "--block_size", "8"]),
    ("vafa-3d-ref:rescale_tile=20", ["--attack_name", "vafa-3d-ref", "--attack_option", "rescale_tile=20"]),  # 20^3
    ("slice-rescale:rescale_tile=none", ["--attack_name", "slice-rescale", "--attack_option", "rescale_tile=none"]),
    ("vafa_3d:block_size=4x8x8,use_ssim_loss=false",
     ["--attack_name", "vafa-3d", "--block_size", "4", "8", "8", "--use_ssim_loss", "false"]),
    ("gn:std=4", ["--attack_name", "gn", "--std", "4"]),
    ("pgd:random_start", ["--attack_name", "pgd", "--random_start"]),  # a flag alone is true
    ("pgd:alpha=2.55,eps_raw=30", ["--attack_name", "pgd", "--alpha", "2.55", "--eps_raw", "30"]),
    ("ifgsm-targeted:eps=2,target=0", ["--attack_name", "ifgsm-targeted", "--eps", "2", "--attack_option", "target=0"]),
    ("vafa-3d:temperature=(0.2,1e-20)",  # commas inside brackets belong to the value
     ["--attack_name", "vafa-3d", "--attack_option", "temperature=(0.2,1e-20)"]),
    ("fgsm", ["--attack_name", "fgsm"]),
])
def test_a_string_is_the_same_attack_as_its_flags(text, argv):
    parsed, flagged = AttackConfig.parse(text), _from_flags(argv + ["--seed", "0"])
    parsed_seeded = AttackConfig(parsed.name, parsed.options, eps_frac=parsed.eps_frac, eps_raw=parsed.eps_raw,
                                 alpha_frac=parsed.alpha_frac, std_frac=parsed.std_frac,
                                 seed=0 if flagged.seed is not None else None)
    for key in ("name", "options", "eps_frac", "eps_raw", "alpha_frac", "std_frac", "seed"):
        assert getattr(parsed_seeded, key) == getattr(flagged, key), key
    assert parsed.resolved_options() == {**flagged.resolved_options(),
                                         **({"seed": None} if flagged.uses("seed") else {})}


def test_eps_and_tag():
    config = AttackConfig.parse("pgd:eps=0.5,steps=20")
    assert config.eps == 0.5 and config.tag == f"pgd_eps-0.5_steps-20-{config.settings_hash()}"
    assert AttackConfig.parse("vafa-3d:q_max=20").eps is None
    assert AttackConfig.parse("vafa-3d:temperature=(0.2,1e-20)").tag.startswith("vafa-3d_temperature-_0.2_1e-20-")


def test_tags_are_injective():
    """Two different settings never share a folder: a full-width digit the readable part cannot spell
    still changes the tag (it used to map eps=４ and eps=８ to one folder)."""
    four, eight = AttackConfig.parse("pgd:eps=４,steps=1"), AttackConfig.parse("pgd:eps=８,steps=1")
    assert four.eps == 4.0 and eight.eps == 8.0 and four.tag != eight.tag
    assert AttackConfig.parse("pgd:eps=4,steps=1").settings() == four.settings()
    assert AttackConfig.parse("pgd:eps=4,seed=1").tag != AttackConfig.parse("pgd:eps=4,seed=2").tag


def test_target_without_targeted_and_budget_warnings():
    with pytest.raises(UserError, match="target=7 is given but attack 'pgd' is not targeted"):
        AttackConfig.parse("pgd:target=7")
    assert AttackConfig.parse("pgd:target=1,targeted=true").options["target"] == 1
    assert any("exceeds the whole intensity window" in w for w in AttackConfig.parse("pgd:eps=1e9").warnings())
    unit_trap = AttackConfig.parse("pgd:eps=4,alpha=0.01,steps=2").warnings()
    assert len(unit_trap) == 1 and "alpha=2.55" in unit_trap[0]
    assert AttackConfig.parse("pgd:eps=4").warnings() == []


def test_units_x255_of_the_window_and_defaults():
    """eps=4 in a string is the papers' 4/255 of the window; a budget left out is the attack's
    published default read in the same units (alpha 0.01 on [0, 1] images = 0.01 of the window)."""
    pgd = AttackConfig.parse("pgd:eps=8")
    assert pgd.eps_frac == 8 / 255 and pgd.alpha_frac == 0.01
    assert AttackConfig("pgd").eps_frac == 4 / 255
    x = torch.linspace(-1.0, 3.0, 64).reshape(1, 1, 4, 4, 4)  # z-scored: window = patch range = 4
    options = pgd.network_options(ThreatModel(["ZScoreNormalization"]), x)
    assert float(options["eps"].flatten()[0]) == pytest.approx(8 / 255 * 4.0)
    assert float(options["alpha"].flatten()[0]) == pytest.approx(0.01 * 4.0)
    assert float(options["lower"].flatten()[0]) == -1.0 and float(options["upper"].flatten()[0]) == 3.0


def test_trainer_attributes_are_the_same_type():
    """A recipe (eps_frac, alpha_over_eps) and its string build the same attack tensors."""
    recipe = AttackConfig("pgd", {"steps": 10}, eps_frac=4 / 255, alpha_over_eps=0.25)
    x = torch.randn(2, 1, 4, 4, 4)
    options = recipe.network_options(ThreatModel(["ZScoreNormalization"]), x)
    assert torch.allclose(options["alpha"], options["eps"] * 0.25)


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True), ("False", False),
                                            ("0", False), ("no", False), (True, True)])
def test_booleans_accept_the_usual_spellings(value, expected):
    assert parse_bool(value) is expected
    assert AttackConfig.parse(f"vafa-3d:use_ssim_loss={value}").options["use_ssim_loss"] is expected


@pytest.mark.parametrize("text,message", [
    ("nope:eps=4", "unknown attack 'nope'"),
    ("pgd:eps=4,stepz=3", "option 'stepz' does not apply to attack 'pgd'"),
    ("pgd:eps", "eps needs a value"),
    ("pgd:steps=x", "steps must be an integer >= 1, got 'x'"),
    ("pgd:eps=4,,steps=2", "cannot parse ''"),
    ("pgd:eps=", "cannot parse 'eps='"),
    ("vafa-3d:eps=4", "eps does not apply to attack 'vafa-3d'"),
    ("vafa-3d:block_size=8x8", "block_size"),
    ("pgd:use_ssim_loss=true", "does not apply to attack 'pgd'"),
    ("vafa-3d:use_ssim_loss=maybe", "expected true or false"),
])
def test_bad_strings_name_the_string_and_the_problem(text, message):
    with pytest.raises(UserError) as e:
        AttackConfig.parse(text)
    assert str(e.value).startswith(f"attack {text!r}: ") and message in str(e.value)


CT = ThreatModel(["CTNormalization"], {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": -500.0,
                                             "percentile_99_5": 600.0}})


def test_a_raw_window_replaces_the_ct_window_for_box_and_budget():
    config = AttackConfig.parse("vafa-3d-ref:window_raw=(-175,250)")
    assert config.window_raw == (-175.0, 250.0) and "window_raw=(-175,250)" in config.label
    options = config.network_options(CT, torch.zeros(1, 1, 4, 4, 4))
    assert float(options["lower"].flatten()[0]) == pytest.approx((-175 - 100) / 50)
    assert float(options["upper"].flatten()[0]) == pytest.approx((250 - 100) / 50)
    pgd = AttackConfig("pgd", eps_frac=4 / 255, window_raw=(-175, 250)).network_options(CT, torch.zeros(1, 1, 4, 4, 4))
    assert float(pgd["eps"].flatten()[0]) == pytest.approx(4 / 255 * 425 / 50)
    with pytest.raises(UserError, match="window_raw needs CT-normalised channels"):
        config.network_options(ThreatModel(["ZScoreNormalization"]), torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(UserError, match="window_raw must be"):
        AttackConfig.parse("vafa-3d-ref:window_raw=250")


def test_ensemble_members_share_its_budget_unless_they_set_their_own():
    config = AttackConfig("ensemble", {"attacks": ["pgd", ("fgsm", {}), AttackConfig.parse("bim:eps=2")]},
                          eps_frac=8 / 255, seed=3)
    x = torch.linspace(0, 1, 64).reshape(1, 1, 4, 4, 4)
    attack = config.build(ThreatModel(["ZScoreNormalization"]), x)
    eps = [float(m.options["eps"].flatten()[0]) for m in attack.members]
    assert eps == pytest.approx([8 / 255, 8 / 255, 2 / 255])
    assert [m.options["seed"] for m in attack.members] == [3, 3, 3]


def test_ensemble_strings_and_flags():
    config = AttackConfig.parse("ensemble:members=pgd(steps=10)+apgd-ce+segpgd(steps=3),eps=8,seed=1")
    assert [m.label for m in config.members] == ["pgd:steps=10", "apgd-ce", "segpgd:steps=3"]
    assert config.eps_frac == 8 / 255 and config.seed == 1
    flagged = _from_flags(["--attack_name", "ensemble", "--members", "pgd(steps=10)", "apgd-ce", "segpgd(steps=3)",
                           "--eps", "8", "--seed", "1"])
    assert flagged.settings() == config.settings()
    for bad, message in (("ensemble", "needs members"), ("ensemble:members=foo", "unknown attack 'foo'"),
                         ("ensemble:members=pgd,steps=3", "cannot use 'steps=3'")):
        with pytest.raises(UserError, match=message):
            AttackConfig.parse(bad)
