"""The adversarial base trainer: nnU-Net's trainer plus an attack in every training step.

A recipe (PGD-AT, FGSM-AT, GN augmentation, VAFT, ...) is a subclass that only sets
class attributes: which attack with which options, the budget, the loss weights and the
network changes (``network_changes``, applied in ``build_network_architecture``, which
nnU-Net's predictor also calls), plus, where needed, small hooks (``configure_attack``,
``attack_context``, ``forward_context``, ``extra_loss_terms``). Every attribute below is a
hyper-parameter; nnU-Net's ``debug.json`` records all of them for each run.

Per training step (``train_step``):
  1. the batch (already augmented by nnU-Net) is attacked against the current weights,
     on the unwrapped network (no DDP reducer, no compiled wrapper), in eval mode unless
     ``attack_in_train_mode``, in fp32 (CUDA autocast off) with input gradients only, so
     parameter gradients are untouched;
  2. loss = clean_loss_weight * L(f(x), y) + adversarial_loss_weight * L(f(x_adv), y)
     (+ any terms a recipe adds in :meth:`extra_loss_terms`), clean and adversarial
     inputs going through the network in one forward pass (one DDP forward per step);
  3. backward, gradient clipping and the optimiser step exactly as nnU-Net does them.

Validation additionally attacks each validation batch (``val_attack_overrides``, e.g.
fewer steps) under ``torch.enable_grad()`` and logs a robust pseudo-Dice next to
nnU-Net's pseudo-Dice (training log and progress.png).
"""
from __future__ import annotations

import copy
import io
import numbers
import os
import random
import shutil
from contextlib import nullcontext
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, distributed as dist, nn

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import attack_defaults
from nnunet_adv.errors import UserError
from nnunet_adv.network import WithPreviousStage, network_mode, unwrap_network
from nnunet_adv.outputs import split_batch
from nnunet_adv.threat_model import ThreatModel, ThreatModelError
from nnunet_adv.training.pretrained import KEEP_HEADS_ATTRIBUTE
from nnunet_adv.training.progress import AdversarialLocalLogger


def _existing_run_folders(trainer: str, plans: dict, configuration: str, fold) -> set:
    """Which of the run's folders (nnU-Net's ``results/DATASET``, ``.../TRAINER__PLANS__CONFIG`` and
    its ``fold_X``, as nnUNetTrainer names them) exist before nnU-Net's constructor makes them."""
    if not nnUNet_results.is_set():
        return set()
    dataset = os.path.join(nnUNet_results.get(), plans["dataset_name"])
    base = os.path.join(dataset, f"{trainer}__{plans['plans_name']}__{configuration}")
    return {f for f in (dataset, base, os.path.join(base, f"fold_{fold}")) if os.path.isdir(f)}


class RecipeError(UserError):
    """An invalid trainer setting (``nnUNetv2_train`` prints it as one line, see
    :mod:`nnunet_adv.training.integration`)."""

    def __init__(self, trainer: str, message: str):
        super().__init__(f"nnunet_adv: {trainer}: {message}")


#: nnU-Net trainer attributes a ``training_schedule`` may set
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every",
                 "initial_lr", "weight_decay", "oversample_foreground_percent", "probabilistic_oversampling")


class nnUNetTrainerAdversarial(nnUNetTrainer):
    """nnU-Net trainer with an attack in the training step and robust validation."""

    # ---- the attack (see nnunet_adv.attacks.available_attacks()) ----
    attack_name: str = "pgd"
    attack_kwargs: dict = {"steps": 10, "random_start": True, "norm": "linf"}
    eps_frac: Optional[float] = 4 / 255   # L-inf radius, fraction of each channel's intensity window
    eps_raw: Optional[float] = None       # or in raw intensity units (CT channels only: HU)
    alpha_over_eps: Optional[float] = 2.5 / 10  # step size as a multiple of eps (None: attack default)
    std_over_eps: Optional[float] = None  # Gaussian-noise std as a multiple of eps (gn recipes)
    attack_in_train_mode: bool = False    # craft against the network in eval mode (VAFA/VAFT, dual BN)
    attack_uses_training_loss: bool = True  # attack nnU-Net's (deep-supervision) Dice+CE, else CE on output 0

    # ---- the loss ----
    clean_loss_weight: float = 0.0
    adversarial_loss_weight: float = 1.0

    # ---- validation ----
    robust_validation: bool = True
    val_attack_overrides: dict = {"steps": 5}

    # ---- schedule (None keeps nnU-Net's: 1000 epochs of 250 iterations) ----
    training_schedule: Optional[dict] = None
    # seeds Python, NumPy and torch when the trainer is created (network init, data order, augmentation);
    # None keeps nnU-Net's unseeded runs. Repeatable with nnUNet_n_proc_DA=0 (worker processes draw their own)
    training_seed: Optional[int] = None

    # keys drawn in an extra progress.png panel (recipes with per-epoch state, e.g. SAAT)
    progress_panel_keys: tuple = ()

    # ---- the network (nnunet_adv.training.network_changes: NLCE, dual norm, BatchNorm, ...) ----
    network_changes: tuple = ()  # applied in order by build_network_architecture (also at prediction)
    # -pretrained_weights keeps the checkpoint's segmentation heads (fine-tuning the same task)
    keep_segmentation_heads: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.training_seed is not None:
            seed_everything(int(self.training_seed))
        existed = _existing_run_folders(type(self).__name__, plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            self._apply_schedule()
            self.logger.local_logger = AdversarialLocalLogger(extra_panel_keys=self.progress_panel_keys)
            try:
                self.threat_model = ThreatModel.from_managers(self.plans_manager, self.configuration_manager,
                                                              self.label_manager)
            except ThreatModelError as e:
                raise RecipeError(type(self).__name__, str(e)) from None
            self.configure_attack()
            self._check_recipe()
        except RecipeError:
            self._remove_what_init_created(existed)
            raise

    def _remove_what_init_created(self, existed: set) -> None:
        """A refused setting leaves nothing behind: nnU-Net's constructor has already made the run's
        folders and its training log; remove the folders that did not exist before, else the log."""
        if self.output_folder is None:
            return
        for folder in (os.path.dirname(self.output_folder_base), self.output_folder_base, self.output_folder):
            if folder not in existed:
                shutil.rmtree(folder, ignore_errors=True)
                return
        if os.path.isfile(self.log_file):
            os.remove(self.log_file)

    # ------------------------------------------------------------------ the network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's network with the recipe's ``network_changes`` applied in order.

        nnU-Net calls this for training and its predictor calls it (on the class) to rebuild
        a trained network, so every architecture change lives here and checkpoints load
        strictly. Without changes it is exactly the parent's network.
        """
        changes = tuple(cls.network_changes)
        if changes:
            # arch_kwargs edits go to a copy: the trainer's plans (saved as plans.json) stay untouched
            configuration = copy.deepcopy(configuration_manager.configuration)
            arch_kwargs = configuration["architecture"]["arch_kwargs"]
            for change in changes:
                arch_kwargs = change.update_arch_kwargs(arch_kwargs)
            configuration["architecture"]["arch_kwargs"] = arch_kwargs
            configuration_manager = ConfigurationManager(configuration)
        network = super(nnUNetTrainerAdversarial, cls).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        for change in changes:
            network = change.apply(network)
        setattr(network, KEEP_HEADS_ATTRIBUTE, bool(cls.keep_segmentation_heads))
        return network

    # ------------------------------------------------------------------ configuration
    def _apply_schedule(self) -> None:
        """Set ``training_schedule``'s nnU-Net attributes; an unknown key or a wrong type is a
        one-line error (a typo would otherwise silently train nnU-Net's default schedule)."""
        schedule = self.training_schedule or {}
        if not isinstance(schedule, dict):
            raise RecipeError(type(self).__name__, f"training_schedule must be a dict, got {type(schedule).__name__}")
        for key, value in schedule.items():
            if key not in SCHEDULE_KEYS:
                raise RecipeError(type(self).__name__, f"training_schedule key {key!r} is not a schedule setting; "
                                                       f"valid keys: {', '.join(SCHEDULE_KEYS)}")
            current = getattr(self, key)
            if isinstance(current, bool) != isinstance(value, bool) or \
                    not isinstance(value, (int, float)) or (isinstance(current, int) and not isinstance(value, int)):
                raise RecipeError(type(self).__name__, f"training_schedule[{key!r}] must be a number of the type of "
                                                       f"nnU-Net's default ({type(current).__name__}), got {value!r}")
            setattr(self, key, value)

    @property
    def trains_adversarially(self) -> bool:
        return self.adversarial_loss_weight > 0

    def _check_recipe(self) -> None:
        """Validate the class attributes once, with one-line errors."""
        name = type(self).__name__
        for attr, optional in (("eps_frac", True), ("eps_raw", True), ("alpha_over_eps", True), ("std_over_eps", True),
                               ("clean_loss_weight", False), ("adversarial_loss_weight", False)):
            value = getattr(self, attr)
            if (value is None and not optional) or (value is not None and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real))):
                raise RecipeError(name, f"{attr} must be a number{' or None' if optional else ''}, got "
                                        f"{value!r} ({type(value).__name__})")
        for attr, kind in (("attack_name", str), ("attack_kwargs", dict), ("val_attack_overrides", dict)):
            if not isinstance(getattr(self, attr), kind):
                raise RecipeError(name, f"{attr} must be a {kind.__name__}, got {getattr(self, attr)!r}")
        if (self.eps_frac is None) == (self.eps_raw is None):
            raise RecipeError(name, "set exactly one of eps_frac and eps_raw")
        eps = self.eps_frac if self.eps_frac is not None else self.eps_raw
        if not eps >= 0:
            raise RecipeError(name, f"eps must be >= 0 (got {eps})")
        for attr in ("clean_loss_weight", "adversarial_loss_weight", "alpha_over_eps", "std_over_eps"):
            value = getattr(self, attr)
            if value is not None and not value >= 0:
                raise RecipeError(name, f"{attr} must be >= 0 (got {value})")
        if self.clean_loss_weight + self.adversarial_loss_weight <= 0:
            raise RecipeError(name, "clean_loss_weight + adversarial_loss_weight must be > 0")
        # build both attacks once on a dummy budget so bad options fail now, not mid-epoch
        dummy = torch.zeros((1, self.threat_model.num_channels) + (4,) * len(self.configuration_manager.patch_size))
        try:
            if self.eps_raw is not None:
                self.threat_model.budget(dummy, eps_raw=self.eps_raw)
            self._build_attack(dummy, {})
            if self.robust_validation:
                self._build_attack(dummy, self.val_attack_overrides)
        except (ValueError, TypeError) as e:
            raise RecipeError(name, f"attack {self.attack_name!r}: {e}") from None

    def configure_attack(self) -> None:
        """Hook, called before the recipe is validated: adapt the attack to the configuration
        (e.g. VAFT picks ``vafa-2d``/``vafa-3d`` and a block size that fits the patch). Values set
        here as instance attributes are recorded in debug.json like class attributes."""

    @property
    def attack_config(self) -> AttackConfig:
        """The recipe's attack (class attributes) as the one configuration type; budget attributes
        go to it where the attack takes them (every trainer has an eps; VAFA has none)."""
        takes = attack_defaults(self.attack_name)
        if self.attack_name == "ensemble":  # the members take what they accept
            takes = {"eps": None, "alpha": None, "std": None}
        budget = {k: v for k, v in (("alpha_over_eps", self.alpha_over_eps), ("std_over_eps", self.std_over_eps))
                  if k.split("_")[0] in takes}
        if "eps" in takes or any(v is not None for v in budget.values()):  # eps is also the unit of alpha/std
            budget.update(eps_frac=self.eps_frac, eps_raw=self.eps_raw)
        return AttackConfig(self.attack_name, dict(self.attack_kwargs), **budget)

    def _build_attack(self, data: torch.Tensor, overrides: dict):
        """The attack for one batch: fixed options + budget in network units for ``data``. The
        configuration is made (and validated) once, again only if a recipe attribute it reads changed
        (a hook such as :meth:`configure_attack` may set them)."""
        key = (self.attack_name, repr(self.attack_kwargs), self.eps_frac, self.eps_raw, self.alpha_over_eps,
               self.std_over_eps)
        if getattr(self, "_attack_config_key", None) != key:
            self._attack_config_key, self._attack_config = key, self.attack_config
        loss = self.loss if self.attack_uses_training_loss else None
        # the patches' voxel spacing (mm): VAFA's tile in mm needs it
        spacing = tuple(self.configuration_manager.spacing)
        return self._attack_config.build(self.threat_model, data, loss=loss, spacing=spacing, **overrides)

    # ------------------------------------------------------------------ the attack
    def craft_adversarial(self, data: torch.Tensor, target, overrides: Optional[dict] = None,
                          for_training: bool = True) -> torch.Tensor:
        """Adversarial version of a batch against the current network.

        Args:
            data: (B, C, *patch) normalised network input on ``self.device``.
            target: nnU-Net target: a label map (B, 1, *patch) or, under deep
                supervision, a list of them (full resolution first). Region-based datasets:
                one binary channel per region (B, R, *patch) (a list under deep supervision);
                the attack then maximises the trainer's DC_and_BCE loss, or with
                ``attack_uses_training_loss = False`` BCE-with-logits on the regions
                (never a softmax CE, see nnunet_adv.attacks.base).
            overrides: attack options replacing ``attack_kwargs`` (validation uses fewer steps).
            for_training: True for the training step, False for robust validation (see
                :meth:`attack_context`).
        Returns:
            (B, C, *patch) tensor, detached, within the budget and the projection box. On a cascade stage
            (``3d_cascade_fullres``) only the image channels are attacked; the previous stage's one-hot
            channels are returned as they came (:class:`nnunet_adv.network.WithPreviousStage`).
        """
        images, previous = self.threat_model.split(data)  # a cascade stage: the previous stage's channels
        attack = self._build_attack(images, overrides or {})
        net = unwrap_network(self.network)
        model = net if previous is None else WithPreviousStage(net, previous.float())  # never perturbed
        # fp32 input gradients: fp16 gradients of a Dice+CE loss underflow to all-zero sign steps.
        # Disabled on every device: a caller's CPU/MPS autocast must not leak into the attack either.
        with torch.enable_grad(), autocast(self.device.type, enabled=False), \
                network_mode(net, self.attack_in_train_mode), self.attack_context(net, for_training):
            x_adv = attack(model, images.float(), target).detach()
        return self.threat_model.join(x_adv, previous)

    def attack_context(self, network: nn.Module, for_training: bool) -> ContextManager:
        """Hook: context the attack runs in on the unwrapped ``network`` (default: none).

        Dual-norm recipes route the training attack through the adversarial branch and the
        robust-validation attack through the clean (deployed) branch.
        """
        return nullcontext()

    def forward_context(self, parts: Sequence[Tuple[str, int]]) -> ContextManager:
        """Hook: context of the training forward pass of :meth:`compute_loss_terms`, whose input
        is the concatenation of ``parts`` = [(name, batch size), ...] (``"clean"``, ``"adv"``)
        in batch order (default: none; dual-norm recipes route each part to its branch)."""
        return nullcontext()

    # ------------------------------------------------------------------ training
    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        x_adv = self.craft_adversarial(data, target) if self.trains_adversarially else None

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.compute_loss_terms(data, x_adv, target)
            total = sum(terms.values())
        self._backward_and_step(total)
        out = {"loss": total.detach().cpu().numpy()}
        out.update({f"loss_{k}": v.detach().cpu().numpy() for k, v in terms.items()})
        return out

    def compute_loss_terms(self, data, x_adv, target) -> Dict[str, torch.Tensor]:
        """Weighted loss terms of one step; their sum is optimised.

        Clean and adversarial inputs share one forward pass (concatenated batch) so that
        DDP sees one forward per backward.
        """
        inputs, names = [], []
        if self.clean_loss_weight > 0:
            inputs.append(data)
            names.append("clean")
        if x_adv is not None:
            inputs.append(x_adv)
            names.append("adv")
        with self.forward_context([(n, x.shape[0]) for n, x in zip(names, inputs)]):
            output = self.network(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        outputs = dict(zip(names, split_batch(output, [x.shape[0] for x in inputs]) if len(inputs) > 1 else [output]))
        weights = {"clean": self.clean_loss_weight, "adv": self.adversarial_loss_weight}
        terms = {n: weights[n] * self.loss(o, target) for n, o in outputs.items()}
        terms.update(self.extra_loss_terms(outputs, target))
        return terms

    def extra_loss_terms(self, outputs: Dict[str, object], target) -> Dict[str, torch.Tensor]:
        """Hook for recipes that add loss terms (e.g. VAFT's frequency consistency).

        Args:
            outputs: network outputs by name (``"clean"``, ``"adv"``), deep-supervision lists or tensors.
        """
        return {}

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        # identical to nnUNetTrainer.train_step: loss scaling on CUDA, clipping at 12
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        terms = collate_outputs(train_outputs)
        parts = {k[5:]: float(np.mean(v)) for k, v in terms.items() if k.startswith("loss_")}
        if parts:
            self.print_to_log_file("train loss terms", {k: round(v, 4) for k, v in parts.items()})

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> Dict[str, object]:
        """Hook: recipe state saved next to nnU-Net's keys in every checkpoint (e.g. SAAT's
        schedule) and handed back by :meth:`load_extra_checkpoint_state` on ``--c``."""
        return {}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        """Hook: restore what :meth:`extra_checkpoint_state` saved (``checkpoint`` is the whole dict)."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (every key its trainer writes) plus :meth:`extra_checkpoint_state`,
        written once, to a temporary file renamed into place (a crash never leaves half a file)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        buffer = io.BytesIO()
        super().save_checkpoint(buffer)  # nnU-Net's own dict; torch.save accepts a file object
        checkpoint = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=False)
        checkpoint.update(self.extra_checkpoint_state())
        tmp = f"{os.fspath(filename)}.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if isinstance(filename_or_checkpoint, os.PathLike):
            filename_or_checkpoint = os.fspath(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)  # nnU-Net 2.8 reads only file names here
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self.load_extra_checkpoint_state(checkpoint)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        clean = super().validation_step({"data": data, "target": _clone_target(target)})
        if not self.robust_validation:
            return clean
        x_adv = self.craft_adversarial(data, target, self.val_attack_overrides, for_training=False)
        adv = super().validation_step({"data": x_adv, "target": target})
        clean.update({f"robust_{k}": v for k, v in adv.items()})
        return clean

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        if self.robust_validation:
            collated = collate_outputs(val_outputs)
            tp, fp, fn = (self._sum_over_ranks(np.sum(collated[f"robust_{k}_hard"], 0)) for k in ("tp", "fp", "fn"))
            per_class = [2 * i / (2 * i + j + k) if (2 * i + j + k) > 0 else np.nan for i, j, k in zip(tp, fp, fn)]
            mean_dice = float(np.nanmean(per_class)) if not np.all(np.isnan(per_class)) else np.nan
        else:
            per_class, mean_dice = [], np.nan
        epoch = self.current_epoch
        log = self.logger
        history = log.get_value("robust_ema_fg_dice", step=None)
        ema = mean_dice if not history or np.isnan(history[-1]) else 0.9 * history[-1] + 0.1 * mean_dice
        log.log("robust_mean_fg_dice", mean_dice, epoch)
        log.log("robust_ema_fg_dice", ema, epoch)
        log.log("robust_dice_per_class_or_region", per_class, epoch)

    def _sum_over_ranks(self, array: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return array
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, array)
        return np.sum(np.stack(gathered), 0)

    def on_epoch_end(self):
        if self.robust_validation:
            per_class = self.logger.get_value("robust_dice_per_class_or_region", step=-1)
            self.print_to_log_file("Robust pseudo dice", [np.round(i, decimals=4) for i in per_class])
        super().on_epoch_end()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _clone_target(target):
    # nnU-Net's validation_step zeroes ignore-label voxels of the target in place
    return [t.clone() for t in target] if isinstance(target, list) else target.clone()
