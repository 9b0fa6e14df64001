"""Every kind of nnU-Net model a user has, through the stock commands (issue 19): the cascade
(``3d_lowres`` -> ``3d_cascade_fullres``), ResEnc plans, and a model exported to a zip and installed.

One module fixture makes what the tests need once: a hand-written plans file with a cascade
(:func:`nnunet_tree.add_cascade`, tiny networks) whose two stages are trained with PGD-AT by the stock
``nnUNetv2_train`` (fold ``all``: nnU-Net's cascade trains on the previous stage's predictions of the
training cases, which its validation writes), and nnU-Net's ResEnc M preset planned by
``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM`` (it shares the nnUNetPlans data), shrunk and trained
with PGD-AT. The exported zip is the session's shared 3d_fullres model.

The models are trained for two iterations: their Dice is low; what is checked is that the commands run
and that the stock prediction of the exported images gives the report's numbers exactly.
"""
import json

import pytest
import torch
from nnunet_tree import CASCADE_PLANS, DATASET_ID, DATASET_NAME, SHARED_TRAINER, add_cascade, shrink_networks
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.cli.attack import main as attack_main
from nnunet_adv.cli.evaluate import main as evaluate_main
from nnunet_adv.volume.runner import AttackRun, run_attack

pytestmark = pytest.mark.e2e

RESENC_PLANS = "nnUNetResEncUNetMPlans"
ATTACK = "pgd:eps=4,steps=2"


@pytest.fixture(scope="module")
def models(shared_model):
    tree = shared_model
    add_cascade(tree)
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        tree.run("nnUNetv2_train", DATASET_ID, configuration, "all", "-tr", SHARED_TRAINER, "-p", CASCADE_PLANS,
                 "-device", "cpu")
    tree.run("nnUNetv2_plan_experiment", "-d", DATASET_ID, "-pl", "nnUNetPlannerResEncM",
             extra_env={"nnUNet_n_proc_DA": "1"})
    shrink_networks(tree.preprocessed / DATASET_NAME / f"{RESENC_PLANS}.json")
    tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", SHARED_TRAINER, "-p", RESENC_PLANS,
             "-device", "cpu")
    return tree


def _model(tree, configuration, plans=CASCADE_PLANS):
    return tree.results / DATASET_NAME / f"{SHARED_TRAINER}__{plans}__{configuration}"


def _dice(tree, folder):
    """nnU-Net's own foreground-mean Dice of a prediction folder against the test labels."""
    summary = compute_metrics_on_folder(str(tree.dataset / "labelsTs"), str(folder), str(folder / "summary.json"),
                                        SimpleITKIO(), ".nii.gz", [1, 2], None, 1)
    return summary["foreground_mean"]["Dice"]


def _result(summary, attack):
    return next(r for r in summary["results"] if r["attack"] == attack and r.get("crafted_on") in (None, r["model"]))


def test_pgdat_trains_the_cascade_and_never_perturbs_the_previous_stage(models, monkeypatch):
    """The cascade network reads 1 image + 2 previous-stage channels; the trainer's attack moves the image
    channel within its budget and returns the previous stage's one-hot channels bit for bit."""
    from nnunet_adv.trainers import nnUNetTrainerPGDAT_TestShort

    folder = _model(models, "3d_cascade_fullres")
    weights = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    first_conv = next(v for k, v in weights["network_weights"].items() if k.endswith("weight") and v.ndim == 5)
    assert first_conv.shape[1] == 3  # nnUNetv2_train trained it on image + previous stage
    for var, path in (("nnUNet_raw", models.raw), ("nnUNet_preprocessed", models.preprocessed),
                      ("nnUNet_results", models.results)):
        monkeypatch.setenv(var, str(path))
    plans = dict(json.loads((folder / "plans.json").read_text()), continue_training=False)  # as nnUNetv2_train
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = nnUNetTrainerPGDAT_TestShort(plans, "3d_cascade_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.enable_deep_supervision = False
    trainer.initialize()
    assert trainer.threat_model.num_channels == 1 and trainer.threat_model.previous_stage_channels == 2
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=generator)
    one_hot = torch.cat([(labels == k).float() for k in (1, 2)], 1)
    data = torch.cat([image, one_hot], 1)
    x_adv = trainer.craft_adversarial(data, labels)
    assert torch.equal(x_adv[:, 1:], data[:, 1:])  # the previous stage's channels: untouched
    eps = trainer.threat_model.budget(image, eps_frac=trainer.eps_frac).eps
    moved = (x_adv[:, :1] - image).abs()
    assert moved.max() > 0 and bool((moved <= eps + 1e-6).all())


def test_cascade_is_attacked_as_deployed_and_stock_prediction_gives_the_report_dice(models, tmp_path, monkeypatch):
    """nnUNetv2_adv_evaluate on the cascade (softmax surrogate), then the stock nnUNetv2_predict -c 3d_lowres
    and -c 3d_cascade_fullres -prev_stage_predictions of the exported images: the same Dice."""
    tree, out = models, tmp_path / "report"
    _command(evaluate_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs",
             "-o", out, "-d", DATASET_ID, "-c", "3d_cascade_fullres", "-f", "all", "-tr", SHARED_TRAINER,
             "-p", CASCADE_PLANS, "--attacks", ATTACK, "--disable_tta", "-device", "cpu", "--disable_progress_bar")
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "is a cascade stage" in report and "`softmax`" in report
    adversarial = next((out / "adversarial" / SHARED_TRAINER).iterdir())
    record = json.loads((adversarial / "attack.json").read_text())
    assert record["settings"]["previous_stage"]["gradient"] == "softmax"
    assert record["settings"]["previous_stage"]["model"].endswith("__3d_lowres")
    common = ["-f", "all", "-tr", SHARED_TRAINER, "-p", CASCADE_PLANS, "-d", DATASET_ID, "-device", "cpu",
              "--disable_tta", "-npp", 0, "-nps", 0]
    low, cascade = tmp_path / "low", tmp_path / "cascade"
    tree.run("nnUNetv2_predict", "-i", adversarial, "-o", low, "-c", "3d_lowres", *common)
    tree.run("nnUNetv2_predict", "-i", adversarial, "-o", cascade, "-c", "3d_cascade_fullres",
             "-prev_stage_predictions", low, *common)
    ours = _result(summary, ATTACK)["foreground_mean"]["Dice"]
    assert ours == pytest.approx(_dice(tree, cascade), rel=1e-9)
    # the previous stage held fixed is the other choice; 3d_lowres alone is a configuration like any other
    fixed = _attack(tree, "3d_cascade_fullres", tmp_path / "fixed", previous_stage_gradient="fixed")
    assert fixed["settings"]["previous_stage"]["gradient"] == "fixed"
    assert all(c["previous_stage_gradient"] == "fixed" and c["status"] == "ok" for c in fixed["cases"].values())
    assert "previous_stage" not in _attack(tree, "3d_lowres", tmp_path / "low_attack")["settings"]


def _command(main, tree, monkeypatch, *argv, env=None):
    """A command's ``main(argv)`` in this process (no interpreter start-up) with the tree's nnU-Net folders."""
    for key, value in {**tree.env, **(env or {})}.items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    assert main([str(a) for a in argv]) == 0


def _attack(tree, configuration, out, plans=CASCADE_PLANS, **options):
    """The batch behind nnUNetv2_adv_attack, in this process (one PGD step, the test labels); attack.json."""
    result = run_attack(AttackRun(attack=AttackConfig.from_options("pgd", [("steps", "1")]),
                                  model_folder=_model(tree, configuration, plans), folds=["all"],
                                  checkpoint="checkpoint_final.pth", input_folder=tree.dataset / "imagesTs",
                                  output_folder=out, labels_folder=tree.dataset / "labelsTs", progress=False,
                                  **options), log=lambda line: None)
    assert not result.failed
    return result.report


def test_resenc_plans_train_a_recipe_and_are_attacked(models, tmp_path, monkeypatch):
    """-p nnUNetResEncUNetMPlans: PGD-AT trained on nnU-Net's ResEnc M preset (tiny), attacked and predicted."""
    tree, out = models, tmp_path / "adv"
    plans = json.loads((_model(tree, "3d_fullres", RESENC_PLANS) / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    _command(attack_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-o", out, "-l",
             tree.dataset / "labelsTs", "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", SHARED_TRAINER,
             "-p", RESENC_PLANS, "--steps", 2, "-device", "cpu", "--disable_progress_bar")
    record = json.loads((out / "attack.json").read_text())
    assert record["model"]["plans"] == RESENC_PLANS
    assert all(c["status"] == "ok" and c["loss_adv"] > c["loss_clean"] for c in record["cases"].values())


def test_an_exported_zip_is_installed_attacked_and_evaluated(models, tmp_path, monkeypatch):
    """nnUNetv2_export_model_to_zip of the shared model, nnUNetv2_install_pretrained_model_from_zip into
    another nnUNet_results: evaluated with -m and attacked with -d/-c/-tr/-p there."""
    tree, archive = models, tmp_path / "model.zip"
    tree.run("nnUNetv2_export_model_to_zip", "-d", DATASET_ID, "-o", archive, "-c", "3d_fullres", "-tr", SHARED_TRAINER,
             "-p", "nnUNetPlans", "-f", 0)
    other = {"nnUNet_results": str(tmp_path / "installed")}
    tree.run("nnUNetv2_install_pretrained_model_from_zip", archive, extra_env=other)
    installed = tmp_path / "installed" / DATASET_NAME / f"{SHARED_TRAINER}__nnUNetPlans__3d_fullres"
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file()
    out = tmp_path / "report"
    _command(evaluate_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs",
             "-o", out, "-m", installed, "-f", 0, "--attacks", "pgd:eps=4,steps=1", "--disable_tta", "-device", "cpu",
             "--disable_progress_bar", env=other)
    summary = json.loads((out / "summary.json").read_text())
    clean = _result(summary, "clean")
    assert clean["foreground_mean"]["Dice"] == pytest.approx(_dice(tree, out / clean["prediction_folder"]), rel=1e-9)
    attacked = tmp_path / "adv"
    _command(attack_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-o", attacked, "-d", DATASET_ID,
             "-c", "3d_fullres", "-tr", SHARED_TRAINER, "-p", "nnUNetPlans", "-f", 0, "--steps", 1, "-device", "cpu",
             "--disable_progress_bar", env=other)
    assert json.loads((attacked / "attack.json").read_text())["model"]["folder"] == str(installed.resolve())
