"""nnU-Net's progress logging, extended with the curves our trainers add.

nnU-Net's ``LocalLogger.plot_progress_png`` draws a fixed set of curves and offers no
hook, so :class:`AdversarialLocalLogger` redraws its three panels and adds the robust
pseudo-Dice (next to nnU-Net's pseudo-Dice) and, when present, a panel with
recipe-specific per-epoch values (e.g. SAAT's attack iteration count).
"""
from typing import Dict, Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402  (nnU-Net's own plotting style; seaborn comes with nnU-Net)
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

ROBUST_KEYS = ("robust_mean_fg_dice", "robust_ema_fg_dice", "robust_dice_per_class_or_region")


class AdversarialLocalLogger(LocalLogger):
    """LocalLogger with extra per-epoch keys and a progress.png that shows them.

    Args:
        extra_panel_keys: keys drawn in an additional bottom panel (one line each).
    """

    def __init__(self, verbose: bool = False, extra_panel_keys: Sequence[str] = ()):
        super().__init__(verbose)
        self.extra_panel_keys = tuple(extra_panel_keys)
        self.add_keys(ROBUST_KEYS + self.extra_panel_keys)

    def add_keys(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.my_fantastic_logging.setdefault(k, [])

    def load_checkpoint(self, checkpoint: Dict) -> None:
        # nnU-Net replaces the whole log with the checkpoint's. One written before a key existed (a
        # plain nnUNetTrainer's, or ours from an older version) lacks it: fill its finished epochs
        # with NaN, or the next value would be logged as epoch 0 (nnU-Net's log() appends) and every
        # later one misplaced.
        keys = dict.fromkeys(list(self.my_fantastic_logging) + list(ROBUST_KEYS + self.extra_panel_keys))
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging.get("epoch_end_timestamps", []))
        for k in keys:
            values = self.my_fantastic_logging.setdefault(k, [])
            values.extend([float("nan")] * (epochs - len(values)))

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        n_panels = 4 if self.extra_panel_keys else 3
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(n_panels, 1, figsize=(30, 18 * n_panels))

        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=4)
        ax2.plot(x, log["robust_mean_fg_dice"][:epoch + 1], color="m", ls="dotted",
                 label="robust pseudo dice (under attack)", linewidth=3)
        ax2.plot(x, log["robust_ema_fg_dice"][:epoch + 1], color="m", ls="-",
                 label="robust pseudo dice (mov. avg.)", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"], log["epoch_start_timestamps"])]
        ax.plot(x, durations[:epoch + 1], color="b", ls="-", label="epoch duration", linewidth=4)
        ax.set(ylim=[0, ax.get_ylim()[1]])
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc=(0, 1))

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", ls="-", label="learning rate", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))

        if self.extra_panel_keys:
            ax = axes[3]
            for key in self.extra_panel_keys:
                ax.plot(x, log[key][:epoch + 1], ls="-", label=key, linewidth=4)
            ax.set_xlabel("epoch")
            ax.legend(loc=(0, 1))

        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
