"""Block DCT, n-D DCT and soft rounding (nnunet_adv.frequency) against scipy and by identities."""
import numpy as np
import pytest
import scipy.fft
import torch

from nnunet_adv import frequency as fq

pytestmark = pytest.mark.usefixtures("one_thread")


def _scipy_block_dct(x: np.ndarray, bs, inverse=False):
    """Reference: loop over blocks, scipy dctn/idctn(norm='ortho') on each."""
    out = np.empty_like(x)
    k = len(bs)
    lead = x.shape[:-k]
    grid = [range(0, s, b) for s, b in zip(x.shape[-k:], bs)]
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    for idx in np.ndindex(*lead) if lead else [()]:
        for starts in np.ndindex(*[len(g) for g in grid]):
            sl = tuple(slice(grid[d][starts[d]], grid[d][starts[d]] + bs[d]) for d in range(k))
            out[idx + sl] = fn(x[idx + sl], norm="ortho")
    return out


@pytest.mark.parametrize("backend", fq.BACKENDS)
@pytest.mark.parametrize("shape,bs", [
    ((2, 1, 16, 16, 16), (8, 8, 8)),      # 3D, Kronecker path
    ((1, 2, 8, 12, 4), (4, 6, 2)),        # 3D, anisotropic blocks
    ((1, 1, 32, 32, 32), (16, 16, 16)),   # 3D, separable path (16^3 > KRON_MAX)
    ((2, 3, 16, 24), (8, 8)),             # 2D
    ((1, 1, 4, 16, 16), (8, 4)),          # 2D blocks on the last two dims of a volume
])
def test_block_dct_equals_scipy_dctn(shape, bs, backend):
    x = torch.randn(shape, dtype=torch.float64)
    ref = _scipy_block_dct(x.numpy(), bs)
    got = fq.block_dct(x, bs, backend=backend)
    assert got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)
    inv_ref = _scipy_block_dct(ref, bs, inverse=True)
    np.testing.assert_allclose(fq.block_idct(got, bs, backend=backend).numpy(), inv_ref, atol=1e-10)


@pytest.mark.parametrize("backend", fq.BACKENDS)
@pytest.mark.parametrize("ndim,shape", [(2, (2, 3, 10, 7)), (3, (2, 6, 5, 9))])
def test_dctn_equals_scipy(ndim, shape, backend):
    x = torch.randn(shape, dtype=torch.float64)
    axes = tuple(range(-ndim, 0))
    np.testing.assert_allclose(fq.dctn(x, ndim, backend).numpy(),
                               scipy.fft.dctn(x.numpy(), axes=axes, norm="ortho"), atol=1e-10)
    np.testing.assert_allclose(fq.idctn(x, ndim, backend).numpy(),
                               scipy.fft.idctn(x.numpy(), axes=axes, norm="ortho"), atol=1e-10)


@pytest.mark.parametrize("bs", [(8, 8, 8), (8, 8), (4, 2, 8), (16, 16, 16)])
def test_block_dct_round_trip_and_parseval_fp32(bs):
    x = torch.rand((2, 1) + tuple(2 * b for b in bs)) * 255 - 128
    c = fq.block_dct(x, bs)
    # orthonormal transform: energy kept, exact inverse
    assert torch.allclose((c ** 2).sum(), (x ** 2).sum(), rtol=1e-5)
    assert (fq.block_idct(c, bs) - x).abs().max() < 1e-3   # values ~1e2, fp32


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32])
def test_dct_matrix_orthonormal(n):
    m = fq.dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(m @ m.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(m.t() @ m, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # row 0 is the constant (DC) basis vector
    assert torch.allclose(m[0], torch.full((n,), 1 / np.sqrt(n), dtype=torch.float64))


def test_dct_of_constant_block_is_dc_only():
    x = torch.full((1, 1, 8, 8, 8), 3.0)
    c = fq.block_dct(x, 8)
    assert abs(float(c[0, 0, 0, 0, 0]) - 3.0 * np.sqrt(512)) < 1e-3
    c[0, 0, 0, 0, 0] = 0
    assert c.abs().max() < 1e-4


def test_to_blocks_layout_and_inverse():
    x = torch.arange(4 * 6 * 8, dtype=torch.float32).view(1, 1, 4, 6, 8)
    b = fq.to_blocks(x, (2, 3, 4))
    assert b.shape == (1, 1, 2, 2, 2, 2, 3, 4)
    # block (1, 0, 1) is x[2:4, 0:3, 4:8]
    assert torch.equal(b[0, 0, 1, 0, 1], x[0, 0, 2:4, 0:3, 4:8])
    assert torch.equal(fq.from_blocks(b, (2, 3, 4)), x)


def test_block_dct_errors():
    with pytest.raises(ValueError, match="not divisible"):
        fq.block_dct(torch.zeros(1, 1, 10, 16, 16), (8, 8, 8))
    with pytest.raises(ValueError, match="larger than"):
        fq.block_dct(torch.zeros(1, 1, 4, 16, 16), (8, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        fq.block_dct(torch.zeros(1, 1, 8, 8, 8), 8, backend="fft")
    with pytest.raises(ValueError, match="2D or 3D"):
        fq.block_dct(torch.zeros(1, 1, 8, 8, 8, 8), (8, 8, 8, 8))


def test_block_dct_differentiable():
    x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(fq.block_dct(x, 4).pow(2).sum(), x)
    # d/dx ||Mx||^2 = 2x for an orthonormal M
    assert torch.allclose(g, 2 * x.detach(), atol=1e-4)


def test_soft_round_properties():
    x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    # equals the integer at integers, for any temperature
    ints = torch.arange(-3.0, 4.0, dtype=torch.float64)
    for a in (0.5, 0.1, 1e-3):
        assert torch.allclose(fq.soft_round(ints, a), ints, atol=1e-9)
    # small temperature -> hard rounding away from the half-integers
    far = (x - x.floor() - 0.5).abs() > 0.2   # k = log(2e20) ~ 46: tanh(46 * 0.2) ~ 1 - 2e-8
    hard = fq.soft_round(x, 1e-20)
    assert torch.allclose(hard[far], torch.round(x[far]), atol=1e-6)
    # a = 0.1 is close to the identity (max deviation ~0.1) and monotone
    soft = fq.soft_round(x, 0.1)
    assert (soft - x).abs().max() < 0.15
    assert bool((soft[1:] >= soft[:-1] - 1e-12).all())
    # hand value: a=0.1, x=0.25 -> (tanh(-0.25 log 19) / 0.9 + 1) / 2
    expect = (np.tanh(-0.25 * np.log(19.0)) / 0.9 + 1) / 2
    assert abs(float(fq.soft_round(torch.tensor(0.25, dtype=torch.float64), 0.1)) - expect) < 1e-12
    # not straight-through: gradient is that of the tanh, > 0 mid-interval
    xt = torch.tensor([0.5], requires_grad=True)
    (g,) = torch.autograd.grad(fq.soft_round(xt, 0.1).sum(), xt)
    assert abs(float(g) - np.log(19.0) / 0.9 / 2) < 1e-5
    with pytest.raises(ValueError):
        fq.soft_round(x, 0.0)
    with pytest.raises(ValueError):
        fq.soft_round(x, 1.0)
