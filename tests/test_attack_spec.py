"""Attack strings of nnUNetv2_adv_evaluate ('pgd:eps=4,steps=20') -> nnUNetv2_adv_attack flags."""
import pytest

from nnunet_adv.attack_spec import parse_attack_spec
from nnunet_adv.cli.common import CLIError


@pytest.mark.parametrize("text,argv", [
    ("pgd:eps=4,steps=20", ["--attack_name", "pgd", "--eps", "4", "--steps", "20"]),
    ("vafa-3d:q_max=20,steps=20,block_size=32",  # one block size = every axis (the example)
     ["--attack_name", "vafa-3d", "--q_max", "20", "--steps", "20", "--block_size", "32", "32", "32"]),
    ("vafa-2d:block_size=8", ["--attack_name", "vafa-2d", "--block_size", "8", "8"]),
    ("vafa_3d:block_size=4x8x8,use_ssim_loss=false",
     ["--attack_name", "vafa-3d", "--block_size", "4", "8", "8", "--use_ssim_loss", "false"]),
    ("gn:std=4", ["--attack_name", "gn", "--std", "4"]),
    ("pgd:random_start", ["--attack_name", "pgd", "--random_start"]),  # a flag alone is true
    ("ifgsm-targeted:eps=2,target=0", ["--attack_name", "ifgsm-targeted", "--eps", "2", "--attack_option", "target=0"]),
    ("vafa-3d:temperature=(0.2,1e-20)",  # commas inside brackets belong to the value
     ["--attack_name", "vafa-3d", "--attack_option", "temperature=(0.2,1e-20)"]),
    ("fgsm", ["--attack_name", "fgsm"]),
])
def test_attack_argv(text, argv):
    assert parse_attack_spec(text).attack_argv() == argv


def test_eps_and_tag():
    spec = parse_attack_spec("pgd:eps=0.5,steps=20")
    assert spec.eps == 0.5 and spec.tag == "pgd_eps-0.5_steps-20"
    assert parse_attack_spec("vafa-3d:q_max=20").eps is None
    assert parse_attack_spec("vafa-3d:temperature=(0.2,1e-20)").tag == "vafa-3d_temperature-_0.2_1e-20"


@pytest.mark.parametrize("text,message", [
    ("nope:eps=4", "unknown attack 'nope'"),
    ("pgd:eps=4,stepz=3", "do not apply to attack 'pgd'"),
    ("pgd:eps", "--eps: expected one argument"),
    ("pgd:steps=x", "invalid int value"),
    ("pgd:eps=4,,steps=2", "cannot parse ''"),
    ("pgd:eps=", "cannot parse 'eps='"),
    ("vafa-3d:eps=4", "--eps do not apply to attack 'vafa-3d'"),
    ("vafa-3d:block_size=8x8", "block_size"),
])
def test_bad_strings_name_the_string_and_the_problem(text, message):
    with pytest.raises(CLIError) as e:
        parse_attack_spec(text)
    assert str(e.value).startswith(f"attack {text!r}: ") and message in str(e.value)
