"""End to end through nnU-Net's own commands, as a user runs them (subprocesses).

No ``nnUNet_extTrainer`` is set in the environment: our start-up hook must make
``-tr nnUNetTrainerPGDAT*`` resolvable. A second part uses a user's own trainer folder.
"""
import json
import textwrap
from pathlib import Path

import pytest
import torch
from in_process_trainer import make_trainer
from nnunet_tree import DATASET_ID, SHARED_TRAINER, predict_and_check

pytestmark = pytest.mark.e2e

PGD_SHORT = SHARED_TRAINER


def test_train_pgdat_without_any_environment_setup(shared_model):
    tree = shared_model
    assert "nnUNet_extTrainer" not in tree.env
    fold = tree.model_folder(PGD_SHORT) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").is_file()
    debug = json.loads((fold / "debug.json").read_text())
    # every hyper-parameter of the recipe is recorded in the run's debug.json
    for key in ("attack_name", "attack_kwargs", "eps_frac", "alpha_over_eps", "clean_loss_weight",
                "adversarial_loss_weight", "val_attack_overrides"):
        assert key in debug, key
    assert debug["attack_name"] == "pgd"
    assert float(debug["eps_frac"]) == pytest.approx(4 / 255)
    log = sorted(fold.glob("training_log_*.txt"))[0].read_text()  # the training run's (loading the trainer logs too)
    assert "Robust pseudo dice" in log and "Pseudo dice" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == PGD_SHORT
    robust = checkpoint["logging"]["robust_mean_fg_dice"]
    assert len(robust) == 1 and 0.0 <= robust[0] <= 1.0


def test_stock_predict_loads_the_model(shared_model, tmp_path):
    tree = shared_model
    predict_and_check(tree, PGD_SHORT, "3d_fullres", tmp_path / "pred")


def test_predictor_api_and_class_identity(shared_model):
    """nnU-Net's lookup returns our canonical class, also in a spawned process."""
    tree = shared_model
    code = textwrap.dedent(f"""
        import multiprocessing as mp, sys
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunet_adv.trainers import {PGD_SHORT}, nnUNetTrainerPGDAT
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        def lookup(_):
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f
            from nnunet_adv.trainers import {PGD_SHORT} as canonical
            return f("{PGD_SHORT}") is canonical

        if __name__ == "__main__":
            cls = recursive_find_trainer_class_by_name("{PGD_SHORT}")
            assert cls is {PGD_SHORT}, (cls, cls.__module__)
            assert recursive_find_trainer_class_by_name("{PGD_SHORT}") is cls  # twice: still one class
            assert issubclass(cls, nnUNetTrainerPGDAT)
            assert recursive_find_trainer_class_by_name("nnUNetTrainer") is nnUNetTrainer
            with mp.get_context("spawn").Pool(1) as pool:
                assert pool.map(lookup, [0]) == [True]
            p = nnUNetPredictor(device=__import__("torch").device("cpu"))
            p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,), checkpoint_name="checkpoint_final.pth")
            assert p.trainer_name == "{PGD_SHORT}"
            print("OK")
    """)
    script = tree.root / "identity_check.py"
    script.write_text(code)
    proc = tree.run("python", script, tree.model_folder(PGD_SHORT))
    assert proc.stdout.strip().endswith("OK")


USER_TRAINERS = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_adv.trainers import nnUNetTrainerPGDAT, nnUNetTrainerPGDAT_TestShort


class nnUNetTrainer_UserTiny(nnUNetTrainer):
    """A user's own clean trainer (stock nnU-Net subclass) with a tiny schedule."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1


class UserPGDAT(nnUNetTrainerPGDAT_TestShort):
    """A user's subclass of our trainer, living in the user's own folder."""
    eps_frac = 2 / 255


class UserBadEps(nnUNetTrainerPGDAT_TestShort):
    eps_frac = -1.0


class UserZeroSteps(nnUNetTrainerPGDAT_TestShort):
    attack_kwargs = {"steps": 0, "random_start": True, "norm": "linf"}


class UserStringEps(nnUNetTrainerPGDAT_TestShort):
    eps_frac = "4/255"
'''


@pytest.fixture(scope="module")
def user_folder(nnunet_tree, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_trainers")
    (folder / "my_trainers.py").write_text(USER_TRAINERS)
    return {"nnUNet_extTrainer": str(folder)}


def test_user_trainer_folder_and_finetuning_from_a_clean_checkpoint(nnunet_tree, user_folder):
    tree = nnunet_tree
    tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", "nnUNetTrainer_UserTiny", "-device", "cpu",
             extra_env=user_folder)
    clean_ckpt = tree.model_folder("nnUNetTrainer_UserTiny") / "fold_0" / "checkpoint_final.pth"
    assert clean_ckpt.is_file()
    # the user's subclass of our trainer, fine-tuned from the clean model (as the papers do)
    proc = tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", "UserPGDAT", "-device", "cpu",
                    "-pretrained_weights", clean_ckpt, extra_env=user_folder)
    fold = tree.model_folder("UserPGDAT") / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert float(json.loads((fold / "debug.json").read_text())["eps_frac"]) == pytest.approx(2 / 255)
    assert "Using trainer 'UserPGDAT' from" in proc.stdout


def test_a_bad_hyper_parameter_is_one_line_from_nnunetv2_train(nnunet_tree, user_folder):
    trainer = "UserBadEps"
    proc = nnunet_tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-device", "cpu",
                           extra_env=user_folder, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet_adv: UserBadEps: eps must be >= 0 (got -1.0)"), proc.stderr[-2000:]
    assert not (nnunet_tree.model_folder(trainer) / "fold_0" / "checkpoint_final.pth").exists()


@pytest.mark.parametrize("trainer, message", [
    ("UserZeroSteps", "nnunet_adv: UserZeroSteps: attack 'pgd':"),
    ("UserStringEps", "nnunet_adv: UserStringEps: eps_frac must be a number or None, got '4/255' (str)"),
])
def test_other_bad_hyper_parameters_are_refused_as_the_trainer_is_made(nnunet_tree, user_folder, monkeypatch,
                                                                        trainer, message):
    """The same refusal as above (a UserError, which nnUNetv2_train prints as its one line) for the other
    settings, raised where nnUNetv2_train meets it: the user's class made with nnU-Net's arguments."""
    import importlib.util

    from nnunet_adv.errors import UserError

    path = Path(user_folder["nnUNet_extTrainer"]) / "my_trainers.py"
    spec = importlib.util.spec_from_file_location("my_trainers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(UserError) as refused:
        make_trainer(getattr(module, trainer), nnunet_tree, "3d_fullres", None, monkeypatch, seed=None)
    assert str(refused.value).startswith(message)
