"""Differentiable whole-volume (sliding-window) prediction with exact, memory-bounded gradients.

nnU-Net predicts a whole volume by Gaussian-weighted sliding windows
(``nnUNetPredictor.predict_sliding_window_return_logits``), but it does so under
``torch.inference_mode()``, so an attack cannot differentiate through it.  A naive
differentiable re-implementation keeps the autograd graph of every tile alive until the
backward pass: memory grows with the volume and a CT scan does not fit.

:class:`SlidingWindowModel` reproduces nnU-Net's stitched logits (same padding, tile
positions and order, Gaussian weights, normalisation by the summed weights, mirroring
average, fold average, crop back) and gives the exact gradient of any loss on them with
respect to the input volume, while the backward pass holds the autograd graph of only one
network forward (``tile_batch_size`` tiles, one mirror combination) at a time:

* forward: tiles are predicted without a graph and stitched (a full-volume logit buffer);
* backward: the incoming gradient ``dL/dlogits`` is padded, divided by the summed weights,
  and for every tile (and every mirror combination, and every network) the tile is
  recomputed with a graph and one vector-Jacobian product
  ``torch.autograd.grad(tile_out, tile_in, grad_tile)`` maps its share of the gradient back to
  the tile's input voxels, which are accumulated into the volume gradient.  The graph is freed
  before the next tile is recomputed.

The result is mathematically the gradient of the stitched function (stitching is linear in the
tile logits), so attacks that call ``model(x)`` and ``torch.autograd.grad(loss, x)`` work
unchanged.  Parameter ``.grad`` are never touched: the network parameters are not inputs of
the custom autograd function and every VJP asks only for the tile input.

Cost: one attack step = one no-graph pass + one recompute with graph + one backward to the
input, i.e. roughly 3 forward-equivalents against 1 for plain prediction (a full-graph
implementation needs ~2.1 but memory proportional to the volume).  ``cache_tile_graphs=n``
keeps n graphs from the forward pass to skip their recomputation: a time/memory dial between
the two.  See ``docs/whole_volume.md`` for measured numbers.

Layout conventions (nnU-Net's):
    3D configuration: ``patch_size`` (pz, py, px); volume (B, C, Z, Y, X), voxels.
    2D configuration: ``patch_size`` (py, px); volume (B, C, Z, Y, X) predicted slice by slice
    along Z (nnU-Net's slicers iterate the first spatial axis), or a plain image (B, C, Y, X).
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import nn
from torch.autograd.function import once_differentiable

from nnunet_adv.outputs import full_res

__all__ = ["SlidingWindowModel", "mirror_combinations"]

# nnU-Net's own constants in _internal_predict_sliding_window_return_logits.
_GAUSSIAN_SIGMA_SCALE = 1. / 8
_GAUSSIAN_VALUE_SCALING = 10

Slicer = Tuple[Union[slice, int], ...]


# ----------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------
def mirror_combinations(mirror_axes: Optional[Sequence[int]]) -> List[Tuple[int, ...]]:
    """All flips nnU-Net averages over, as tensor dims of a (B, C, *spatial) tile.

    Args:
        mirror_axes: spatial axes (0-based, as ``inference_allowed_mirroring_axes``) or None.

    Returns:
        ``[()]`` (identity) followed by every non-empty combination, in the order of
        ``nnUNetPredictor._internal_maybe_mirror_and_predict`` (itertools.combinations by size).
    """
    if not mirror_axes:
        return [()]
    dims = [m + 2 for m in mirror_axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def _full_resolution(output, first_only: bool) -> torch.Tensor:
    """The full-resolution logits of a network output; a deep-supervision list only where allowed."""
    if isinstance(output, (list, tuple)) and not first_only:
        raise TypeError("network returned a list (deep supervision) but "
                        "deep_supervision_first_only=False; disable deep supervision or "
                        "set deep_supervision_first_only=True")
    return full_res(output)


def _predict_flipped(network: nn.Module, tiles: torch.Tensor, dims: Tuple[int, ...],
                     first_only: bool) -> torch.Tensor:
    """``flip(network(flip(tiles)))`` along ``dims`` (identity for ``()``): (B, K, *patch)."""
    if dims:
        return torch.flip(_full_resolution(network(torch.flip(tiles, dims)), first_only), dims)
    return _full_resolution(network(tiles), first_only)


@dataclass
class _Plan:
    """Tiling of one padded volume: everything that depends only on shapes.

    Attributes:
        padded_shape: (C, *padded spatial) of the padded nnU-Net-layout volume.
        revert: slicer that crops a padded (any channels, *padded spatial) tensor back,
            ``padded[revert]``.
        slicers: nnU-Net's tile slicers into a (C, *spatial) tensor, in nnU-Net's order.
    """
    padded_shape: Tuple[int, ...]
    revert: Tuple[slice, ...]
    slicers: List[Slicer]

    def batches(self, size: int) -> List[List[Slicer]]:
        return [self.slicers[i:i + size] for i in range(0, len(self.slicers), size)]


def _nnunet_slicers(padded_spatial: Tuple[int, ...], patch_size: Tuple[int, ...],
                    tile_step_size: float) -> List[Slicer]:
    """Tile slicers from nnU-Net's own ``_internal_get_sliding_window_slicers``.

    That method reads only ``self.configuration_manager.patch_size``, ``self.tile_step_size``
    and ``self.verbose``; calling it with a stand-in ``self`` reuses nnU-Net's code (step
    computation, 2D-on-3D slice iteration, tile order) instead of copying it.
    """
    stand_in = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch_size)),
                               tile_step_size=tile_step_size, verbose=False)
    return nnUNetPredictor._internal_get_sliding_window_slicers(stand_in, padded_spatial)


def _pad(data: torch.Tensor, patch_size: Tuple[int, ...]) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """nnU-Net's padding: zero-pad (C, *spatial) to at least the patch size, centred."""
    return pad_nd_image(data, patch_size, 'constant', {'value': 0}, True, None)


# ----------------------------------------------------------------------------------------------
# The engine: forward stitching and per-tile vector-Jacobian products
# ----------------------------------------------------------------------------------------------
class _Engine:
    """Holds the networks and settings; computes stitched logits and their VJP.

    Works on one nnU-Net-layout volume ``data`` of shape (C, *spatial) (the batch dimension of
    the public API is handled by :class:`SlidingWindowModel`).

    A *unit* is one network forward: (network index, tile batch index, flip).  The backward
    pass does one VJP per unit; ``cache_limit`` units may keep the graph they built in the
    forward pass so that the backward pass need not recompute them (a time/memory trade).
    """

    def __init__(self, networks: List[nn.Module], patch_size: Tuple[int, ...], tile_step_size: float,
                 use_gaussian: bool, mirror_axes: Optional[Tuple[int, ...]], first_only: bool,
                 tile_batch_size: int, accumulation_dtype: torch.dtype, cache_limit: int):
        self.networks = networks
        self.patch_size = patch_size
        self.tile_step_size = tile_step_size
        self.use_gaussian = use_gaussian
        self.combos = mirror_combinations(mirror_axes)
        self.first_only = first_only
        self.tile_batch_size = tile_batch_size
        self.accumulation_dtype = accumulation_dtype
        self.cache_limit = cache_limit
        self._plans: Dict[Tuple[int, ...], _Plan] = {}

    # -- shapes ---------------------------------------------------------------------------
    def plan(self, data: torch.Tensor) -> _Plan:
        """Padding and tile slicers for a (C, *spatial) volume (cached per shape)."""
        key = tuple(data.shape)
        if key not in self._plans:
            padded, revert = _pad(data[:1], self.patch_size)  # one channel: only shapes matter
            padded_shape = (data.shape[0], *padded.shape[1:])
            revert = (slice(None), *revert[1:])
            slicers = _nnunet_slicers(padded_shape[1:], self.patch_size, self.tile_step_size)
            self._plans[key] = _Plan(padded_shape, revert, slicers)
        return self._plans[key]

    def gaussian(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """nnU-Net's importance map (*patch), or None without Gaussian weighting.

        nnU-Net builds it in float16 (peak 10); we take exactly those float16 values and cast
        them, so the weights equal nnU-Net's in every accumulation dtype.
        """
        if not self.use_gaussian:
            return None
        g = compute_gaussian(tuple(self.patch_size), sigma_scale=_GAUSSIAN_SIGMA_SCALE,
                             value_scaling_factor=_GAUSSIAN_VALUE_SCALING, dtype=torch.float16,
                             device=device)
        return g.to(dtype)

    def weight_sum(self, plan: _Plan, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Sum of the tile weights at every padded voxel, (*padded spatial), never zero."""
        gaussian = self.gaussian(device, dtype)
        total = torch.zeros(plan.padded_shape[1:], dtype=dtype, device=device)
        for s in plan.slicers:
            total[s[1:]] += gaussian if gaussian is not None else 1
        return total

    # -- forward ------------------------------------------------------------------------------
    def stitch(self, data: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """Stitched logits of the fold ensemble, no graph: (C, *spatial) -> (K, *spatial).

        As nnU-Net's ``predict_logits_from_preprocessed_data``: each network's stitched,
        normalised logits, summed, divided by the number of networks.  ``cache`` (a dict) is
        filled with up to ``cache_limit`` unit graphs for :meth:`vjp`.
        """
        plan = self.plan(data)
        padded, _ = _pad(data, self.patch_size)
        total = None
        for n, network in enumerate(self.networks):
            logits = self._stitch_one(n, network, padded, plan, cache)
            if total is None:
                total = logits
            else:
                total += logits
        if len(self.networks) > 1:
            total /= len(self.networks)
        return total[plan.revert].to(data.dtype)

    def _stitch_one(self, n: int, network: nn.Module, padded: torch.Tensor, plan: _Plan,
                    cache: Optional[dict]) -> torch.Tensor:
        """One network's normalised stitched logits on the padded volume, (K, *padded spatial).

        The statements mirror ``_internal_predict_sliding_window_return_logits`` (weight the
        fp32 tile prediction, add into the accumulator, divide by the weight sum) so that with
        ``accumulation_dtype=torch.float16`` the arithmetic is nnU-Net's.
        """
        acc_dtype = self.accumulation_dtype
        gaussian = self.gaussian(padded.device, acc_dtype)
        logits = None
        for b, batch in enumerate(plan.batches(self.tile_batch_size)):
            tiles = torch.stack([padded[s] for s in batch])
            prediction = self._mirror_average(network, tiles, (n, b), cache)
            if logits is None:  # the number of classes K is known after the first tile
                logits = torch.zeros((prediction.shape[1], *plan.padded_shape[1:]),
                                     dtype=acc_dtype, device=padded.device)
            for tile_logits, s in zip(prediction, batch):
                if gaussian is not None:
                    tile_logits = tile_logits * gaussian
                logits[s] += tile_logits
        weights = self.weight_sum(plan, padded.device, acc_dtype)
        torch.div(logits, weights, out=logits)
        return logits

    def _mirror_average(self, network: nn.Module, tiles: torch.Tensor, key: Tuple[int, int],
                        cache: Optional[dict]) -> torch.Tensor:
        """Mirroring average of one network on a tile batch: (B, C, *patch) -> (B, K, *patch).

        Same operations in the same order as ``_internal_maybe_mirror_and_predict`` (identity,
        ``+=`` each flip, ``/=``) so that the floating-point result is identical.
        """
        prediction = None
        for dims in self.combos:
            if cache is not None and len(cache) < self.cache_limit:
                flipped = self._predict_and_cache(network, tiles, dims, cache, (*key, dims))
            else:
                flipped = _predict_flipped(network, tiles, dims, self.first_only)
            if prediction is None:
                prediction = flipped
            else:
                prediction += flipped
        if len(self.combos) > 1:
            prediction /= len(self.combos)
        return prediction

    def _predict_and_cache(self, network: nn.Module, tiles: torch.Tensor, dims: Tuple[int, ...],
                           cache: dict, key) -> torch.Tensor:
        """As ``_predict_flipped`` but keeps (tile input, tile output) with their graph."""
        tile_in = (torch.flip(tiles, dims) if dims else tiles).detach().requires_grad_(True)
        with torch.enable_grad():
            tile_out = _full_resolution(network(tile_in), self.first_only)
        cache[key] = (tile_in, tile_out)
        # a copy: the caller adds into it in place, which must not touch the graph's output
        return torch.flip(tile_out.detach(), dims) if dims else tile_out.detach().clone()

    # -- backward -----------------------------------------------------------------------------
    def vjp(self, data: torch.Tensor, grad_logits: torch.Tensor,
            cache: Optional[dict] = None) -> torch.Tensor:
        """Exact gradient of ``<grad_logits, stitch(data)>`` w.r.t. ``data``.

        Args:
            data: (C, *spatial) input volume the forward saw.
            grad_logits: (K, *spatial) dL/d(stitched logits).
            cache: unit graphs kept by :meth:`stitch`; used once and emptied.
        Returns:
            (C, *spatial) dL/d(data), in the dtype of ``data``.

        Stitching is linear in the tile logits: logits = crop(sum_t pad_t(g * f(x_t)) / W) / N,
        with f the mirroring average.  Hence the gradient on tile t's logits is
        g * (pad(grad_logits) / W)[tile t] / N, pulled back through the network by one VJP per
        tile batch, flip and network.
        """
        plan = self.plan(data)
        padded, _ = _pad(data, self.patch_size)
        dtype = padded.dtype
        # dL/d(weighted sum): scatter into the padded grid, divide by the weights, the number
        # of networks and of flips.
        scaled = torch.zeros((grad_logits.shape[0], *plan.padded_shape[1:]), dtype=dtype,
                             device=padded.device)
        scaled[plan.revert] = grad_logits
        scaled /= self.weight_sum(plan, padded.device, dtype)
        scaled /= len(self.networks) * len(self.combos)
        gaussian = self.gaussian(padded.device, dtype)

        grad_padded = torch.zeros_like(padded)
        for n, network in enumerate(self.networks):
            for b, batch in enumerate(plan.batches(self.tile_batch_size)):
                tiles = torch.stack([padded[s] for s in batch])
                grad_tiles_out = torch.stack([scaled[s] for s in batch])
                if gaussian is not None:
                    grad_tiles_out = grad_tiles_out * gaussian
                for dims in self.combos:
                    cached = cache.pop((n, b, dims), None) if cache else None
                    grad_tiles_in = self._tile_vjp(network, tiles, dims, grad_tiles_out, cached)
                    for g, s in zip(grad_tiles_in, batch):
                        grad_padded[s] += g
        return grad_padded[plan.revert]

    def _tile_vjp(self, network: nn.Module, tiles: torch.Tensor, dims: Tuple[int, ...],
                  grad_out: torch.Tensor, cached=None) -> torch.Tensor:
        """One recompute with graph and one VJP: (B, C, *patch) input gradient of one flip.

        Flips are applied outside the graph (they are permutations): the VJP of
        ``flip(f(flip(x)))`` is ``flip(J_f(flip x)^T flip(g))``.  The graph lives only inside
        this call (or, if ``cached`` holds the forward pass's (input, output), is freed by it),
        so at most one network forward is held at any time.
        """
        g = torch.flip(grad_out, dims) if dims else grad_out
        with torch.enable_grad():
            if cached is None:
                tile_in = (torch.flip(tiles, dims) if dims else tiles).detach().requires_grad_(True)
                tile_out = _full_resolution(network(tile_in), self.first_only)
            else:
                tile_in, tile_out = cached
            (grad_in,) = torch.autograd.grad(tile_out, tile_in, g)
        return torch.flip(grad_in, dims) if dims else grad_in


class _SlidingWindowFunction(torch.autograd.Function):
    """logits = stitch(data); backward by per-tile recomputation (see module docstring)."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, engine: _Engine) -> torch.Tensor:
        # autograd.Function.forward runs without a graph: no tile activations are kept, except
        # the opt-in cache of unit graphs, built only when a backward pass can follow.
        ctx.engine = engine
        ctx.cache = {} if engine.cache_limit > 0 and ctx.needs_input_grad[0] else None
        ctx.save_for_backward(data)  # a reference, no copy; in-place edits are detected
        return engine.stitch(data, ctx.cache)

    @staticmethod
    @once_differentiable  # the per-tile VJPs are not themselves differentiated
    def backward(ctx, grad_logits: torch.Tensor):
        (data,) = ctx.saved_tensors
        cache, ctx.cache = ctx.cache, None  # a second backward (retain_graph) recomputes
        return ctx.engine.vjp(data, grad_logits, cache), None


# ----------------------------------------------------------------------------------------------
# Public module
# ----------------------------------------------------------------------------------------------
class SlidingWindowModel(nn.Module):
    """nnU-Net's whole-volume sliding-window prediction as a differentiable model.

    ``logits = vm(volume)`` equals nnU-Net's ``predict_sliding_window_return_logits`` (per
    volume, folds averaged like ``predict_logits_from_preprocessed_data``) and
    ``torch.autograd.grad(loss(logits), volume)`` is the exact gradient, computed with the graph
    of only one network forward on ``tile_batch_size`` tiles alive at a time.

    Args:
        networks: one network or a list of networks (folds; their stitched logits are averaged,
            as nnU-Net averages the folds' logits). Each maps (B, C, *patch) to (B, K, *patch)
            logits, or to a list whose first element is that (deep supervision).
            The networks must be in eval mode (``net.eval()``, the caller's job; this module
            never changes their mode): the backward pass recomputes every tile and relies on
            the recomputation being identical to the forward (no dropout, no batch statistics).
        patch_size: tile size in voxels, 3 numbers (3D configuration) or 2 (2D configuration).
        tile_step_size: tile stride as a fraction of the patch size (nnU-Net default 0.5).
        use_gaussian: Gaussian importance weighting of the tiles (nnU-Net default True).
        mirror_axes: spatial axes to mirror over (test-time augmentation; nnU-Net's
            ``inference_allowed_mirroring_axes``), or None.  The logits are then the average
            over all flip combinations, so gradients are expectation-over-transformation
            gradients.  For 2D configurations the axes refer to the 2D tile (0 = Y, 1 = X).
        deep_supervision_first_only: take the first (full-resolution) output of networks that
            return a list; if False such networks raise a TypeError.
        tile_batch_size: tiles per network call, in both passes. Memory of the backward grows
            with it; the result does not (up to float rounding of batched convolutions).
        accumulation_dtype: dtype of the stitching buffers.  float32 (default): nnU-Net's
            arithmetic with float32 buffers.  torch.float16 reproduces nnU-Net's predictor bit
            for bit (it accumulates in float16).  They differ by ~1e-4 in the interior, but by
            up to several tenths at voxels near the volume's corners and edges, where nnU-Net's
            float16 Gaussian weights are subnormal (~6e-8) and its float16 logits there are
            rounded coarsely.  The gradient is always that of the unrounded stitching, in the
            volume's dtype.
        cache_tile_graphs: number of network forwards (tile batch x flip x network) whose
            autograd graph the forward pass keeps, so that the backward pass reuses it instead
            of recomputing the tile.  0 (default) keeps the guarantee that at most one network
            forward's graph is alive; n > 0 adds up to n graphs of memory and saves up to n
            recomputations (with n >= the number of forwards, one step costs what a naive
            full-graph implementation costs).  Graphs are built only when the volume requires
            grad.

    Shapes:
        volume (B, C, Z, Y, X) float (3D configuration, or 2D configuration slice by slice) or
        (B, C, Y, X) (2D configuration); logits (B, K, *spatial) in the volume's dtype, on the
        volume's device (networks must already be there).  Volumes are processed one by one.
    """

    def __init__(self, networks: Union[nn.Module, Sequence[nn.Module]], patch_size: Sequence[int],
                 tile_step_size: float = 0.5, use_gaussian: bool = True,
                 mirror_axes: Optional[Sequence[int]] = None,
                 deep_supervision_first_only: bool = True, tile_batch_size: int = 1,
                 accumulation_dtype: torch.dtype = torch.float32, cache_tile_graphs: int = 0):
        super().__init__()
        networks = [networks] if isinstance(networks, nn.Module) else list(networks)
        if not networks:
            raise ValueError("need at least one network")
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {patch_size}")
        if tile_batch_size < 1:
            raise ValueError("tile_batch_size must be >= 1")
        if cache_tile_graphs < 0:
            raise ValueError("cache_tile_graphs must be >= 0")
        if accumulation_dtype not in (torch.float32, torch.float16, torch.float64):
            raise ValueError(f"unsupported accumulation_dtype {accumulation_dtype}")
        # Registered so that .to(device) and .parameters() reach them.
        self.networks = nn.ModuleList(networks)
        # Mirror the networks' mode without touching it: nn.Module starts with training=True,
        # and wrappers that "restore" a model's mode (torchattacks) would otherwise call
        # .train() on the networks afterwards.
        self.training = any(n.training for n in networks)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else None
        if self.mirror_axes and max(self.mirror_axes) >= len(self.patch_size):
            raise ValueError(f"mirror_axes {self.mirror_axes} do not fit patch_size {self.patch_size}")
        self._engine = _Engine(list(networks), self.patch_size, float(tile_step_size),
                               bool(use_gaussian), self.mirror_axes,
                               bool(deep_supervision_first_only), int(tile_batch_size),
                               accumulation_dtype, int(cache_tile_graphs))

    def num_tiles(self, volume: torch.Tensor) -> int:
        """Number of tile positions nnU-Net uses for ``volume`` (B, C, *spatial)."""
        return len(self._engine.plan(self._to_nnunet_layout(volume[0])).slicers)

    def num_network_forwards(self, volume: torch.Tensor) -> int:
        """Network calls per pass for one volume: tile batches x flips x networks."""
        batches = -(-self.num_tiles(volume) // self._engine.tile_batch_size)
        return batches * len(self._engine.combos) * len(self._engine.networks)

    def _to_nnunet_layout(self, sample: torch.Tensor) -> torch.Tensor:
        """(C, *spatial) of the API -> nnU-Net's 4D (C, Z, Y, X); 2D images get Z = 1."""
        if len(self.patch_size) == 2 and sample.ndim == 3:
            return sample.unsqueeze(1)
        if sample.ndim != 4:
            image = ' or a (B, C, Y, X) image' if len(self.patch_size) == 2 else ''
            raise ValueError(f"expected a (B, C, Z, Y, X) volume{image} for patch_size "
                             f"{self.patch_size}, got a sample of shape {tuple(sample.shape)}")
        return sample

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Stitched logits, differentiable w.r.t. ``volume``.

        Args:
            volume: (B, C, *spatial) float tensor (see class docstring).
        Returns:
            (B, K, *spatial) logits, same dtype and device as ``volume``.
        """
        if any(n.training for n in self._engine.networks):
            warnings.warn("SlidingWindowModel: a network is in training mode; call .eval() on it "
                          "for deterministic logits and exact gradients", stacklevel=2)
        outputs = []
        for sample in volume:
            data = self._to_nnunet_layout(sample)
            logits = _SlidingWindowFunction.apply(data, self._engine)
            outputs.append(logits.reshape(logits.shape[0], *sample.shape[1:]))
        return torch.stack(outputs)
