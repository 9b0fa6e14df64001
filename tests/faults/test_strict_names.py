"""Trainer names: a name that starts with one of our recipes is ours, and every way it can be wrong (the
grammar, a key given twice, a value out of range) is our one line when nnU-Net looks it up, never
nnU-Net's "Could not find requested nnunet trainer" traceback nor a run that trains something else;
a refused name leaves no results folder. (That nnUNetv2_train prints such a refusal as one line is
tests/e2e/test_ecosystem.py's test_a_bad_setting_in_the_name_is_one_line.)"""
import pytest
from nnunet_tree import DATASET_ID, DATASET_NAME

pytestmark = [pytest.mark.faults]


@pytest.mark.parametrize("suffix, message", [
    ("eps-8_", "an empty item (a '_' at the end)"),
    ("random_start-true", "cannot read 'random'; items are KEY-VALUE joined by '_', keys have no underscores"),
    ("eps-8__x", "'__' cannot be in a trainer name"),
    ("nokeyvalue", "cannot read 'nokeyvalue'"),
    ("eps-8_eps-4", "eps-8 and eps-4 set the same setting; give it once"),
    ("eps-8_epsraw-30", "eps-8 and epsraw-30 set the same setting"),
    ("lr-nan", "lr-nan: lr must be a finite number > 0"),
    ("ep-0", "ep-0: ep must be >= 1"),
    ("its-0", "its-0: its must be >= 1"),
    ("valits-0", "valits-0: valits must be >= 1"),
    ("seed-4294967296", "seed-4294967296: seed must be an integer in 0..4294967295"),
    ("eps-1e400", "eps-1e400: eps must be a finite number >= 0"),
    ("steps-0", "attack 'pgd': steps must be an integer >= 1, got 0"),
])
def test_a_recipe_name_that_nnunet_looks_up_is_ours_to_refuse(suffix, message):
    """Through nnU-Net's own lookup (as nnUNetv2_train and every predictor do it)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_adv.errors import UserError

    name = f"nnUNetTrainerPGDAT_{suffix}"
    with pytest.raises(UserError) as refused:
        recursive_find_trainer_class_by_name(name)
    assert f"trainer {name!r}: {message}" in str(refused.value)


def test_refused_trainer_names_leave_no_results_folder(nnunet_tree, tmp_path, monkeypatch):
    """Refused at lookup (steps-0) or by the trainer's constructor after nnU-Net made the run's folder and
    training log (epsraw on MRI: raw units need CT channels): nothing is left in nnUNet_results."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_adv.errors import UserError

    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_tree.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(results))
    for name, message in (("nnUNetTrainerPGDAT_steps-0", "steps must be an integer >= 1"),
                          ("nnUNetTrainerPGDAT_epsraw-30", "eps_raw")):
        with pytest.raises(UserError, match=message):
            get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, "nnUNetPlans", device=torch.device("cpu"))
        assert not (results / DATASET_NAME).exists(), sorted(p.name for p in results.rglob("*"))

