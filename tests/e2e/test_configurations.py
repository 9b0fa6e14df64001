"""Every kind of nnU-Net model a user has, through the stock commands (issue 19): the cascade, an ensemble of
configurations (2d + 3d_fullres), ResEnc plans, and a model exported to a zip and installed.

One module fixture makes what the tests need once: a hand-written plans file with a cascade
(:func:`nnunet_tree.add_cascade`, tiny networks) whose two stages are trained with PGD-AT by the stock
``nnUNetv2_train`` (fold ``all``: nnU-Net's cascade trains on the previous stage's predictions of the
training cases, which its validation writes), and nnU-Net's ResEnc M preset planned by
``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM`` (it shares the nnUNetPlans data), shrunk, its 2d trained
with PGD-AT. The ensemble's members are that ResEnc 2d model and the session's shared nnUNetPlans 3d_fullres
model (an ensemble across plans, as ``nnUNetv2_find_best_configuration -p nnUNetPlans nnUNetResEncUNetMPlans``
selects it; no model is trained twice for it). The exported zip is the shared 3d_fullres model.

The models are trained for two iterations: their Dice is low; what is checked is that the commands run
and that the stock prediction of the exported images gives the report's numbers exactly.
"""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_tree import CASCADE_PLANS, DATASET_ID, DATASET_NAME, SHARED_TRAINER, add_cascade, shrink_networks
from nnunetv2.ensembling.ensemble import entry_point_ensemble_folders
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import predict_entry_point
from nnunetv2.postprocessing.remove_connected_components import (
    entry_point_apply_postprocessing,
    remove_all_but_largest_component_from_segmentation,
)
from nnunetv2.utilities import file_path_utilities
from nnunetv2.utilities.file_path_utilities import get_ensemble_name

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.cli.attack import main as attack_main
from nnunet_adv.cli.evaluate import main as evaluate_main
from nnunet_adv.volume.runner import AttackRun, run_attack

pytestmark = pytest.mark.e2e

RESENC_PLANS = "nnUNetResEncUNetMPlans"
ATTACK = "pgd:eps=4,steps=2"
ATTACK_ZIP = "pgd:eps=4,steps=1"


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
    tree.run("nnUNetv2_train", DATASET_ID, "2d", 0, "-tr", SHARED_TRAINER, "-p", RESENC_PLANS, "-device", "cpu")
    return tree


def _model(tree, configuration, plans=CASCADE_PLANS):
    return tree.results / DATASET_NAME / f"{SHARED_TRAINER}__{plans}__{configuration}"


def _dice(tree, folder, labels=None):
    """nnU-Net's own foreground-mean Dice of a prediction folder against the test labels (or ``labels``)."""
    summary = compute_metrics_on_folder(str(labels or tree.dataset / "labelsTs"), str(folder),
                                        str(folder / "summary.json"), SimpleITKIO(), ".nii.gz", [1, 2], None, 1)
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
    models.set_in_process(monkeypatch)
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
    and -c 3d_cascade_fullres -prev_stage_predictions of the exported images (its entry point, in this
    process): the same Dice."""
    tree, out = models, tmp_path / "report"
    _command(evaluate_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs",
             "-o", out, "-d", DATASET_ID, "-c", "3d_cascade_fullres", "-f", "all", "-tr", SHARED_TRAINER,
             "-p", CASCADE_PLANS, "--attacks", ATTACK, "--disable_tta", "-device", "cpu", "--disable_progress_bar",
             "--no_checks")  # one attack folder: the checks' attacks are tested in test_evaluate_cli.py
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "is a cascade stage" in report and "`softmax`" in report
    adversarial = next((out / "adversarial" / SHARED_TRAINER).iterdir())
    record = json.loads((adversarial / "attack.json").read_text())
    assert record["settings"]["previous_stage"]["gradient"] == "softmax"
    assert record["settings"]["previous_stage"]["model"].endswith("__3d_lowres")
    common = ["-f", "all", "-tr", SHARED_TRAINER, "-p", CASCADE_PLANS, "-d", DATASET_NAME, "-device", "cpu",
              "--disable_tta", "-npp", 0, "-nps", 0]
    low, cascade = tmp_path / "low", tmp_path / "cascade"
    monkeypatch.setattr(file_path_utilities, "nnUNet_results", str(tree.results))  # nnU-Net read it at import
    _stock(monkeypatch, predict_entry_point, "-i", adversarial, "-o", low, "-c", "3d_lowres", *common)
    _stock(monkeypatch, predict_entry_point, "-i", adversarial, "-o", cascade, "-c", "3d_cascade_fullres",
           "-prev_stage_predictions", low, *common)
    ours = _result(summary, ATTACK)["foreground_mean"]["Dice"]
    assert ours == pytest.approx(_dice(tree, cascade), rel=1e-9)
    print(f"cascade: report Dice {ours}, stock 3d_lowres -> 3d_cascade_fullres Dice {_dice(tree, cascade)}")
    # the previous stage held fixed is the other choice; 3d_lowres alone is a configuration like any other
    fixed = _attack(tree, "3d_cascade_fullres", tmp_path / "fixed", previous_stage_gradient="fixed")
    assert fixed["settings"]["previous_stage"]["gradient"] == "fixed"
    assert all(c["previous_stage_gradient"] == "fixed" and c["status"] == "ok" for c in fixed["cases"].values())
    assert "previous_stage" not in _attack(tree, "3d_lowres", tmp_path / "low_attack")["settings"]


def _command(main, tree, monkeypatch, *argv, env=None):
    """A command's ``main(argv)`` in this process (no interpreter start-up) with the tree's nnU-Net folders."""
    tree.set_in_process(monkeypatch, env)
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


def _stock(monkeypatch, entry_point, *argv):
    """A stock nnU-Net command's entry point (what ``nnUNetv2_predict``, ``nnUNetv2_ensemble``,
    ``nnUNetv2_apply_postprocessing`` run) with ``argv``, in this process (no interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [entry_point.__name__, *map(str, argv)])
    entry_point()


def _anisotropic_cases(tree, folder):
    """The test cases with the first made anisotropic: its image's slices (SimpleITK axis 0, z) averaged in
    pairs and its label's every other slice kept, written with twice the z spacing. nnU-Net's ``2d`` keeps a
    case's own z spacing (16 slices) where ``3d_fullres`` resamples it to the plans' 1 mm (32 slices): the
    ensemble's members preprocess it to different grids. The second case stays isotropic (the same grid)."""
    images, labels = folder / "imagesTs", folder / "labelsTs"
    for f in (images, labels):
        f.mkdir(parents=True)
    cases = sorted((tree.dataset / "labelsTs").glob("*.nii.gz"))
    for k, label in enumerate(cases):
        image = tree.dataset / "imagesTs" / label.name.replace(".nii.gz", "_0000.nii.gz")
        for source, target, coarse in ((image, images / image.name, lambda a: (a[0::2] + a[1::2]) / 2),
                                       (label, labels / label.name, lambda a: a[0::2])):
            original = sitk.ReadImage(str(source))
            if k:
                sitk.WriteImage(original, str(target))
                continue
            written = sitk.GetImageFromArray(np.ascontiguousarray(coarse(sitk.GetArrayFromImage(original))))
            written.SetSpacing(original.GetSpacing()[:2] + (2 * original.GetSpacing()[2],))
            written.SetOrigin(original.GetOrigin())
            written.SetDirection(original.GetDirection())
            sitk.WriteImage(written, str(target))
    return images, labels, cases[0].name[:-len(".nii.gz")]


def test_an_ensemble_of_configurations_is_attacked_and_evaluated_as_nnunet_ensembles_it(models, tmp_path,
                                                                                         monkeypatch):
    """What nnUNetv2_find_best_configuration writes for an ensemble of 2d and 3d_fullres (members, folds, a
    postprocessing file of nnU-Net's format; a tiny ResEnc 2d and the nnUNetPlans 3d_fullres model) on a case
    the members preprocess to different grids (:func:`_anisotropic_cases`): nnUNetv2_adv_evaluate
    --inference_information attacks it through both members (the 3d_fullres member through linear resampling
    from the 2d member's grid), the raw budget holds, and the report's Dice is what nnUNetv2_predict
    --save_probabilities per member, nnUNetv2_ensemble and nnUNetv2_apply_postprocessing give on the same
    adversarial images.

    The inference_information.json is written by hand, with the keys and places of the real tool's file: running
    ``nnUNetv2_find_best_configuration 901 -c 2d 3d_fullres -p nnUNetResEncUNetMPlans -tr ... -f 0`` on models
    like these (trained with ``--npz``) took 39 s on the shared 2-core test machine (its spawned pools and
    postprocessing search), over this module's budget, and on models trained for two iterations it selected the
    single 3d_fullres model (cross-validation Dice 0.209 vs 0.162 for the ensemble)."""
    tree = models
    results = tree.results / DATASET_NAME
    member_plans = {"2d": RESENC_PLANS, "3d_fullres": "nnUNetPlans"}
    members = [{"configuration": c, "trainer": SHARED_TRAINER, "plans_identifier": p} for c, p in member_plans.items()]
    folders = [str(_model(tree, c, p)) for c, p in member_plans.items()]
    pp_file = results / "ensembles" / get_ensemble_name(*folders, (0,)) / "postprocessing.pkl"  # nnU-Net's place
    pp_file.parent.mkdir(parents=True, exist_ok=True)
    pp_file.write_bytes(pickle.dumps(([remove_all_but_largest_component_from_segmentation],
                                      [{"labels_or_regions": 1, "background_label": 0}])))
    (results / "inference_information.json").write_text(json.dumps({
        "folds": [0], "dataset_name_or_id": str(DATASET_ID),
        "best_model_or_ensemble": {"postprocessing_file": str(pp_file), "selected_model_or_models": members,
                                   "some_plans_file": str(_model(tree, "2d", RESENC_PLANS) / "plans.json")}}))
    images, labels, coarse = _anisotropic_cases(tree, tmp_path / "anisotropic")
    out = tmp_path / "report"
    _command(evaluate_main, tree, monkeypatch, "-i", images, "-l", labels, "-o", out, "-d", DATASET_ID,
             "--inference_information", "--attacks", ATTACK, "--disable_tta", "-device", "cpu",
             "--disable_progress_bar", "--no_checks")
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "its numbers are the ensemble's" in report and "reached through linear resampling" in report
    # the name keeps what differs between the members: plans and configuration
    adversarial = next((out / "adversarial" / f"ensemble_{RESENC_PLANS}__2d+nnUNetPlans__3d_fullres").iterdir())
    record = json.loads((adversarial / "attack.json").read_text())
    assert [Path(m).name for m in record["settings"]["ensemble_members"]] == [_model(tree, "3d_fullres",
                                                                                     "nnUNetPlans").name]
    assert record["settings"]["ensemble_other_grids"] == "linear resampling"
    attack_grid, other = record["cases"][coarse]["ensemble_grids"]
    assert attack_grid["member"].endswith("__2d") and other["member"].endswith("__3d_fullres")
    assert other["network_shape"][0] == 2 * attack_grid["network_shape"][0]  # the coarse axis, resampled
    assert other["reached_through"] == f"linear resampling from the attack grid {attack_grid['network_shape']}"
    assert [g["reached_through"] for c, r in record["cases"].items() if c != coarse
            for g in r["ensemble_grids"][1:]] == ["same grid"]
    for case, rec in record["cases"].items():  # the raw budget, in the images as written
        clean, adv = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / f"{case}_0000.nii.gz"))) for f in
                      (images, adversarial))
        moved = np.abs(adv.astype(np.float64) - clean)
        assert 0 < moved.max() <= rec["eps_raw"][0] * (1 + 1e-6), case
    stock = []
    monkeypatch.setattr(file_path_utilities, "nnUNet_results", str(tree.results))  # nnU-Net read it at import
    for c, p in member_plans.items():
        stock.append(tmp_path / c)
        _stock(monkeypatch, predict_entry_point, "-i", adversarial, "-o", stock[-1], "-d", DATASET_NAME, "-c", c,
               "-tr", SHARED_TRAINER, "-p", p, "-f", 0, "-device", "cpu", "--disable_tta", "-npp", 0,
               "-nps", 0, "--save_probabilities")
    _stock(monkeypatch, entry_point_ensemble_folders, "-i", *stock, "-o", tmp_path / "ensemble", "-np", 1)
    _stock(monkeypatch, entry_point_apply_postprocessing, "-i", tmp_path / "ensemble", "-o", tmp_path / "pp",
           "-pp_pkl_file", pp_file, "-np", 1, "-plans_json", _model(tree, "2d", RESENC_PLANS) / "plans.json")
    ours = _result(summary, ATTACK)["foreground_mean"]["Dice"]
    assert ours == pytest.approx(_dice(tree, tmp_path / "pp", labels), rel=1e-9)
    assert ours != pytest.approx(_dice(tree, tmp_path / "3d_fullres", labels), rel=1e-9)  # not one member's
    print(f"ensemble on the anisotropic cases: report Dice {ours}, nnUNetv2_ensemble Dice "
          f"{_dice(tree, tmp_path / 'pp', labels)}; grids {attack_grid['network_shape']} (2d) and "
          f"{other['network_shape']} (3d_fullres)")


def test_resenc_plans_train_a_recipe_and_are_attacked(models, tmp_path, monkeypatch):
    """-p nnUNetResEncUNetMPlans: PGD-AT trained on nnU-Net's ResEnc M preset (tiny, 2d), attacked and predicted."""
    tree, out = models, tmp_path / "adv"
    plans = json.loads((_model(tree, "2d", RESENC_PLANS) / "plans.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    _command(attack_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-o", out, "-l",
             tree.dataset / "labelsTs", "-d", DATASET_ID, "-c", "2d", "-f", 0, "-tr", SHARED_TRAINER,
             "-p", RESENC_PLANS, "--steps", 2, "-device", "cpu", "--disable_progress_bar")
    record = json.loads((out / "attack.json").read_text())
    assert record["model"]["plans"] == RESENC_PLANS
    assert all(c["status"] == "ok" and c["loss_adv"] > c["loss_clean"] for c in record["cases"].values())


RECIPES = ("nnUNetTrainerPGDAT", "nnUNetTrainerFGSMAT", "nnUNetTrainerGNAug", "nnUNetTrainerVAFT", "nnUNetTrainerVAFA",
           "nnUNetTrainerSAAT", "nnUNetTrainerDualBN", "nnUNetTrainerDualNorm", "nnUNetTrainerNLCE",
           "nnUNetTrainerNLCE_VAFT")


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_every_recipe_builds_its_network_from_resenc_plans(models, configuration):
    """Each recipe's network (what nnUNetv2_train and the predictors build through
    build_network_architecture) from the ResEnc preset: a ResidualEncoderUNet with the recipe's changes
    (NLCE modules, dual norms) that runs on half a patch."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_adv.trainers as recipes
    from nnunet_adv.modules.nlce import NLCE

    plans = PlansManager(json.loads((models.preprocessed / DATASET_NAME / f"{RESENC_PLANS}.json").read_text()))
    manager = plans.get_configuration(configuration)
    x = torch.randn(1, 1, *[p // 2 for p in manager.patch_size])
    for name in RECIPES:
        network = getattr(recipes, name).build_network_architecture(plans, manager, 1, 3,
                                                                    enable_deep_supervision=False)
        assert type(network).__name__ == "ResidualEncoderUNet", name
        assert ("NLCE" in name) == any(isinstance(m, NLCE) for m in network.modules()), name
        with torch.no_grad():
            assert network(x).shape == (1, 3, *x.shape[2:]), name


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
             "-o", out, "-m", installed, "-f", 0, "--attacks", ATTACK_ZIP, "--disable_tta", "-device", "cpu",
             "--disable_progress_bar", "--no_checks", env=other)
    summary = json.loads((out / "summary.json").read_text())
    clean = _result(summary, "clean")
    assert clean["foreground_mean"]["Dice"] == pytest.approx(_dice(tree, out / clean["prediction_folder"]), rel=1e-9)
    print(f"installed zip: clean Dice {clean['foreground_mean']['Dice']} (nnU-Net's "
          f"{_dice(tree, out / clean['prediction_folder'])}), {ATTACK_ZIP} "
          f"{_result(summary, ATTACK_ZIP)['foreground_mean']['Dice']}")
    attacked = tmp_path / "adv"
    _command(attack_main, tree, monkeypatch, "-i", tree.dataset / "imagesTs", "-o", attacked, "-d", DATASET_ID,
             "-c", "3d_fullres", "-tr", SHARED_TRAINER, "-p", "nnUNetPlans", "-f", 0, "--steps", 1, "-device", "cpu",
             "--disable_progress_bar", env=other)
    assert json.loads((attacked / "attack.json").read_text())["model"]["folder"] == str(installed.resolve())


def test_a_cascade_without_its_previous_stage_is_one_line(models, tmp_path, monkeypatch, capsys):
    """The cascade stage alone (its 3d_lowres model missing): the attack and the evaluation stop with one line
    naming what is missing, before any model loads."""
    results = tmp_path / "results" / DATASET_NAME
    cascade = results / _model(models, "3d_cascade_fullres").name
    (cascade / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (cascade / name).write_bytes((_model(models, "3d_cascade_fullres") / name).read_bytes())
    (cascade / "fold_all" / "checkpoint_final.pth").write_bytes(b"")
    other = {"nnUNet_results": str(tmp_path / "results")}
    expected = ("3d_cascade_fullres needs the 3d_lowres model of the same trainer and plans",
                f"{SHARED_TRAINER}__{CASCADE_PLANS}__3d_lowres")
    for main, extra in ((attack_main, ["-o", tmp_path / "adv"]),
                        (evaluate_main, ["-o", tmp_path / "report", "-l", models.dataset / "labelsTs",
                                         "--attacks", ATTACK])):
        models.set_in_process(monkeypatch, other)
        assert main([str(a) for a in ["-i", models.dataset / "imagesTs", *extra, "-d", DATASET_ID, "-c",
                                      "3d_cascade_fullres", "-f", "all", "-tr", SHARED_TRAINER, "-p", CASCADE_PLANS,
                                      "-device", "cpu"]]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and all(text in lines[0] for text in expected), lines
