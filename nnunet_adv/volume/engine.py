"""Whole-volume attacks on raw images of a trained nnU-Net model, exported as raw images.

Per case (:meth:`VolumeAttack.run_case`)::

    read (the dataset's reader/writer) -> preprocess (nnU-Net's own run_case_npy, as
    nnUNetPredictor does) -> attack in network space through SlidingWindowModel (tile step
    0.5, Gaussian; mirroring only with eot_mirroring) -> perturbation back to the raw geometry
    and onto the raw budget (nnunet_adv.volume.export) -> write (input geometry, float32) -> read the
    written image back and preprocess it again (what nnUNetv2_predict will see) for the record.

Budgets are given in the reference code's units: ``eps``, ``alpha`` and ``std`` are x/255 of
each channel's intensity window (the threat model's window, see
:mod:`nnunet_adv.threat_model`), ``eps_raw`` raw intensity units (HU). Where an attack's
option is not given its published default is used, read in the same units (``alpha`` 0.01
on [0, 1] images = 2.55/255 of the window).

Targets: the reference segmentation when a label file is given, else the model's own clean
prediction (argmax of the same sliding window on the clean image).

A cascade stage (``3d_cascade_fullres``) is attacked as deployed (:mod:`nnunet_adv.volume.cascade`):
the previous stage segments the image, its one-hot channels are appended to the network input, and
only the image channels are perturbed; the gradient through the previous stage is its softmax
surrogate or none (held fixed), as ``previous_stage.gradient`` says.

An ensemble of configurations (``members``) is attacked through its averaged probabilities on the first
member's network grid; members on another grid are reached through linear resampling
(:mod:`nnunet_adv.volume.deployed_ensemble`), and the case record says which and with which shapes.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import nibabel
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import build_attack
from nnunet_adv.errors import UserError
from nnunet_adv.metrics import dice_per_class, input_gradient_stats, psnr, ssim
from nnunet_adv.network import WithPreviousStage
from nnunet_adv.threat_model import ThreatModel, to_raw
from nnunet_adv.volume.cascade import PreviousStage
from nnunet_adv.volume.deployed_ensemble import (
    GRIDS_KEY,
    AveragedProbabilities,
    OnAnotherGrid,
    grid_record,
    normalisation_differs,
)
from nnunet_adv.volume.export import (
    WriteError,
    apply_raw_budget,
    capture_c_stderr,
    labels_to_network,
    perturbation_norms,
    perturbation_to_raw,
    raw_intensity_maps,
    spacings,
    supported_writer,
    write_image_like,
)
from nnunet_adv.volume.inputs import CaseError, check_label
from nnunet_adv.volume.sliding_window import SlidingWindowModel
from nnunet_adv.volume.trained_model import TrainedModel

__all__ = ["CaseError", "VolumeAttack"]


class _Monitored(nn.Module):
    """The attacked model: the sliding window, restricted to nnU-Net's nonzero mask where the
    normalisation uses it (voxels nnU-Net keeps at 0), counting forwards for a progress bar."""

    def __init__(self, window: nn.Module, x0: torch.Tensor, mask: Optional[torch.Tensor], on_forward: Callable):
        super().__init__()
        self.window, self.x0, self.mask, self.on_forward = window, x0, mask, on_forward
        self.forwards = 0
        self.first_gradient: Optional[torch.Tensor] = None  # (1, C, *S): the attack's first input gradient

    def restrict(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mask is None else self.x0 + self.mask * (x - self.x0)

    def forward(self, x):
        if x.requires_grad and self.first_gradient is None:
            x.register_hook(self._keep_first_gradient)  # what the gradient-masking check reads
        out = self.window(self.restrict(x))
        self.forwards += 1
        self.on_forward()
        return out

    def _keep_first_gradient(self, grad: torch.Tensor) -> None:
        if self.first_gradient is None:
            self.first_gradient = grad.detach().float().clone()

    def gradient_stats(self, eps: Optional[torch.Tensor]) -> Optional[dict]:
        """:func:`nnunet_adv.metrics.input_gradient_stats` of the attack's first input gradient
        inside nnU-Net's mask (outside it the input is fixed); None for gradient-free attacks."""
        if self.first_gradient is None:
            return None
        return input_gradient_stats(self.first_gradient, self.mask, eps)


class VolumeAttack:
    """Attack raw cases of a trained model and write the adversarial images.

    Args:
        model: :func:`nnunet_adv.volume.trained_model.load_trained_model`'s result.
        attack: the attack (:class:`nnunet_adv.attack_config.AttackConfig`).
        device: where volumes and networks live.
        eot_mirroring: attack the mirroring average over the model's allowed mirror axes
            (nnU-Net's test-time mirroring) instead of the plain network.
        progress: show a per-step tqdm bar.
        log: callable for one-line messages.
        tile_batch_size: sliding-window tiles per network call (same gradient; memory grows with it;
            on a CPU 4 is several times faster per tile than 1, see docs/whole_volume.md).
        previous_stage: a cascade stage's previous stage (required for ``3d_cascade_fullres``).
        members: the other members of an ensemble of configurations (``model`` is the first): the attack
            and every prediction use their averaged probabilities
            (:class:`nnunet_adv.volume.deployed_ensemble.AveragedProbabilities`) on ``model``'s network grid;
            a member that preprocesses a case to another grid is reached through linear resampling
            (:class:`nnunet_adv.volume.deployed_ensemble.OnAnotherGrid`). Their normalisation must be
            ``model``'s (one line otherwise).
    """

    def __init__(self, model: TrainedModel, attack: AttackConfig, device: torch.device = torch.device("cpu"),
                 eot_mirroring: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                 tile_batch_size: int = 1, previous_stage: Optional[PreviousStage] = None,
                 members: Sequence[TrainedModel] = ()):
        self.model, self.attack, self.device, self.progress, self.log = model, attack, device, progress, log
        p = model.predictor
        self.plans_manager, self.configuration, self.dataset_json = p.plans_manager, p.configuration_manager, \
            p.dataset_json
        self.label_manager = p.label_manager
        if self.label_manager.has_regions:
            raise UserError("region-based models (regions_class_order) are not supported: the attacks' loss is "
                            "cross-entropy over label classes")
        self.rw_class = self.plans_manager.image_reader_writer_class
        supported_writer(self.rw_class)
        self.threat_model = ThreatModel.from_managers(self.plans_manager, self.configuration, self.label_manager)
        if self.threat_model.previous_stage_channels and previous_stage is None:
            raise UserError(f"{p.configuration_name if hasattr(p, 'configuration_name') else 'a cascade stage'} needs "
                            f"its previous stage ({self.configuration.previous_stage_name}) to be attacked")
        self.previous_stage = previous_stage if self.threat_model.previous_stage_channels else None
        self.num_channels = self.threat_model.num_channels
        mirror = model.mirror_axes if eot_mirroring else None
        self.window = SlidingWindowModel(model.networks, model.patch_size, tile_step_size=0.5, use_gaussian=True,
                                         mirror_axes=mirror, tile_batch_size=tile_batch_size)
        self.members = list(members)
        if self.members and (self.threat_model.previous_stage_channels or any(
                m.predictor.configuration_manager.previous_stage_name for m in self.members)):
            raise UserError("an ensemble with a cascade stage is not supported (attack the cascade alone)")
        for m in self.members:  # one perturbation in network units must mean the same image to every member
            differs = normalisation_differs((self.plans_manager, self.configuration),
                                            (m.predictor.plans_manager, m.predictor.configuration_manager))
            if differs:
                raise UserError(f"the ensemble's members {_member_name(model)} and {_member_name(m)} preprocess "
                                f"differently ({differs}): one perturbation cannot be attacked through both")
        self.member_windows = [SlidingWindowModel(m.networks, m.patch_size, tile_step_size=0.5, use_gaussian=True,
                                                  mirror_axes=m.mirror_axes if eot_mirroring else None,
                                                  tile_batch_size=tile_batch_size) for m in self.members]
        self.preprocessor = self.configuration.preprocessor_class(verbose=False)
        self.classes = list(self.label_manager.foreground_labels)
        self.use_mask = any(s == "ZScoreNormalization" and m for s, m in
                            zip(self.configuration.normalization_schemes, self.configuration.use_mask_for_norm))

    # ------------------------------------------------------------------------------ reading
    def read(self, image_files: Sequence[str]):
        """(C, *S) float32 raw image and its reader properties; NaN/Inf -> :class:`CaseError`."""
        try:
            raw, props = self.rw_class().read_images([str(f) for f in image_files])
        except Exception as e:  # nnU-Net's readers print and raise bare RuntimeErrors
            raise CaseError(f"cannot read {', '.join(Path(f).name for f in image_files)} with "
                            f"{self.rw_class.__name__}: {type(e).__name__} "
                            f"{str(e).splitlines()[0] if str(e) else ''}".rstrip())
        if raw.shape[0] != self.num_channels:
            raise CaseError(f"{Path(image_files[0]).name}: the files hold {raw.shape[0]} channel(s) but the model "
                            f"expects {self.num_channels}")
        for c, f in enumerate(image_files):
            bad = int((~np.isfinite(raw[c])).sum()) or _nonfinite_in_nifti(f)
            if bad:
                raise CaseError(f"{Path(f).name}: {bad} voxel(s) are NaN or Inf")
            share = _most_common_share(raw[c])
            if share > DEGENERATE_SHARE:
                self.log(f"warning: {Path(f).name}: {100 * share:.0f}% of the voxels have one value "
                         f"(a truncated or empty image?)")
        return raw, props

    def preprocess(self, raw: np.ndarray, props: dict):
        """nnU-Net's preprocessing of a raw case (the predictor's code path without a label file); of a
        cascade stage with the previous stage's segmentation of the same image appended as one-hot
        channels, as ``nnUNetv2_predict -prev_stage_predictions`` does."""
        previous = None if self.previous_stage is None else self.previous_stage.segmentation(raw, props)
        data, seg, properties = self.preprocessor.run_case_npy(raw, previous, copy.deepcopy(props),
                                                               self.plans_manager, self.configuration,
                                                               self.dataset_json)
        if previous is not None:
            data = np.vstack((data, self.previous_stage.one_hot(seg, data.dtype)))
        return data.astype(np.float32), seg, properties

    def nonzero_mask(self, seg: np.ndarray, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """nnU-Net's nonzero mask of a preprocessed case (``seg`` (1, *S), -1 outside it) as (1, 1, *S) on the
        device, where the normalisation uses one (voxels nnU-Net keeps at 0 whatever the image); else None."""
        if not self.use_mask:
            return None
        return torch.from_numpy(np.asarray(seg[0] >= 0))[None, None].to(self.device, dtype)

    def deployed(self, raw: np.ndarray, props: dict, data: np.ndarray):
        """``(model, grids)``: the model that predicts this case on the attack grid, (1, C, *S) -> logits
        (1, K, *S), where ``data`` (C, *S) is the case's preprocessing (:meth:`preprocess`): the sliding
        window, or an ensemble's averaged probabilities with every other member preprocessing ``raw``
        itself (its own grid reached through linear resampling, its nonzero mask kept); ``grids`` is the
        case record's :data:`GRIDS_KEY` entry (None without members)."""
        if not self.members:
            return self.window, None
        x0 = torch.from_numpy(data)[None].to(self.device)
        windows, grids = [self.window], [grid_record(_member_name(self.model), data.shape[1:])]
        for member, window in zip(self.members, self.member_windows):
            p = member.predictor
            other, seg, _ = p.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
                raw, None, copy.deepcopy(props), p.plans_manager, p.configuration_manager, p.dataset_json)
            grids.append(grid_record(_member_name(member), other.shape[1:], data.shape[1:]))
            if other.shape == data.shape:
                windows.append(window)
                continue
            mask = self.nonzero_mask(seg, x0.dtype)
            windows.append(OnAnotherGrid(window, x0, torch.from_numpy(other.astype(np.float32))[None].to(self.device),
                                         mask))
        return AveragedProbabilities(windows), grids

    def read_labels(self, label_file: str, raw_shape, properties: dict, net_shape, image_props: dict) -> np.ndarray:
        """The reference segmentation on the network grid: (*S_net) int64 class indices; its
        geometry (spacing, origin, direction) must be its image's (``image_props``)."""
        try:
            seg, seg_props = self.rw_class().read_seg(str(label_file))
        except Exception as e:
            raise CaseError(f"cannot read label file {Path(label_file).name}: {type(e).__name__} {e}".rstrip())
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        check_label(seg, seg_props, raw_shape, image_props, Path(label_file).name, self.label_manager.all_labels,
                    ignore)
        return labels_to_network(seg, properties, self.plans_manager, self.configuration, net_shape)

    # ------------------------------------------------------------------------------ one case
    def run_case(self, image_files: Sequence[str], label_file: Optional[str], output_files: Sequence[str],
                 tmp_files: Sequence[str]) -> dict:
        """Attack one case and write it; returns the case record for attack.json.

        ``tmp_files`` are written first; the caller renames them to ``output_files``.
        """
        started = time.perf_counter()
        phases = {}
        clock = [started]

        def lap(name):
            now = time.perf_counter()
            phases[name] = round(now - clock[0], 3)
            clock[0] = now

        raw, props = self.read(image_files)
        data, seg_net, properties = self.preprocess(raw, props)
        maps = raw_intensity_maps(raw, self.plans_manager, self.configuration)
        x_input = torch.from_numpy(data)[None].to(self.device)
        x0, previous = self.threat_model.split(x_input)  # a cascade: the image channels and the previous stage's
        window, grids = self.deployed(raw, props, data)
        attacked = window
        if previous is not None:
            low_shape = self.previous_stage.network_shape(raw, props)
            attacked = WithPreviousStage(window, self.previous_stage.attacked_channels(previous, low_shape))
        mask = self.nonzero_mask(seg_net, x0.dtype)

        with torch.no_grad():
            clean_logits = window(x_input)
        clean_pred = clean_logits.argmax(1)
        if label_file is not None:
            target = torch.from_numpy(self.read_labels(label_file, raw.shape, properties, data.shape[1:], props))[None]
            target = target.to(self.device)
            target_kind = "labels"
        else:
            target, target_kind = clean_pred.clone(), "clean prediction"

        raw_std = torch.as_tensor(maps.scales, dtype=torch.float32)[None]
        # the case's network-grid spacing (mm, the network's axis order): VAFA's tile in mm needs it
        spacing = spacings(properties, self.plans_manager, self.configuration)[1]
        options = self.attack.network_options(self.threat_model, x0, raw_std=raw_std, spacing=spacing)
        attack = build_attack(self.attack.name, **options)
        lap("read_preprocess_clean_prediction")

        total = _expected_forwards(self.attack)
        bar = _bar(total, Path(image_files[0]).name, self.progress)
        model = _Monitored(attacked, x0, mask, bar.update)
        try:
            x_adv = attack(model, x0, target)
        finally:
            bar.close()
        x_adv = model.restrict(x_adv)
        with torch.no_grad():
            adv_logits = attacked(x_adv)  # the model the attack saw (a cascade: its previous-stage channels)
        lap("attack")

        # back to raw geometry, onto the raw budget, written with the input's geometry
        delta = (x_adv - x0)[0].float().cpu().numpy()
        delta_raw = perturbation_to_raw(delta, properties, self.plans_manager, self.configuration, maps)
        eps_net, norm = self._network_budget(x0, raw_std, options)
        eps_raw = None if eps_net is None else to_raw(eps_net, maps.scales)
        adv = apply_raw_budget(raw, delta_raw, maps, eps_raw=eps_raw, norm=norm,
                               eps_net_l2=None if eps_net is None else float(eps_net.max()),
                               net_voxels=int(np.prod(data.shape[1:])))
        write_image_like(adv, image_files, tmp_files, self.rw_class, props)
        lap("export_write")

        # what nnUNetv2_predict will see: the written files, read back (they must be what was meant
        # to be written: a full disk can leave a truncated file without an error) and preprocessed
        exported = self._evaluate_written(tmp_files, target, expected=adv)
        lap("reread_predict_exported")
        y = target
        record = {
            "status": "ok",
            "target": target_kind,
            "images": [Path(f).name for f in image_files],
            "labels": None if label_file is None else str(label_file),
            "network_shape": list(data.shape[1:]),
            "eps_network": None if eps_net is None else eps_net.tolist(),
            "eps_raw": None if eps_raw is None else eps_raw.tolist(),
            "raw_scale": maps.scales.tolist(),
            "raw_box": [list(p) for p in zip(maps.lower.tolist(), maps.upper.tolist())],
            **perturbation_norms(raw, adv),
            **_similarity(raw, adv),
            "loss_clean": _ce(clean_logits, y),
            "loss_adv": _ce(adv_logits, y),
            "loss_adv_exported": exported.get("loss"),
            "dice_clean": self._dice(clean_pred, y),
            "dice_adv": self._dice(adv_logits.argmax(1), y),
            "dice_adv_exported": exported.get("dice"),
            "attack_forwards": model.forwards,
            "input_gradient": model.gradient_stats(None if eps_net is None else torch.as_tensor(eps_net)),
            "objective_trace": _traces(attack),
            **({} if previous is None else {"previous_stage_gradient": self.previous_stage.gradient}),
            **({} if grids is None else {GRIDS_KEY: grids}),
            "seconds": round(time.perf_counter() - started, 3),
            "seconds_per_phase": phases,
        }
        return record

    def _network_budget(self, x0: torch.Tensor, raw_std: torch.Tensor, options: dict):
        """(eps per channel in network units or None, norm) that the exported image must respect:
        the attack's own eps, or for an ensemble the budget its members share (None: box only)."""
        cfg = self.attack
        if cfg.name == "ensemble":
            if cfg.eps_frac is None and cfg.eps_raw is None:
                return None, "linf"
            eps = self.threat_model.attack_budget(x0, eps_frac=cfg.eps_frac, eps_raw=cfg.eps_raw,
                                                  raw_std=raw_std)["eps"]
            return eps.reshape(-1).cpu().numpy().astype(np.float64), "linf"
        if not cfg.uses("eps"):
            return None, "linf"
        return options["eps"].reshape(-1).cpu().numpy().astype(np.float64), str(options.get("norm", "linf")).lower()

    def _evaluate_written(self, files: Sequence[str], target: torch.Tensor, expected: np.ndarray) -> dict:
        with capture_c_stderr():  # a truncated file makes the NIfTI reader print before it raises
            try:
                raw, props = self.rw_class().read_images([str(f) for f in files])
            except Exception as e:  # nnU-Net's readers raise bare RuntimeErrors
                raise WriteError(f"cannot write {files[0]}: the written image cannot be read back "
                                 f"({type(e).__name__}; is the disk full?)") from None
        if raw.shape != expected.shape or not np.array_equal(raw, expected.astype(raw.dtype, copy=False)):
            raise WriteError(f"cannot write {files[0]}: the written image does not read back as written "
                             f"(a truncated file: is the disk full?)")
        data, _, _ = self.preprocess(raw, props)
        if tuple(data.shape[1:]) != tuple(target.shape[1:]):
            return {"loss": None, "dice": None}  # the nonzero crop changed (perturbation zeroed a border)
        window, _ = self.deployed(raw, props, data)  # every member preprocesses the written image itself
        with torch.no_grad():
            logits = window(torch.from_numpy(data)[None].to(self.device))
        return {"loss": _ce(logits, target), "dice": self._dice(logits.argmax(1), target)}

    def _dice(self, pred: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
        d = dice_per_class(pred[0].cpu().numpy(), ref[0].cpu().numpy(), self.classes)
        return None if np.all(np.isnan(d)) else float(np.nanmean(d))


#: an image with more than this share of its voxels at one value gets a warning (a truncated .nii.gz
#: decodes to zeros after the break)
DEGENERATE_SHARE = 0.9


def _member_name(model: TrainedModel) -> str:
    """A member as the record names it: its model folder's name (``TRAINER__PLANS__2d``)."""
    return model.folder.name if model.folder is not None else model.predictor.configuration_manager.data_identifier


def _most_common_share(channel: np.ndarray) -> float:
    values, counts = np.unique(channel, return_counts=True)
    return float(counts.max()) / float(channel.size) if channel.size else 1.0


def _nonfinite_in_nifti(path) -> int:
    """NaN/Inf voxels of a floating-point NIfTI file, read with nibabel.

    SimpleITK's NIfTI reader (ITK 5.4) silently turns NaN into 0, so nnU-Net's SimpleITKIO never
    shows them; a NaN in the file is still a data error worth naming. Integer files are skipped.
    """
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return 0
    try:
        image = nibabel.load(str(path))
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return 0
        return int((~np.isfinite(np.asarray(image.dataobj))).sum())
    except Exception:  # unreadable by nibabel: the dataset's reader already read it
        return 0


def _traces(attack):
    """The objective at every input gradient of the attack (a list), or per member of an ensemble
    (a dict name -> list); what the report's "loss rises" check reads."""
    traces = getattr(attack, "traces", None)
    return dict(traces) if traces is not None else list(attack.trace)


def _ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), target.long()))


def _expected_forwards(attack: AttackConfig) -> Optional[int]:
    if attack.members:
        return sum(_expected_forwards(m) for m in attack.members)
    o = {**attack.defaults, **attack.options}
    if attack.name == "square":
        return (int(o["queries"]) + 1) * int(o.get("restarts", 1) or 1)
    if "steps" in o:
        return int(o["steps"]) * int(o.get("restarts", 1) or 1)
    return 1


def _bar(total, desc, enabled):
    return tqdm(total=total, desc=f"  {desc}", unit="step", leave=False, disable=not enabled)


def _similarity(raw: np.ndarray, adv: np.ndarray) -> Dict[str, list]:
    """Per-channel SSIM and PSNR of adv vs clean, data_range = the clean raw image's range."""
    out = {"ssim": [], "psnr": [], "data_range": []}
    for c in range(raw.shape[0]):
        x, y = np.squeeze(raw[c]), np.squeeze(adv[c])
        rng = float(x.max() - x.min())
        rng = rng if rng > 0 else 1.0
        out["data_range"].append(rng)
        p = psnr(x, y, data_range=rng)
        out["psnr"].append(p if math.isfinite(p) else "inf")
        win = min(7, min(x.shape) if x.ndim else 0)
        win = win if win % 2 == 1 else win - 1
        out["ssim"].append(ssim(x, y, data_range=rng, win_size=win) if win >= 3 else None)
    return out
