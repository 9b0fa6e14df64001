"""An ensemble of configurations whose members preprocess a case to different network grids (issue 19): the
member on another grid is reached through linear resampling (:class:`OnAnotherGrid`), on synthetic tensors.

The attack grid is a ``2d`` member's (Z kept at the case's coarse spacing: 3 slices), the other member a
``3d_fullres`` one (Z resampled to 6 slices), as on anisotropic data."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_adv.volume.deployed_ensemble import (
    AveragedProbabilities,
    OnAnotherGrid,
    grid_record,
    normalisation_differs,
    resampling_note,
)

ATTACK_GRID, OTHER_GRID = (3, 5, 4), (6, 5, 4)  # (Z, Y, X): the 2d member's and the 3d_fullres member's


class PerSlice(nn.Module):
    """A 2d network on a volume: (1, C, Z, Y, X) -> (1, K, Z, Y, X), slice by slice (as a 2d member's sliding
    window treats a volume)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        slices = self.network(x[0].permute(1, 0, 2, 3))  # (Z, C, Y, X): the slices as a batch
        return slices.permute(1, 0, 2, 3)[None]


def _members(dtype=torch.float32):
    torch.manual_seed(0)
    two_d = PerSlice(nn.Conv2d(1, 3, 3, padding=1)).to(dtype)
    three_d = nn.Conv3d(1, 3, 3, padding=1).to(dtype)
    x0 = torch.randn(1, 1, *ATTACK_GRID, dtype=dtype)
    # the 3d member's own preprocessing: not the resampled x0 (nnU-Net resamples with order 3), close to it
    x0_other = F.interpolate(x0, size=OTHER_GRID, mode="trilinear") + 0.1 * torch.randn(1, 1, *OTHER_GRID,
                                                                                         dtype=dtype)
    return two_d, three_d, x0, x0_other


def test_the_member_on_another_grid_is_resampled_in_and_its_probabilities_back():
    """The ensemble's log-probabilities equal the hand computation: resample the perturbation onto the 3d grid,
    network, softmax, resample back to the attack grid, mean with the 2d member's softmax."""
    two_d, three_d, x0, x0_other = _members()
    ensemble = AveragedProbabilities([two_d, OnAnotherGrid(three_d, x0, x0_other)])
    x = x0 + 0.3 * torch.randn_like(x0)
    with torch.no_grad():
        out = ensemble(x)
        seen = x0_other + F.interpolate(x - x0, size=OTHER_GRID, mode="trilinear", align_corners=False)
        back = F.interpolate(torch.softmax(three_d(seen), 1), size=ATTACK_GRID, mode="trilinear",
                             align_corners=False)
        expected = torch.log((torch.softmax(two_d(x), 1) + back) / 2)
    assert out.shape == (1, 3, *ATTACK_GRID)
    torch.testing.assert_close(out, expected)
    assert torch.allclose(out.exp().sum(1), torch.ones(1, *ATTACK_GRID))  # still probabilities


def test_at_the_clean_image_the_member_sees_its_own_preprocessing_and_its_mask_holds():
    """x = x0_A: the 3d member's input is x0_B bit for bit; outside its nonzero mask it stays x0_B whatever
    the perturbation (nnU-Net keeps those voxels at 0)."""
    _, three_d, x0, x0_other = _members()
    seen = []

    class Spy(nn.Module):
        def forward(self, v):
            seen.append(v.detach().clone())
            return three_d(v)

    spy = Spy()
    mask = torch.ones(1, 1, *OTHER_GRID)
    mask[..., 0, :] = 0
    member = OnAnotherGrid(spy, x0, x0_other, mask)
    with torch.no_grad():
        member(x0)
        member(x0 + 1.0)
    assert torch.equal(seen[0], x0_other)
    assert torch.equal(seen[1][..., 0, :], x0_other[..., 0, :]) and not torch.equal(seen[1], x0_other)


def test_the_input_gradient_through_both_grids_is_exact():
    """torch.autograd.gradcheck in float64: the gradient of the ensemble's log-probabilities with respect to
    the attack grid's image goes exactly through both members and both resamplings."""
    two_d, three_d, x0, x0_other = _members(torch.float64)
    ensemble = AveragedProbabilities([two_d, OnAnotherGrid(three_d, x0, x0_other)])
    x = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_()
    assert torch.autograd.gradcheck(ensemble, (x,), eps=1e-6, atol=1e-5)


def test_members_that_normalise_differently_are_named():
    def member(schemes, transpose=(0, 1, 2), mask=(False,), properties=None):
        return (SimpleNamespace(transpose_forward=list(transpose),
                                foreground_intensity_properties_per_channel=properties or {"0": {"mean": 1.0}}),
                SimpleNamespace(normalization_schemes=list(schemes), use_mask_for_norm=list(mask)))

    first = member(["ZScoreNormalization"])
    assert normalisation_differs(first, member(["ZScoreNormalization"])) is None
    assert normalisation_differs(first, member(["CTNormalization"])) == \
        "normalisation ['ZScoreNormalization'] vs ['CTNormalization']"
    assert normalisation_differs(first, member(["ZScoreNormalization"], transpose=(2, 0, 1))).startswith("transpose")
    assert normalisation_differs(first, member(["ZScoreNormalization"], mask=(True,))).startswith("use_mask")
    assert normalisation_differs(first, member(["ZScoreNormalization"], properties={"0": {"mean": 2.0}})) == \
        "foreground intensity properties"


def test_the_report_names_the_members_reached_through_resampling():
    grids = [grid_record("T__P__2d", ATTACK_GRID), grid_record("T__P__3d_fullres", OTHER_GRID, ATTACK_GRID)]
    assert grids[0]["reached_through"] == "attack grid"
    assert grids[1]["reached_through"] == f"linear resampling from the attack grid {list(ATTACK_GRID)}"
    assert grid_record("T__P__3d_fullres", ATTACK_GRID, ATTACK_GRID)["reached_through"] == "same grid"
    note = resampling_note("ensemble_2d+3d_fullres", {"case_a": {"ensemble_grids": grids}, "case_b": {}})
    assert "`T__P__3d_fullres` in 1 case(s) (case_a: [3, 5, 4] -> [6, 5, 4])" in note
    assert "linear resampling" in note and "`T__P__2d`" in note
    same = [grids[0], grid_record("T__P__3d_fullres", ATTACK_GRID, ATTACK_GRID)]
    assert resampling_note("e", {"case_a": {"ensemble_grids": same}}) is None


@pytest.mark.parametrize("shape", [ATTACK_GRID, OTHER_GRID])
def test_a_member_on_the_same_grid_needs_no_resampling(shape):
    """Where both grids agree the resampling is the identity (no interpolation)."""
    _, three_d, _, _ = _members()
    x0 = torch.randn(1, 1, *shape)
    x = x0 + 0.2
    with torch.no_grad():
        out = OnAnotherGrid(three_d, x0, x0)(x)
    torch.testing.assert_close(out, torch.softmax(three_d(x), 1))
