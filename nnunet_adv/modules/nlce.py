"""NLCE: non-local context encoder (He et al., AAAI 2019), for 1D/2D/3D feature maps.

An NLCE is a non-local block (Wang et al., CVPR 2018, embedded Gaussian) followed by an
EncNet-style context encoding (Zhang et al., CVPR 2018) that rescales channels. NLCEN puts one
after each of the encoder stages conv2..conv5 of its ResNet-FPN and, for other networks
(U-Net among them), one module between the last downsampling and the first upsampling layer:
:func:`insert_nlce` follows that rule by default (the bottleneck, the last encoder stage). The
non-local block costs N^2 for N positions; by default (``subsample="auto"``) its keys/values are
not subsampled while the N x N attention matrix has at most :data:`ATTENTION_LIMIT` entries per
sample, and max-pooled by the smallest power of 2 that brings it under the limit otherwise.

Both parts start as the identity, so inserting NLCE into a trained nnU-Net does not change
its output (fine-tuning starts from the trained function):

* non-local: ``z = W_z y + x`` with ``W_z`` (a 1x1 conv) initialised to zero;
* context encoding: the output is ``z * 2 sigmoid(W_gamma e + b)`` with ``W_gamma = 0, b = 0``,
  i.e. exactly ``z`` at initialisation. This is the paper's gate ``z * sigmoid(.)`` rescaled
  by 2 so that its midpoint is 1 (range (0, 2), slope 0.5 at 0, so gradients flow; EncNet's
  released code uses a similar ``x + x * sigmoid(.)``). ``gate="sigmoid"`` gives the paper's
  literal ``z * sigmoid(W_gamma e)`` with PyTorch's default Linear initialisation (not
  identity at init).

Gradients at initialisation: ``W_z`` and ``W_gamma`` receive non-zero gradients at once; every
parameter *behind* them (theta, phi, g; the projection, codewords, smoothing factors and
codeword norm) receives an exact-zero gradient until the first optimiser step has made
``W_z`` / ``W_gamma`` non-zero. This is the usual price of zero-initialised residual
branches (Wang et al. zero-init the BN after ``W_z`` for the same reason).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

_GATES = ("scaled_sigmoid", "sigmoid")
#: Largest attention matrix (N x M entries per sample) that ``subsample="auto"`` keeps without
#: subsampling the keys: 2^22 entries = 16 MiB in fp32 per sample (forward; the backward keeps
#: about as much again). An nnU-Net bottleneck is far below it (3D: 4^3 to 8^3 positions).
ATTENTION_LIMIT = 2 ** 22
_AGGREGATES = ("mean", "sum")


def _conv_op(dims: int) -> Type[nn.Module]:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return getattr(nn, f"Conv{dims}d")


def _as_tuple(value: Union[int, Sequence[int]], dims: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"expected {dims} values, got {value}")
    return value


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block with a zero-initialised residual branch.

    ``y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j)``, ``z = W_z y + x``; theta, phi, g
    and W_z are 1x1(x1) convolutions (no scaling of the dot product, as in Wang et al.).

    Args:
        channels: C, channels of the input and output.
        inter_channels: C', width of theta/phi/g (default ``max(C // 2, 1)``, Wang et al.).
        dims: 1, 2 or 3 spatial dimensions.
        subsample: ``"auto"`` (default: none while N x N <= :data:`ATTENTION_LIMIT`, else the
            smallest power-of-2 factor per axis that fits), or a max-pooling factor (int, or one
            per axis) applied to phi(x) and g(x) after their convolutions (Wang et al.'s
            subsampling trick). Keys/values then
            number ``M = prod(ceil(S_d / k_d))`` instead of ``N = prod(S_d)``, so the attention
            matrix is N x M: at 2 per axis, 1/4 (2D) or 1/8 (3D) of N^2. The factor is
            clipped per axis to the feature-map size (a size-1 axis is not pooled); ``ceil_mode``
            keeps border voxels. 1 or None disables it.

    Shapes:
        x: (B, C, *S) -> z: (B, C, *S). The softmax module ``self.attention`` outputs the
        (B, N, M) attention matrix (a forward hook on it can observe its size).
    """

    def __init__(self, channels: int, inter_channels: Optional[int] = None, dims: int = 3,
                 subsample: Optional[Union[str, int, Sequence[int]]] = "auto"):
        super().__init__()
        conv = _conv_op(dims)
        self.dims = dims
        self.inter_channels = inter_channels or max(channels // 2, 1)
        if subsample == "auto":
            self.subsample = "auto"
        elif isinstance(subsample, str):
            raise ValueError(f"subsample must be 'auto', an int or one int per axis, got {subsample!r}")
        else:
            self.subsample = _as_tuple(subsample or 1, dims)
        self.theta = conv(channels, self.inter_channels, 1)
        self.phi = conv(channels, self.inter_channels, 1)
        self.g = conv(channels, self.inter_channels, 1)
        self.w_z = conv(self.inter_channels, channels, 1)
        self.attention = nn.Softmax(dim=-1)
        # Identity at initialisation: the residual branch W_z y starts at exactly zero.
        nn.init.zeros_(self.w_z.weight)
        nn.init.zeros_(self.w_z.bias)

    def _pool_kernel(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        # Never pool an axis by more than its size (e.g. a bottleneck axis of size 1).
        if self.subsample == "auto":
            n, factor = int(np.prod(spatial)), 1
            while n * int(np.prod([math.ceil(s / min(factor, s)) for s in spatial])) > ATTENTION_LIMIT \
                    and factor < max(spatial):
                factor *= 2
            return tuple(min(factor, s) for s in spatial)
        return tuple(min(k, s) for k, s in zip(self.subsample, spatial))

    def _keys(self, projected: torch.Tensor) -> torch.Tensor:
        """(B, C', *S) -> (B, C', M), max-pooled by the subsampling factor."""
        kernel = self._pool_kernel(projected.shape[2:])
        if any(k > 1 for k in kernel):
            pool = getattr(F, f"max_pool{self.dims}d")
            projected = pool(projected, kernel_size=kernel, stride=kernel, ceil_mode=True)
        return projected.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, spatial = x.shape[0], x.shape[2:]
        query = self.theta(x).flatten(2).transpose(1, 2)            # (B, N, C')
        key = self._keys(self.phi(x))                               # (B, C', M)
        value = self._keys(self.g(x)).transpose(1, 2)               # (B, M, C')
        attention = self.attention(torch.bmm(query, key))           # (B, N, M)
        y = torch.bmm(attention, value).transpose(1, 2)             # (B, C', N)
        y = y.reshape(batch, self.inter_channels, *spatial)
        return x + self.w_z(y)

    def attention_size(self, spatial: Sequence[int]) -> Tuple[int, int]:
        """(N, M) of the attention matrix for a feature map of spatial size ``spatial``."""
        kernel = self._pool_kernel(spatial)
        n = int(np.prod(spatial))
        m = int(np.prod([math.ceil(s / k) for s, k in zip(spatial, kernel)]))
        return n, m


class ContextEncoding(nn.Module):
    """EncNet context encoding with a channel gate, identity at initialisation by default.

    Steps, for z of shape (B, C, *S) with N = prod(S) positions:

    1. ``p = ReLU(Norm(Conv1x1(z)))``, C -> D = ``reduced_channels`` (C'' in the paper).
    2. K codewords ``d_k`` (K, D) and smoothing factors ``s_k`` (K,):
       ``a_ik = softmax_k(-s_k ||p_i - d_k||^2)``, ``e_k = agg_i a_ik (p_i - d_k)`` -> (B, K, D).
    3. ``e = sum_k ReLU(BN(e_k))`` -> (B, D) (BatchNorm1d over the K codewords, as EncNet).
    4. ``gamma = gate(W_gamma e)`` -> (B, C), one scale per sample and channel; output
       ``z * gamma`` (B, C, *S).

    ``aggregate="mean"`` (default) averages over the N positions; EncNet sums. The BN that
    follows makes the two identical in training mode (BN(c v) = BN(v) for a constant c > 0, up
    to its eps), but in eval mode BN uses running statistics, and a sum grows with N: a
    network trained on one patch size and run on another (2D full slices, other nnU-Net
    configurations) would feed the BN values on the wrong scale. The mean does not depend on
    N. ``aggregate="sum"`` gives EncNet's literal form.

    Args:
        channels: C.
        num_codewords: K (EncNet default 32).
        reduced_channels: D (default C).
        dims: spatial dimensions of z (1, 2, 3).
        norm_op, norm_op_kwargs: norm after the projection (default BatchNorm{dims}d, as
            EncNet; :func:`insert_nlce` passes nnU-Net's norm, InstanceNorm by default).
        gate: "scaled_sigmoid" (``2 sigmoid(u)``, W_gamma and bias zero: identity at init) or
            "sigmoid" (paper: ``sigmoid(u)``, default Linear init).
        aggregate: "mean" or "sum" over positions.

    The distances and the encoding run in float32 even under autocast: ``||p||^2 - 2 p.d +
    ||d||^2`` cancels badly in float16, and these coarse-stage tensors are small.
    """

    def __init__(self, channels: int, num_codewords: int = 32, reduced_channels: Optional[int] = None,
                 dims: int = 3, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[dict] = None, gate: str = "scaled_sigmoid",
                 aggregate: str = "mean"):
        super().__init__()
        if gate not in _GATES:
            raise ValueError(f"gate must be one of {_GATES}, got {gate!r}")
        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
        self.gate, self.aggregate, self.dims = gate, aggregate, dims
        width = reduced_channels or channels
        norm_op = norm_op or getattr(nn, f"BatchNorm{dims}d")
        self.project = nn.Sequential(
            _conv_op(dims)(channels, width, 1, bias=False),
            norm_op(width, **(norm_op_kwargs or {})),
            nn.ReLU(inplace=True),
        )
        # EncNet initialisation: codewords ~ U(+-1/sqrt(K D)); smoothing ~ U(0, 1) (EncNet
        # stores the negated factor, U(-1, 0)).
        bound = 1.0 / math.sqrt(num_codewords * width)
        self.codewords = nn.Parameter(torch.empty(num_codewords, width).uniform_(-bound, bound))
        self.smoothing = nn.Parameter(torch.empty(num_codewords).uniform_(0.0, 1.0))
        self.codeword_norm = nn.BatchNorm1d(num_codewords)
        self.fc = nn.Linear(width, channels)
        if gate == "scaled_sigmoid":
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Per-codeword residual encodings e_k: (B, C, *S) -> (B, K, D), float32."""
        p = self.project(z).flatten(2).transpose(1, 2).float()     # (B, N, D)
        with torch.autocast(device_type=z.device.type, enabled=False):
            codewords, smoothing = self.codewords.float(), self.smoothing.float()
            dist2 = ((p * p).sum(-1, keepdim=True) - 2.0 * p @ codewords.t()
                     + (codewords * codewords).sum(-1)).clamp_min(0.0)   # (B, N, K)
            assign = torch.softmax(-smoothing * dist2, dim=-1)     # (B, N, K)
            # sum_i a_ik (p_i - d_k) = A^T p - (sum_i a_ik) d_k, without a (B, N, K, D) tensor
            encoded = assign.transpose(1, 2) @ p - assign.sum(1).unsqueeze(-1) * codewords
            if self.aggregate == "mean":
                encoded = encoded / p.shape[1]
        return encoded

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Channel scale gamma: (B, C, *S) -> (B, C)."""
        encoded = self.encode(z).to(self.fc.weight.dtype)  # back to the parameters' dtype
        context = F.relu(self.codeword_norm(encoded)).sum(1)        # (B, D)
        gamma = torch.sigmoid(self.fc(context))
        return 2.0 * gamma if self.gate == "scaled_sigmoid" else gamma

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gamma = self.scale(z).to(z.dtype)
        return z * gamma.reshape(*gamma.shape, *([1] * (z.ndim - 2)))


class NLCE(nn.Module):
    """Non-local block followed by context encoding; (B, C, *S) -> (B, C, *S).

    Args:
        channels: C.
        dims: 1, 2 or 3.
        inter_channels, subsample: see :class:`NonLocalBlock`.
        num_codewords, reduced_channels, norm_op, norm_op_kwargs, gate, aggregate: see
            :class:`ContextEncoding`.
    """

    def __init__(self, channels: int, dims: int = 3, inter_channels: Optional[int] = None,
                 subsample: Optional[Union[str, int, Sequence[int]]] = "auto", num_codewords: int = 32,
                 reduced_channels: Optional[int] = None, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[dict] = None, gate: str = "scaled_sigmoid",
                 aggregate: str = "mean"):
        super().__init__()
        self.channels = channels
        self.non_local = NonLocalBlock(channels, inter_channels, dims, subsample)
        self.context = ContextEncoding(channels, num_codewords, reduced_channels, dims, norm_op,
                                       norm_op_kwargs, gate, aggregate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(self.non_local(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements (per sample) this module stores, in dynamic_network_architectures'
        convention; ``input_size`` is its own input's spatial size (after the stage's stride).

        Counts theta, phi, g (before pooling), y, W_z y, the N x M attention matrix, the
        projection and the output; ignores the (B, K, D) encodings.
        """
        n, m = self.non_local.attention_size(input_size)
        inter = self.non_local.inter_channels
        width = self.context.project[0].out_channels
        return np.int64(4 * n * inter + n * m + 2 * n * self.channels + n * width)


def _stage_body(stage: nn.Module) -> nn.Sequential:
    """The nn.Sequential of conv/residual blocks that ends an encoder stage.

    PlainConvEncoder stages are ``Sequential([pool,] StackedConvBlocks)``; ResidualEncoder stages
    are ``[Sequential(pool,] StackedResidualBlocks)``. Returning their ``convs`` / ``blocks``
    Sequential lets the NLCE be appended *inside* it, which keeps every existing state-dict
    key and the blocks' ``compute_conv_feature_map_size`` (which feeds the post-stride size to
    every module after the first).
    """
    block = stage[-1] if isinstance(stage, nn.Sequential) else stage
    if isinstance(block, StackedConvBlocks):
        return block.convs
    if isinstance(block, StackedResidualBlocks):
        return block.blocks
    raise TypeError(f"unsupported encoder stage {type(block).__name__}: expected StackedConvBlocks "
                    "or StackedResidualBlocks (PlainConvUNet / ResidualEncoderUNet)")


def _stage_indices(stages: Optional[Sequence[int]], n_stages: int) -> Tuple[int, ...]:
    """Normalise stage indices (negative allowed); default: the bottleneck (the paper's U-Net rule)."""
    if stages is None:
        stages = (-1,)
    indices = set()
    for s in stages:
        if not -n_stages <= s < n_stages:
            raise IndexError(f"stage {s} out of range for an encoder with {n_stages} stages")
        indices.add(s % n_stages)
    return tuple(sorted(indices))


def insert_nlce(network: nn.Module, stages: Optional[Sequence[int]] = None, **nlce_kwargs) -> nn.Module:
    """Put an :class:`NLCE` at the end of the chosen encoder stages, in place.

    Each chosen stage's output (what the decoder receives as skip, or as bottleneck input for
    the last stage) then passes through an NLCE. Channels and spatial size are unchanged, so
    ``encoder.output_channels``, ``encoder.strides``, the decoder and its deep-supervision
    outputs stay valid. The NLCE is registered as child ``nlce`` of the stage's block Sequential:
    keys ``encoder.stages.{i}.0.convs.nlce.*`` (PlainConvUNet) or
    ``encoder.stages.{i}.blocks.nlce.*`` (ResidualEncoderUNet); all original keys are unchanged,
    so a plain nnU-Net checkpoint loads with ``strict=False`` and only NLCE keys missing.

    Args:
        network: dynamic_network_architectures PlainConvUNet or ResidualEncoderUNet (2D or 3D);
            anything with ``.encoder.stages``, ``.encoder.output_channels``, ``.encoder.conv_op``.
        stages: encoder stage indices (negative allowed). Default: the bottleneck (``(-1,)``),
            NLCEN's rule for U-Nets (one module between the last downsampling and the first
            upsampling layer); NLCEN's FPN used all stages but the stem.
        **nlce_kwargs: passed to :class:`NLCE` (inter_channels, subsample, num_codewords,
            reduced_channels, gate, aggregate, norm_op, norm_op_kwargs). norm_op defaults to the
            encoder's own norm (InstanceNorm for nnU-Net).

    Call it inside the trainer's ``build_network_architecture`` so prediction rebuilds the same
    network, *after* nnU-Net initialised the network (``network.apply(network.initialize)``
    would He-initialise ``W_z`` and so break the identity at initialisation). To make the
    NLCE norms dual as well, call it before ``convert_to_dual_norm``.

    Returns:
        ``network`` itself.
    """
    encoder = network.encoder
    dims = convert_conv_op_to_dim(encoder.conv_op)
    nlce_kwargs.setdefault("norm_op", encoder.norm_op)
    nlce_kwargs.setdefault("norm_op_kwargs", encoder.norm_op_kwargs)
    reference = next(network.parameters())
    for index in _stage_indices(stages, len(encoder.stages)):
        body = _stage_body(encoder.stages[index])
        if "nlce" in body._modules:
            raise ValueError(f"encoder stage {index} already has an NLCE")
        nlce = NLCE(encoder.output_channels[index], dims, **nlce_kwargs)
        body.add_module("nlce", nlce.to(device=reference.device, dtype=reference.dtype))
    return network
