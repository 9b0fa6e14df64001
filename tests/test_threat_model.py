"""Budget conversion into nnU-Net network units, against hand-computed values."""
import numpy as np
import pytest
import torch

from nnunet_adv.threat_model import ThreatModel, ThreatModelError

CT_PROPS = {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": -900.0, "percentile_99_5": 1100.0}}


def _plans(schemes, props):
    return {
        "configurations": {
            "3d_fullres": {"normalization_schemes": schemes, "patch_size": [8, 8, 8]},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres"},
        },
        "foreground_intensity_properties_per_channel": props,
    }


def test_ct_channel_uses_dataset_window():
    tm = ThreatModel.from_plans(_plans(["CTNormalization"], CT_PROPS), "3d_fullres")
    x = torch.zeros(2, 1, 4, 4, 4)
    b = tm.budget(x, eps_frac=4 / 255)
    # window (p99.5 - p0.5) / std = 2000 / 50 = 40 network units
    assert b.eps.shape == (2, 1, 1, 1, 1)
    assert torch.allclose(b.eps, torch.full_like(b.eps, 40 * 4 / 255))
    assert torch.allclose(b.lower, torch.full_like(b.lower, -20.0))  # (-900 - 100) / 50
    assert torch.allclose(b.upper, torch.full_like(b.upper, 20.0))   # (1100 - 100) / 50
    # 30 HU is 30 / std network units
    assert torch.allclose(tm.budget(x, eps_raw=30).eps, torch.full((2, 1, 1, 1, 1), 0.6))


def test_patch_windows_give_every_channel_its_patch_range_as_seat_does():
    tm = ThreatModel.from_plans(_plans(["CTNormalization"], CT_PROPS), "3d_fullres")
    x = torch.zeros(2, 1, 4, 4, 4)
    x[0, 0, 0, 0, 0], x[1, 0, 1, 1, 1] = 3.0, -1.0   # patch ranges 3 and 1 (the dataset window is 40)
    seat = tm.with_patch_windows()
    b = seat.budget(x, eps_frac=0.1)
    assert torch.allclose(b.eps.flatten(), torch.tensor([0.3, 0.1]))
    assert torch.allclose(b.lower.flatten(), torch.tensor([0.0, -1.0]))
    assert torch.allclose(b.upper.flatten(), torch.tensor([3.0, 0.0]))
    # the original keeps the dataset window, and raw units are unchanged (30 HU = 30 / std)
    assert torch.allclose(tm.budget(x, eps_frac=0.1).eps, torch.full((2, 1, 1, 1, 1), 4.0))
    assert torch.allclose(seat.budget(x, eps_raw=30).eps, torch.full((2, 1, 1, 1, 1), 0.6))


def test_inherited_configuration_is_resolved():
    tm = ThreatModel.from_plans(_plans(["CTNormalization"], CT_PROPS), "3d_cascade_fullres")
    assert tm.schemes == ["CTNormalization"]


def test_zscore_channel_uses_each_patch_range():
    tm = ThreatModel(["ZScoreNormalization"])
    x = torch.zeros(2, 1, 3, 3)
    x[0, 0, 0, 0], x[0, 0, 2, 2] = -1.0, 2.0    # sample 0: range 3
    x[1, 0, 1, 1], x[1, 0, 0, 2] = -0.5, 0.5    # sample 1: range 1
    b = tm.budget(x, eps_frac=0.1)
    assert torch.allclose(b.eps.flatten(), torch.tensor([0.3, 0.1]))
    assert torch.allclose(b.lower.flatten(), torch.tensor([-1.0, -0.5]))
    assert torch.allclose(b.upper.flatten(), torch.tensor([2.0, 0.5]))
    # raw units need the std the image was divided by
    with pytest.raises(ThreatModelError, match="raw image's std"):
        tm.budget(x, eps_raw=10)
    b_raw = tm.budget(x, eps_raw=10, raw_std=torch.tensor([[5.0], [20.0]]))
    assert torch.allclose(b_raw.eps.flatten(), torch.tensor([2.0, 0.5]))


def test_z_scored_data_is_never_boxed_to_unit_range():
    tm = ThreatModel(["ZScoreNormalization"])
    x = torch.linspace(-3, 4, 64).reshape(1, 1, 4, 4, 4)
    b = tm.budget(x, eps_frac=4 / 255)
    assert b.lower.item() == pytest.approx(-3.0) and b.upper.item() == pytest.approx(4.0)


def test_multichannel_ct_plus_zscore_with_per_channel_eps():
    props = dict(CT_PROPS)
    tm = ThreatModel(["CTNormalization", "ZScoreNormalization"], props)
    x = torch.zeros(1, 2, 4, 4)
    x[0, 1, 0, 0] = 5.0  # z-score channel range [0, 5]
    b = tm.budget(x, eps_frac=[2 / 255, 0.2])
    assert b.eps.shape == (1, 2, 1, 1)
    assert b.eps[0, 0].item() == pytest.approx(40 * 2 / 255)
    assert b.eps[0, 1].item() == pytest.approx(1.0)
    assert b.lower[0, :, 0, 0].tolist() == pytest.approx([-20.0, 0.0])
    assert b.upper[0, :, 0, 0].tolist() == pytest.approx([20.0, 5.0])
    assert b.scaled(0.5)[0, 1].item() == pytest.approx(0.5)


def test_unit_range_schemes():
    tm = ThreatModel(["RGBTo01Normalization"])
    b = tm.budget(torch.rand(1, 1, 4, 4), eps_raw=8)
    assert b.eps.item() == pytest.approx(8 / 255)
    assert (b.lower.item(), b.upper.item()) == (0.0, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps_frac": -0.1}, "must be >= 0"),
    ({"eps_frac": float("nan")}, "must be >= 0"),
    ({}, "exactly one"),
    ({"eps_frac": 0.1, "eps_raw": 1.0}, "exactly one"),
    ({"eps_frac": [0.1, 0.2]}, "2 values but the data has 1 channels"),
])
def test_bad_budgets_are_rejected(kwargs, message):
    tm = ThreatModel(["ZScoreNormalization"])
    with pytest.raises(ThreatModelError, match=message):
        tm.budget(torch.zeros(1, 1, 4, 4), **kwargs)


def test_ct_without_intensity_statistics_is_a_clear_error():
    with pytest.raises(ThreatModelError, match="lack its intensity statistics.*percentile_99_5"):
        ThreatModel.from_plans(_plans(["CTNormalization"], {"0": {"mean": 0, "std": 1, "percentile_00_5": 0}}),
                               "3d_fullres")
    with pytest.raises(ThreatModelError, match="not supported"):
        ThreatModel(["MyCustomNormalization"])
    with pytest.raises(ThreatModelError, match="expected input of shape"):
        ThreatModel(["ZScoreNormalization"]).budget(torch.zeros(1, 2, 4, 4), eps_frac=0.1)


def test_the_unit_conversions_live_here_and_round_trip():
    from nnunet_adv.threat_model import from_x255, to_network, to_raw, to_x255

    assert from_x255(4) == 4 / 255 and from_x255([4, 8]) == [4 / 255, 8 / 255]
    for value in (0.5, 4, 8, 16.7, 255):
        assert to_x255(from_x255(value)) == value  # the user's number comes back exactly
    raw_units = np.array([2.5, 10.0])
    assert np.allclose(to_raw(np.array([0.1, 0.2]), raw_units), [0.25, 2.0])
    assert np.allclose(to_network(to_raw(np.array([0.1, 0.2]), raw_units), raw_units), [0.1, 0.2])


def test_a_cascade_stage_budgets_only_its_image_channels():
    """3d_cascade_fullres: 1 CT channel, then one previous-stage channel per foreground label (2 here). Budgets
    are per image channel; split/join separate the two parts; a budget asked for the whole input gives the
    previous stage's channels radius 0 and no box, so a projection keeps them; PGD through WithPreviousStage
    never sees them."""
    from nnunet_adv.attacks import build_attack
    from nnunet_adv.network import WithPreviousStage

    plans = _plans(["CTNormalization"], CT_PROPS)
    plans["configurations"]["3d_cascade_fullres"]["previous_stage"] = "3d_lowres"
    dataset_json = {"labels": {"background": 0, "liver": 1, "tumour": 2}}
    tm = ThreatModel.from_plans(plans, "3d_cascade_fullres", dataset_json)
    assert (tm.num_channels, tm.previous_stage_channels, tm.num_input_channels) == (1, 2, 3)
    assert ThreatModel.from_plans(plans, "3d_fullres", dataset_json).previous_stage_channels == 0
    with pytest.raises(ThreatModelError, match="needs its labels"):
        ThreatModel.from_plans(plans, "3d_cascade_fullres").split(torch.zeros(1, 3, 4, 4, 4))
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 4, 4, 4, generator=generator)
    previous = (torch.rand(2, 2, 4, 4, 4, generator=generator) > 0.5).float()
    x = tm.join(image, previous)
    assert torch.equal(tm.split(x)[0], image) and torch.equal(tm.split(x)[1], previous)
    whole = tm.budget(x, eps_frac=4 / 255)
    assert torch.allclose(whole.eps[:, :1], tm.budget(image, eps_frac=4 / 255).eps)
    assert bool((whole.eps[:, 1:] == 0).all()) and bool(torch.isinf(whole.lower[:, 1:]).all())
    with pytest.raises(ThreatModelError, match="expected a network input"):
        tm.split(image)

    seen = []
    net = torch.nn.Conv3d(3, 3, 1)
    model = WithPreviousStage(lambda z: seen.append(z.shape[1]) or net(z), previous)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=generator)
    x_adv = build_attack("pgd", steps=2, **{k: v for k, v in tm.attack_budget(image, eps_frac=4 / 255,
                                                                              alpha_over_eps=0.5).items()
                                           if k != "window"})(model, image, labels)
    assert x_adv.shape == image.shape and set(seen) == {3}
    assert bool(((x_adv - image).abs() <= tm.budget(image, eps_frac=4 / 255).eps + 1e-6).all())
