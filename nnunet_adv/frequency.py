"""Orthonormal DCT-II transforms, block DCT and the VAFA soft rounding (pure PyTorch).

Conventions
-----------
* Every transform acts on the **last** ``k`` dimensions of a tensor (``k = 2`` or ``3``,
  or ``len(block_size)``); all leading dimensions are batch dimensions.
* The DCT is the orthonormal DCT-II (``scipy.fft.dctn(..., norm='ortho')``), its inverse
  the orthonormal DCT-III; both are linear, orthogonal and differentiable.
* Block layout: :func:`to_blocks` turns ``(..., S1, .., Sk)`` into
  ``(..., S1/b1, .., Sk/bk, b1, .., bk)`` (block index first, voxel-in-block last);
  :func:`block_dct` / :func:`block_idct` return the coefficients **in place**, i.e. with the
  same shape as the input, block ``(i, j, l)`` of the output holding the DCT of block
  ``(i, j, l)`` of the input (the JPEG coefficient-image layout).

Implementation choice (measured, see ``docs/attacks.md`` and
``benchmarks/bench_attack_step.py``): a DCT-matrix product. For blocks of at most
:data:`KRON_MAX` voxels the k separable 1-D transforms are fused into one Kronecker matrix,
so a block transform is a single GEMM ``(n_blocks, b^k) @ (b^k, b^k)``; larger blocks (e.g.
the reference 32^3) use k separable 1-D matrix products. ``torch_dct`` (the reference
implementation's FFT-based DCT) is available as ``backend='torch_dct'`` and is slower here
for small blocks because it reorders, runs a complex FFT and twiddles along every axis.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

#: Largest block volume (voxels) for which the k 1-D DCTs are fused into one Kronecker matrix
#: (512 = 8^3: a 512 x 512 fp32 matrix is 1 MiB; 16^3 would be 64 MiB, so separable there).
KRON_MAX = 512

BACKENDS = ("matrix", "torch_dct")


# ----------------------------------------------------------------------------- matrices
@lru_cache(maxsize=64)
def _dct_matrix_cpu64(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_MATRIX_CACHE: dict = {}


def dct_matrix(n: int, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device, None] = None) -> Tensor:
    """Orthonormal DCT-II matrix ``M`` of size ``(n, n)``: ``dct(v) = M @ v``, ``M^-1 = M^T``.

    ``M[k, i] = sqrt(2/n) cos(pi (2i+1) k / (2n))``, row 0 divided by ``sqrt(2)``.
    Built in float64 and cast, cached per ``(n, dtype, device)``.
    """
    if int(n) < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    key = (int(n), dtype, torch.device(device) if device is not None else torch.device("cpu"), "1d")
    m = _MATRIX_CACHE.get(key)
    if m is None:
        m = _dct_matrix_cpu64(int(n)).to(dtype=dtype, device=key[2])
        _MATRIX_CACHE[key] = m
    return m


def _kron_matrix(sizes: Tuple[int, ...], dtype, device) -> Tensor:
    """Kronecker product of the 1-D DCT matrices: the k-D DCT of a flattened block."""
    key = (sizes, dtype, torch.device(device), "kron")
    m = _MATRIX_CACHE.get(key)
    if m is None:
        m = _dct_matrix_cpu64(sizes[0])
        for s in sizes[1:]:
            m = torch.kron(m, _dct_matrix_cpu64(s))
        m = m.to(dtype=dtype, device=device)
        _MATRIX_CACHE[key] = m
    return m


# ----------------------------------------------------------------------------- n-D DCT
def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown DCT backend {backend!r}; valid: {list(BACKENDS)}")
    return backend


def _dct_last_dims_matrix(x: Tensor, ndim: int, inverse: bool) -> Tensor:
    sizes = tuple(int(s) for s in x.shape[-ndim:])
    vol = math.prod(sizes)
    if vol <= KRON_MAX:
        # One GEMM on (n_items, vol): the fastest form for small blocks on CPU and GPU.
        k = _kron_matrix(sizes, x.dtype, x.device)
        flat = x.reshape(-1, vol)
        out = flat @ k if inverse else flat @ k.t()
        return out.reshape(x.shape)
    # Separable: one 1-D matrix product per axis (movedim views; matmul copies as needed).
    out = x
    for axis in range(-ndim, 0):
        m = dct_matrix(x.shape[axis], x.dtype, x.device)
        mt = m if inverse else m.t()
        out = torch.matmul(out.movedim(axis, -1), mt).movedim(-1, axis)
    return out


def _dct_last_dims_torch_dct(x: Tensor, ndim: int, inverse: bool) -> Tensor:
    import torch_dct  # the reference implementation's DCT (FFT based)

    fn = torch_dct.idct if inverse else torch_dct.dct
    out = x
    for axis in range(-ndim, 0):
        out = fn(out.movedim(axis, -1), norm="ortho").movedim(-1, axis)
    return out


def dctn(x: Tensor, ndim: int, backend: str = "matrix") -> Tensor:
    """Orthonormal DCT-II over the last ``ndim`` dims of ``x`` (any leading shape).

    Equals ``scipy.fft.dctn(x, axes=last ndim axes, norm='ortho')``. Same shape and dtype
    as ``x``. ``backend``: ``'matrix'`` (default, DCT-matrix products) or ``'torch_dct'``.
    """
    return _dct_last_dims(x, ndim, backend, inverse=False)


def idctn(x: Tensor, ndim: int, backend: str = "matrix") -> Tensor:
    """Inverse of :func:`dctn` (orthonormal DCT-III over the last ``ndim`` dims)."""
    return _dct_last_dims(x, ndim, backend, inverse=True)


def _dct_last_dims(x: Tensor, ndim: int, backend: str, inverse: bool) -> Tensor:
    _check_backend(backend)
    if not 1 <= ndim <= x.dim():
        raise ValueError(f"ndim must be in [1, {x.dim()}] for a tensor of shape {tuple(x.shape)}, got {ndim}")
    if backend == "torch_dct":
        return _dct_last_dims_torch_dct(x, ndim, inverse=inverse)
    return _dct_last_dims_matrix(x, ndim, inverse=inverse)


# ----------------------------------------------------------------------------- blocks
def normalize_block_size(block_size: Union[int, Sequence[int]], ndim: int) -> Tuple[int, ...]:
    """``8`` -> ``(8,) * ndim``; a sequence must have ``ndim`` positive ints."""
    if isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int or a sequence of {ndim} ints, got {block_size!r}")
    if isinstance(block_size, int):
        bs = (block_size,) * ndim
    else:
        try:
            bs = tuple(int(b) for b in block_size)
        except TypeError:
            raise ValueError(f"block_size must be an int or a sequence of {ndim} ints, got {block_size!r}") from None
        if any(int(b) != b for b in block_size):
            raise ValueError(f"block_size entries must be integers, got {block_size!r}")
    if len(bs) != ndim:
        raise ValueError(f"block_size {tuple(bs)} has {len(bs)} entries but {ndim} block dimensions are needed")
    if any(b < 1 for b in bs):
        raise ValueError(f"block_size entries must be >= 1, got {bs}")
    return bs


def _check_divisible(shape: Sequence[int], bs: Sequence[int]) -> None:
    for s, b in zip(shape, bs):
        if s % b:
            raise ValueError(f"spatial shape {tuple(shape)} is not divisible by block size {tuple(bs)} "
                             f"(pad first, as the VAFA attack does)")


def to_blocks(x: Tensor, block_size: Sequence[int]) -> Tensor:
    """``(..., S1, .., Sk) -> (..., S1/b1, .., Sk/bk, b1, .., bk)`` with ``k = len(block_size)``.

    One reshape + permute + copy (no Python loop over blocks). Sizes must be divisible.
    """
    k = len(block_size)
    lead = x.shape[:-k]
    sp = x.shape[-k:]
    _check_divisible(sp, block_size)
    split = []
    for s, b in zip(sp, block_size):
        split += [s // b, b]
    v = x.reshape(*lead, *split)
    nl = len(lead)
    # axes of the split view: lead..., n1, b1, n2, b2, ...  -> lead..., n1, n2, .., b1, b2, ..
    perm = list(range(nl)) + [nl + 2 * i for i in range(k)] + [nl + 2 * i + 1 for i in range(k)]
    return v.permute(perm).contiguous()


def from_blocks(blocks: Tensor, block_size: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_blocks`: ``(..., n1, .., nk, b1, .., bk) -> (..., n1 b1, .., nk bk)``."""
    k = len(block_size)
    if tuple(blocks.shape[-k:]) != tuple(block_size):
        raise ValueError(f"trailing dims {tuple(blocks.shape[-k:])} do not match block size {tuple(block_size)}")
    lead = blocks.shape[:-2 * k]
    nl = len(lead)
    ns = blocks.shape[nl:nl + k]
    perm = list(range(nl))
    for i in range(k):
        perm += [nl + i, nl + k + i]
    v = blocks.permute(perm)
    return v.reshape(*lead, *[n * b for n, b in zip(ns, block_size)])


def block_dct(x: Tensor, block_size: Union[int, Sequence[int]], backend: str = "matrix") -> Tensor:
    """Orthonormal DCT-II of every non-overlapping block over the last ``len(block_size)`` dims.

    Args:
        x: ``(..., S1, S2)`` (2D blocks) or ``(..., S1, S2, S3)`` (3D blocks); each ``Si``
            divisible by the block size (``ValueError`` otherwise).
        block_size: int (same for every block dim; then 3D blocks unless ``x`` has only 2
            dims) or a sequence of 2 or 3 ints, one per trailing dim.
        backend: ``'matrix'`` (default) or ``'torch_dct'``.

    Returns:
        Same shape as ``x``: the coefficients of each block in place of the block.
    """
    bs = _block_size_for(x, block_size)
    return from_blocks(dctn(to_blocks(x, bs), len(bs), backend), bs)


def block_idct(coeffs: Tensor, block_size: Union[int, Sequence[int]], backend: str = "matrix") -> Tensor:
    """Inverse of :func:`block_dct` (same shapes and arguments)."""
    bs = _block_size_for(coeffs, block_size)
    return from_blocks(idctn(to_blocks(coeffs, bs), len(bs), backend), bs)


def _block_size_for(x: Tensor, block_size) -> Tuple[int, ...]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        ndim = 3 if x.dim() >= 3 else 2
    else:
        try:
            ndim = len(block_size)
        except TypeError:
            raise ValueError(f"block_size must be an int or a sequence of ints, got {block_size!r}") from None
    if ndim not in (2, 3):
        raise ValueError(f"block DCT supports 2D or 3D blocks, got block_size {block_size!r}")
    if x.dim() < ndim:
        raise ValueError(f"a {ndim}D block DCT needs at least {ndim} dims, got shape {tuple(x.shape)}")
    bs = normalize_block_size(block_size, ndim)
    for s, b in zip(x.shape[-ndim:], bs):
        if b > s:
            raise ValueError(f"block size {bs} is larger than the input's trailing dims {tuple(x.shape[-ndim:])}")
    return bs


# ----------------------------------------------------------------------------- rounding
def soft_round(x: Tensor, a: float) -> Tensor:
    """Differentiable rounding of VAFA (Hanif et al., MICCAI 2023; from AdvDrop, Duan et al. 2021).

    ``phi(x, a) = floor(x) + (tanh((x - floor(x) - 0.5) k) s + 1) / 2`` with
    ``k = log(2/a - 1)``, ``s = 1/(1-a)``, temperature ``0 < a < 1``. ``phi`` equals
    ``floor(x)`` at integers and is continuous; as ``a -> 0`` it tends to ``round(x)``
    (``a = 0.1`` is nearly the identity on ``[n, n+1]``). Gradients flow through the tanh
    (not a straight-through estimator). Same shape and dtype as ``x``.
    """
    a = float(a)
    if not 0.0 < a < 1.0:
        raise ValueError(f"soft_round temperature a must be in (0, 1), got {a}")
    k = math.log(2.0 / a - 1.0)
    s = 1.0 / (1.0 - a)
    fl = torch.floor(x)
    return fl + (torch.tanh((x - fl - 0.5) * k) * s + 1.0) / 2.0
