"""The saliency's quality number (``--saliency``): the share of |dLoss/dx| inside the labelled structures.

Hand-computed shares, and the whole-volume gradient of a stand-in model against torch's own gradient
of the same loss: a network that sees only the structures puts all of its saliency there, one that
sees only the background none."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_adv.evaluation.saliency import case_saliency, input_gradient_saliency, inside_share

SHAPE = (8, 8, 8)


def test_inside_share_by_hand():
    # -100: no loss taken there (outside nnU-Net's nonzero mask), 0 background, 1 and 2 structures
    target = np.array([[[-100, 0, 1, 2], [0, 0, 1, -100]]])
    saliency = np.array([[[9.0, 1, 2, 3], [1, 1, -4, 7]]])  # the sign does not count; 9 and 7 are outside
    share, fraction = inside_share(saliency, target)
    assert share == pytest.approx((2 + 3 + 4) / (1 + 2 + 3 + 1 + 1 + 4))
    assert fraction == pytest.approx(3 / 6)


def test_inside_share_without_saliency_or_structure_is_nan():
    target = np.array([[[0, 1], [0, 0]]])
    share, fraction = inside_share(np.zeros((1, 2, 2)), target)
    assert np.isnan(share) and fraction == pytest.approx(0.25)
    share, fraction = inside_share(np.ones((1, 2, 2)), np.zeros((1, 2, 2), dtype=int))
    assert np.isnan(share) and fraction == 0


class _Masked(torch.nn.Module):
    """Logits of 3 classes from a 1x1x1 convolution of the input times a fixed mask: the input gradient is
    zero wherever the mask is."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        return self.conv(x * self.mask)


def _stand_in(mask, image, seg):
    """The TrainedModel interface input_gradient_saliency reads: preprocess, networks, patch_size, labels."""
    net = _Masked(torch.from_numpy(mask)).eval()
    return SimpleNamespace(networks=[net], patch_size=SHAPE,
                           predictor=SimpleNamespace(label_manager=SimpleNamespace(ignore_label=None)),
                           preprocess=lambda images, label: (image, seg, None))


def _case():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, *SHAPE)).astype(np.float32)
    seg = np.zeros((1, *SHAPE), dtype=np.int16)
    seg[0, 2:5, 2:5, 2:5] = 1
    seg[0, 5:7, 5:7, 5:7] = 2
    seg[0, 0] = -1  # outside nnU-Net's nonzero mask
    return image, seg


def test_the_saliency_is_the_whole_volume_gradient_of_the_cross_entropy():
    image, seg = _case()
    mask = np.ones(SHAPE, dtype=bool)
    model = _stand_in(mask, image, seg)
    _, saliency, target = input_gradient_saliency(model, ["x"], "y", torch.device("cpu"))
    x = torch.from_numpy(image)[None].requires_grad_(True)
    reference = torch.from_numpy(np.where(seg[0] < 0, -100, seg[0]).astype(np.int64))[None]
    loss = F.cross_entropy(model.networks[0](x), reference, ignore_index=-100)
    grad, = torch.autograd.grad(loss, x)
    # one tile covers the volume: nnU-Net's Gaussian-weighted stitching divides its own weights back out
    np.testing.assert_allclose(saliency, grad.abs()[0, 0].numpy(), rtol=1e-4, atol=1e-9)
    assert np.array_equal(target, reference[0].numpy())


@pytest.mark.parametrize("sees, expected", [("structures", 1.0), ("background", 0.0)])
def test_a_network_that_sees_only_the_structures_puts_all_its_saliency_there(sees, expected):
    image, seg = _case()
    structures = seg[0] > 0
    mask = structures if sees == "structures" else ~structures
    found = case_saliency(_stand_in(mask, image, seg), ["x"], "y", torch.device("cpu"))
    assert found.inside_share == pytest.approx(expected, abs=1e-6)
    assert found.structure_fraction == pytest.approx(structures.sum() / (seg[0] >= 0).sum())
    assert found.image.shape == found.saliency.shape == SHAPE[1:]  # the central slices drawn in saliency.png
