"""The demo's choices and its one-paragraph reading of the report (the pipeline itself runs in the README's
measured demo; its steps are the tested commands)."""
import json

from nnunet_adv.demo.pipeline import CONFIGURATIONS, DEMO_ATTACKS, Demo, DemoRun


def test_cpu_demo_runs_2d_seeded_trainers_and_the_strong_attacks(tmp_path):
    demo = Demo(DemoRun(output=tmp_path / "demo", device="cpu", seed=3))
    assert demo.configuration == "2d" and CONFIGURATIONS["cuda"] == "3d_fullres"
    assert demo.clean_trainer == "nnUNetTrainer_AdvDemoCPU_seed-3"
    assert demo.robust_trainer == "nnUNetTrainerPGDAT_AdvDemoCPU_seed-3"
    import nnunet_adv.trainers as trainers

    robust = getattr(trainers, demo.robust_trainer)
    assert robust.training_seed == 3 and robust.attack_kwargs["steps"] == 3
    assert robust.training_schedule["num_epochs"] * robust.training_schedule["num_iterations_per_epoch"] == 150
    assert [a.split(":")[0] for a in DEMO_ATTACKS] == ["pgd", "apgd-ce", "segpgd", "cospgd", "gn"]
    assert not (tmp_path / "demo").exists()  # nothing is written before execute()


def test_headline_reads_the_worst_case_drop_and_the_recovered_share(tmp_path):
    demo = Demo(DemoRun(output=tmp_path / "demo", device="cpu", seed=0))
    (demo.root / "report").mkdir(parents=True)
    rows = [(demo.clean_trainer, "clean", 0.88), (demo.clean_trainer, "worst case", 0.66),
            (demo.robust_trainer, "clean", 0.86), (demo.robust_trainer, "worst case", 0.80),
            (demo.clean_trainer, "pgd:eps=4,steps=10", 0.70)]
    results = [{"model": m, "attack": a, "foreground_mean": {"Dice": v}, "metric_per_case": [{}, {}, {}, {}]}
               for m, a, v in rows]
    (demo.root / "report" / "summary.json").write_text(json.dumps({"results": results}))
    text = demo.headline()
    assert "falls from 0.880 to 0.660 (-0.220)" in text and "keeps 0.800, recovering 64% of that drop" in text
    assert "clean Dice of 0.860 (-0.020)" in text and "mean over 4 held-out volumes" in text
