"""progress.png shows the robust pseudo-Dice and recipe panels."""
import numpy as np
from PIL import Image

from nnunet_adv.training.progress import AdversarialLocalLogger


def _log_epochs(logger, n, keys):
    for e in range(n):
        for k in keys:
            logger.log(k, [0.5, 0.4] if k.endswith("per_class_or_region") else float(e + 1), e)


def test_progress_png_has_robust_curve_and_extra_panel(tmp_path):
    logger = AdversarialLocalLogger(extra_panel_keys=("saat_m",))
    _log_epochs(logger, 3, list(logger.my_fantastic_logging))
    logger.plot_progress_png(str(tmp_path))
    png = Image.open(tmp_path / "progress.png")
    # 4 panels of 18 inches at matplotlib's default 100 dpi
    assert png.size == (3000, 7200)
    assert np.asarray(png.convert("L")).std() > 0  # something was drawn


def test_no_plot_until_every_key_has_a_value(tmp_path):
    logger = AdversarialLocalLogger()
    keys = [k for k in logger.my_fantastic_logging if k != "robust_mean_fg_dice"]
    _log_epochs(logger, 1, keys)
    logger.plot_progress_png(str(tmp_path))
    assert not (tmp_path / "progress.png").exists()
    logger.log("robust_mean_fg_dice", 0.3, 0)
    logger.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").exists()


def test_checkpoint_of_a_plain_trainer_gets_our_keys():
    logger = AdversarialLocalLogger()
    logger.load_checkpoint({"mean_fg_dice": [0.1], "train_losses": [1.0]})
    assert logger.my_fantastic_logging["robust_mean_fg_dice"] == []


def test_a_key_the_checkpoint_lacks_is_filled_with_nan_for_its_finished_epochs():
    """Continuing (--c) from a checkpoint written before a key existed: the next epoch's value lands at
    that epoch, not at epoch 0 (nnU-Net's log() appends)."""
    logger = AdversarialLocalLogger(extra_panel_keys=("saat_m",))
    logger.add_keys(["saat_other_grad_magnitude"])
    old = {k: [1.0, 2.0] for k in logger.my_fantastic_logging
           if k not in ("saat_other_grad_magnitude", "robust_mean_fg_dice")}
    logger.load_checkpoint(old)
    for key in ("saat_other_grad_magnitude", "robust_mean_fg_dice"):
        logger.log(key, 3.0, 2)
        assert np.isnan(logger.my_fantastic_logging[key][:2]).all() and logger.my_fantastic_logging[key][2] == 3.0
    assert logger.my_fantastic_logging["saat_m"] == [1.0, 2.0]
