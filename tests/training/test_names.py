"""Recipe settings in the trainer name (nnunet_adv.training.names): the grammar, what each key sets,
one-line errors, and classes nnU-Net's lookup and pickle find by name."""
import pickle

import pytest

import nnunet_adv.trainers as trainers
from nnunet_adv.errors import UserError
from nnunet_adv.training.names import settings_of


def test_keys_set_budget_attack_options_schedule_and_recipe_attributes():
    cls = getattr(trainers, "nnUNetTrainerPGDAT_eps-8_steps-5_alphaeps-0.5_ep-20_its-50_lr-1e-3_valsteps-2")
    assert cls.__name__ == "nnUNetTrainerPGDAT_eps-8_steps-5_alphaeps-0.5_ep-20_its-50_lr-1e-3_valsteps-2"
    assert issubclass(cls, trainers.nnUNetTrainerPGDAT)
    assert cls.eps_frac == pytest.approx(8 / 255) and cls.alpha_over_eps == 0.5
    assert cls.attack_kwargs == {"steps": 5, "random_start": True, "norm": "linf"}
    assert cls.training_schedule == {"num_epochs": 20, "num_iterations_per_epoch": 50, "initial_lr": 1e-3}
    assert cls.val_attack_overrides == {"steps": 2}
    assert trainers.nnUNetTrainerPGDAT.eps_frac == pytest.approx(4 / 255)  # the base is untouched
    vaft = getattr(trainers, "nnUNetTrainerVAFT_qmax-10_variant-ref_blocksize-16_fc-0.5")
    assert vaft.attack_kwargs["q_max"] == 10.0 and vaft.attack_kwargs["block_size"] == 16
    assert vaft.vafa_variant == "ref" and vaft.frequency_consistency_weight == 0.5
    saat = getattr(trainers, "nnUNetTrainerSAAT_period-1_gamma-1.2_inner-pgd_epsraw-30")
    assert (saat.saat_check_period, saat.saat_gamma, saat.saat_inner_attack) == (1, 1.2, "pgd")
    assert saat.eps_raw == 30.0 and saat.eps_frac is None


def test_attack_options_whose_default_is_none_are_typed():
    """rescale_tile, tile_mm and q_init default to None, which does not tell their type: they were read
    as text, and the attack refused ``rescaletile-20`` ("got '20'")."""
    vaft = getattr(trainers, "nnUNetTrainerVAFT_variant-ref_rescaletile-20_qinit-5")
    assert vaft.attack_kwargs["rescale_tile"] == 20 and vaft.attack_kwargs["q_init"] == 5.0
    assert getattr(trainers, "nnUNetTrainerVAFT_variant-ref_rescaletile-8x20x20").attack_kwargs["rescale_tile"] \
        == (8, 20, 20)
    assert getattr(trainers, "nnUNetTrainerVAFT_variant-ref_tilemm-192x144.5x144").attack_kwargs["tile_mm"] \
        == (192, 144.5, 144)
    assert getattr(trainers, "nnUNetTrainerVAFT_variant-ref_rescaletile-none").attack_kwargs["rescale_tile"] is None
    with pytest.raises(UserError, match="rescaletile takes tuple values"):
        getattr(trainers, "nnUNetTrainerVAFT_variant-ref_rescaletile-big")


def test_alpha_and_std_in_names_are_deprecated_for_alphaeps_and_stdeps(capsys):
    """alpha on the commands and in attack strings is x/255 of the window; in names it was a multiple
    of eps. The name keys are now alphaeps / stdeps; the old keys keep their meaning, with a note."""
    old = getattr(trainers, "nnUNetTrainerPGDAT_steps-3_alpha-0.833")
    note = capsys.readouterr().err
    assert old.alpha_over_eps == 0.833 and "alpha-0.833 is deprecated, write alphaeps-0.833" in note
    assert len(note.strip().splitlines()) == 1
    new = getattr(trainers, "nnUNetTrainerPGDAT_steps-3_alphaeps-0.833")
    assert new.alpha_over_eps == 0.833 and capsys.readouterr().err == ""
    gn = getattr(trainers, "nnUNetTrainerGNAug_stdeps-2")
    assert gn.std_over_eps == 2.0
    with pytest.raises(UserError, match="set the same setting"):
        getattr(trainers, "nnUNetTrainerPGDAT_alpha-1_alphaeps-1")


def test_one_class_per_name_found_again_by_pickle():
    cls = getattr(trainers, "nnUNetTrainerPGDAT_eps-2")
    assert getattr(trainers, "nnUNetTrainerPGDAT_eps-2") is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


@pytest.mark.parametrize("name, message", [
    ("nnUNetTrainerPGDAT_epz-8", "unknown setting 'epz' for nnUNetTrainerPGDAT; valid keys: adv, alpha"),
    ("nnUNetTrainerPGDAT_eps-x", "eps takes float values"),
    ("nnUNetTrainerPGDAT_randomstart-maybe", "randomstart takes true/false values"),
])
def test_bad_settings_are_one_line_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        getattr(trainers, name)


@pytest.mark.parametrize("name", ["nnUNetTrainerSomethingElse_eps-8", "nnUNetTrainerPGDAT", "nnUNetTrainerPGDATx"])
def test_names_that_are_not_ours_are_left_to_nnunet(name):
    if name == "nnUNetTrainerPGDAT":
        assert getattr(trainers, name) is trainers.nnUNetTrainerPGDAT
        return
    assert not hasattr(trainers, name)


def test_every_recipe_has_the_common_keys():
    for base in ("nnUNetTrainerPGDAT", "nnUNetTrainerVAFT", "nnUNetTrainerSAAT", "nnUNetTrainerDualBN",
                 "nnUNetTrainerNLCE", "nnUNetTrainerFGSMAT", "nnUNetTrainerGNAug"):
        keys = settings_of(getattr(trainers, base))
        assert {"eps", "ep", "its", "lr", "clean", "adv", "valsteps"} <= set(keys), base
