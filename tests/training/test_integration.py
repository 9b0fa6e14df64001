"""The base trainer's plumbing: one-line errors in nnUNetv2_train, checked schedules, checkpoints
with extra recipe state written once and atomically, the pretrained-weights error type."""
import subprocess
import sys

import pytest
import torch
from in_process_trainer import make_trainer
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_adv.errors import UserError
from nnunet_adv.trainers import nnUNetTrainerPGDAT_TestShort, nnUNetTrainerSAAT_TestShort
from nnunet_adv.training.adversarial_trainer import RecipeError
from nnunet_adv.training.pretrained import PretrainedWeightsError, map_pretrained_state_dict


def test_recipe_errors_are_user_errors_not_system_exit():
    error = RecipeError("T", "eps must be >= 0")
    assert isinstance(error, UserError) and isinstance(error, ValueError) and not isinstance(error, SystemExit)
    assert str(error) == "nnunet_adv: T: eps must be >= 0"


def test_an_uncaught_user_error_prints_one_line_and_others_keep_their_traceback():
    code = ("import nnunet_adv.trainers\n"
            "from nnunet_adv.errors import UserError\n"
            "import sys\n"
            "raise UserError('nnunet_adv: T: bad setting') if sys.argv[1] == 'user' else KeyError('other')\n")
    user = subprocess.run([sys.executable, "-c", code, "user"], capture_output=True, text=True)
    assert user.returncode == 1 and user.stderr.strip() == "nnunet_adv: T: bad setting"
    other = subprocess.run([sys.executable, "-c", code, "other"], capture_output=True, text=True)
    assert other.returncode == 1 and "Traceback" in other.stderr and "KeyError" in other.stderr


@pytest.mark.parametrize("schedule, message", [
    ({"num_epoch": 3}, "training_schedule key 'num_epoch' is not a schedule setting; valid keys: num_epochs"),
    ({"num_epochs": "3"}, "training_schedule['num_epochs'] must be a number"),
    ({"num_iterations_per_epoch": 2.5}, "training_schedule['num_iterations_per_epoch'] must be a number"),
])
def test_training_schedule_keys_and_types_are_checked(nnunet_tree, monkeypatch, schedule, message):
    cls = type("BadSchedule", (nnUNetTrainerPGDAT_TestShort,), {"training_schedule": schedule})
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_trainer(cls, nnunet_tree, "2d", None, monkeypatch, initialize=False, seed=None)


def test_checkpoint_has_nnunets_keys_and_the_extra_state_written_once(nnunet_tree, monkeypatch, tmp_path):
    """SAAT's schedule goes into the checkpoint in the same single write as nnU-Net's keys (no
    write-read-write), through a temporary file renamed into place; --c restores it."""
    trainer = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", None, monkeypatch, seed=None)
    trainer.saat.m, trainer.saat.threshold = 3, 1.5
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saves.append(f), real_save(obj, f, *a, **k))[1])
    path = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    files = [f for f in saves if isinstance(f, str)]
    assert files == [f"{path}.tmp"] and not (tmp_path / "checkpoint_latest.pth.tmp").exists()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    stock = {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
             "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert stock <= set(checkpoint) and checkpoint["saat_state"]["m"] == 3

    restored = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", None, monkeypatch, seed=None)
    restored.load_checkpoint(str(path))
    assert restored.saat.m == 3 and restored.saat.threshold == 1.5


def test_a_checkpoint_of_our_trainer_has_every_key_nnunets_own_writes(nnunet_tree, monkeypatch, tmp_path):
    ours = make_trainer(nnUNetTrainerPGDAT_TestShort, nnunet_tree, "2d", None, monkeypatch, seed=None)
    stock = make_trainer(nnUNetTrainer, nnunet_tree, "2d", None, monkeypatch, seed=None)
    ours.save_checkpoint(str(tmp_path / "ours.pth"))
    stock.save_checkpoint(str(tmp_path / "stock.pth"))
    keys = lambda p: set(torch.load(p, map_location="cpu", weights_only=False))  # noqa: E731
    assert keys(tmp_path / "ours.pth") == keys(tmp_path / "stock.pth")


def test_pretrained_weights_that_do_not_fit_raise_one_error_type():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(PretrainedWeightsError, match="is not the same") as e:
        map_pretrained_state_dict(net, {"0.weight": torch.zeros(2, 1, 5, 5), "0.bias": torch.zeros(2)})
    assert isinstance(e.value, AssertionError) and isinstance(e.value, UserError)
    with pytest.raises(PretrainedWeightsError, match="missing in the pretrained"):
        map_pretrained_state_dict(net, {"0.weight": torch.zeros(2, 1, 3, 3)})


def test_seed_in_the_name_makes_the_initial_network_repeatable(nnunet_tree, monkeypatch):
    import nnunet_adv.trainers as trainers

    seeded = getattr(trainers, "nnUNetTrainerPGDAT_TestShort_seed-3")
    assert seeded.training_seed == 3 and nnUNetTrainerPGDAT_TestShort.training_seed is None
    weights = []
    for cls in (seeded, seeded, getattr(trainers, "nnUNetTrainerPGDAT_TestShort_seed-4")):
        torch.manual_seed(len(weights))  # whatever the global state was, the seed decides
        trainer = make_trainer(cls, nnunet_tree, "2d", None, monkeypatch, seed=None)
        weights.append(torch.cat([p.detach().flatten() for p in trainer.network.parameters()]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
