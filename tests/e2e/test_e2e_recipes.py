"""The published recipes end to end through nnU-Net's own commands (subprocesses).

Every ``*_TestShort`` recipe trains with ``nnUNetv2_train`` and its model predicts with
``nnUNetv2_predict``; the NLCE and dual-norm recipes are fine-tuned from a clean checkpoint
(``-pretrained_weights``), and an SAAT run that stopped after its second epoch continues with
``--c`` from the state it saved.

The runs use a copy of the shared tree's (tiny-network) plans under another plans name
(``nnUNetPlansTiny``; the same preprocessed data, nnU-Net's full pipeline), so every recipe also
works with ``-p``; most run the 3d_fullres configuration (one 32^3 patch per case).
"""
import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from nnunet_tree import DATASET_ID, DATASET_NAME, predict_and_check, shrink_networks

pytestmark = pytest.mark.e2e

PLANS = "nnUNetPlansTiny"


@pytest.fixture(scope="module")
def tree(nnunet_tree):
    """The shared tree plus a copy of its plans under another name (same data_identifier: same data),
    so that every recipe also runs with ``-p`` naming plans other than nnU-Net's default."""
    shrink_networks(nnunet_tree.preprocessed / DATASET_NAME / "nnUNetPlans.json", PLANS)
    return nnunet_tree


def _model_folder(tree, trainer, configuration):
    return tree.results / DATASET_NAME / f"{trainer}__{PLANS}__{configuration}"


def _train(tree, trainer, configuration, *extra, extra_env=None):
    return tree.run("nnUNetv2_train", DATASET_ID, configuration, 0, "-tr", trainer, "-p", PLANS, "-device", "cpu",
                    *extra, extra_env=extra_env)


def _clean_checkpoint(tree, configuration, trainer_cls, path):
    """A clean model's checkpoint as nnU-Net writes it (only network_weights is read by
    -pretrained_weights): the plain network of ``trainer_cls`` on the tiny plans."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = tree.preprocessed / DATASET_NAME
    plans_manager = PlansManager(str(folder / f"{PLANS}.json"))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    cm = plans_manager.get_configuration(configuration)
    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)
    torch.save({"network_weights": net.state_dict()}, path)
    return net.state_dict()


# (trainer, configuration, clean trainer to fine-tune from or None, expected training-loss terms)
RECIPES = [
    ("nnUNetTrainerVAFT_TestShort", "3d_fullres", None, ("clean", "adv", "fc")),
    ("nnUNetTrainerVAFA_TestShort", "2d", None, ("adv",)),
    # from nnU-Net's default (InstanceNorm) clean model, as nnUNetv2_adv_study fine-tunes it (BatchNorm statistics
    # start fresh); from a BatchNorm model: tests/training/test_recipes.py
    ("nnUNetTrainerDualBN_TestShort", "3d_fullres", "nnUNetTrainer", ("clean", "adv")),
    ("nnUNetTrainerDualNorm_TestShort", "3d_fullres", None, ("clean", "adv")),
    ("nnUNetTrainerNLCE_TestShort", "3d_fullres", "nnUNetTrainer", ("clean",)),
    ("nnUNetTrainerNLCE_VAFT_TestShort", "2d", None, ("clean", "adv", "fc")),
]


@pytest.mark.parametrize("trainer, configuration, finetune_from, terms", RECIPES)
def test_recipe_trains_and_predicts(tree, tmp_path, trainer, configuration, finetune_from, terms):
    extra = []
    clean_state = None
    if finetune_from:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        ckpt = tmp_path / "clean.pth"
        clean_state = _clean_checkpoint(tree, configuration, recursive_find_trainer_class_by_name(finetune_from), ckpt)
        extra = ["-pretrained_weights", ckpt]
    proc = _train(tree, trainer, configuration, *extra)
    fold = _model_folder(tree, trainer, configuration) / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Robust pseudo dice" in log
    logged = re.search(r"train loss terms (\{.*\})", log)
    assert logged and tuple(ast.literal_eval(logged.group(1))) == terms  # exactly these loss terms
    debug = json.loads((fold / "debug.json").read_text())
    assert "network_changes" in debug and "attack_name" in debug
    weights = checkpoint["network_weights"]
    if "Dual" in trainer:
        assert any(".norms.1." in k for k in weights)
    if "NLCE" in trainer:
        assert any(".nlce." in k for k in weights)
    if "VAF" in trainer:
        assert debug["attack_name"] == ("vafa-3d" if configuration == "3d_fullres" else "vafa-2d")
    if clean_state is not None:
        assert "Loading pretrained weights" in proc.stdout and "nnunet_adv: plain norms copied" in proc.stdout
    predict_and_check(tree, trainer, configuration, tmp_path / "pred", PLANS)


STOPPING_SAAT = '''
import os
from nnunet_adv.trainers import nnUNetTrainerSAAT_TestShort


class nnUNetTrainerSAAT_TestShortStops(nnUNetTrainerSAAT_TestShort):
    """SAAT_TestShort that dies after the epoch named in NNUNET_ADV_TEST_STOP_AFTER (a crashed run)."""

    def on_epoch_end(self):
        super().on_epoch_end()
        if os.environ.get("NNUNET_ADV_TEST_STOP_AFTER") == str(self.current_epoch - 1):
            raise SystemExit("simulated crash")
'''


def test_saat_trains_predicts_and_continues_with_its_state(tree, tmp_path):
    """SAAT_TestShort (3 epochs, a decision every epoch) as a run that crashed after its second epoch and
    continued with --c: the state it saved (m = 2) is restored, and the finished run's record is the
    uninterrupted schedule's (SEAT's 1-based epochs: m <- 2 after epoch 1, the threshold after epoch 2,
    the first comparison after epoch 3)."""
    folder = tmp_path / "user_trainers"
    folder.mkdir()
    (folder / "stopping_saat.py").write_text(textwrap.dedent(STOPPING_SAAT))
    env = {"nnUNet_extTrainer": str(folder)}
    stopping = "nnUNetTrainerSAAT_TestShortStops"
    proc = tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", stopping, "-p", PLANS, "-device", "cpu",
                    extra_env={**env, "NNUNET_ADV_TEST_STOP_AFTER": "1"}, check=False)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    fold = _model_folder(tree, stopping, "3d_fullres") / "fold_0"
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2 and latest["saat_state"]["m"] == 2
    assert not (fold / "checkpoint_final.pth").exists()

    proc = _train(tree, stopping, "3d_fullres", "--c", extra_env=env)
    assert "SAAT: restored m = 2" in proc.stdout
    assert "SAAT: 2 attack iteration(s) per batch this epoch" in proc.stdout  # epoch 2 ran with the restored m
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = final["logging"]
    assert logging["saat_m"] == [1, 2, 2]
    mags = logging["saat_grad_magnitude"]
    assert len(mags) == 3 and all(v > 0 for v in mags)
    assert logging["saat_threshold"][:2] == [0.0, pytest.approx(1.1 * mags[1])]
    rose = mags[2] > 1.1 * mags[1]
    assert logging["saat_threshold"][2] == pytest.approx(1.1 * mags[2 if rose else 1])
    assert final["saat_state"]["m"] == (3 if rose else 2)
    assert (fold / "progress.png").is_file()
    # both gradient measures are logged every epoch; SEAT's (perturbation) is ours (input) but 0 on clamped
    # voxels, so never larger; the replay of the logged magnitudes gives the logged m
    other = logging["saat_other_grad_magnitude"]
    assert len(other) == 3 and all(0 < o <= m * (1 + 1e-6) for o, m in zip(other, mags))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "saat_measures.py"
    report = json.loads(subprocess.run([sys.executable, str(script), str(fold)], capture_output=True, text=True,
                                       check=True).stdout)
    assert [e["m"] for e in report["epochs"]] == [1, 2, 2]
    assert [e["other_magnitude"] for e in report["epochs"]] == pytest.approx(other)
    assert report["epochs"][1]["m_by_other"] == 2  # the decision after SEAT's epoch 1 is no comparison
    predict_and_check(tree, stopping, "3d_fullres", tmp_path / "pred", PLANS, extra_env=env)
