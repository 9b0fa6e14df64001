"""VAFA at the authors' geometry (issue 18): the reference's tile in millimetres mapped with the
case's spacing, its 32^3 blocks, one quantisation table per tile (computed as the reference
computes each tile), and the paper's text as its own variant (q from 1, Dice loss); 2D and 3D,
with and without deep supervision."""
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import make_task, trained_model

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import attack_defaults, available_attacks, build_attack
from nnunet_adv.attacks.vafa import _minmax
from nnunet_adv.attacks.vafa_tiles import REF_TILE_MM, tile_boxes, tile_voxels
from nnunet_adv.errors import UserError
from nnunet_adv.frequency import block_dct, block_idct, from_blocks, soft_round
from nnunet_adv.losses import monai_dice_ce, monai_dice_loss
from nnunet_adv.threat_model import ThreatModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(nsp, ds, n=2, size=16, seed=7):
    x, y = make_task(nsp, n=n, size=size, seed=seed)
    labels = [y, F.interpolate(y.float(), scale_factor=0.5, mode="nearest").long()] if ds else y
    return x, y, labels


def test_published_defaults_of_each_variant():
    ref, paper, hybrid = (attack_defaults(n) for n in ("vafa-3d-ref", "vafa-3d-paper", "vafa-3d"))
    assert "vafa-3d-paper" in available_attacks()
    # the authors' code: 32^3 blocks, tiles of 96 voxels at 2 x 1.5 x 1.5 mm (z, y, x), a table per tile
    assert ref["block_size"] == (32, 32, 32) and ref["tile_mm"] == (192.0, 144.0, 144.0) == REF_TILE_MM
    assert ref["rescale_tile"] is None and ref["tile_tables"] is True and ref["renormalize_slices"] is True
    assert (ref["q_init"], ref["q_min"], ref["q_max"]) == (None, 5.0, 20.0)   # None: from q_max
    # the paper's text: q from 1 within [1, q_max], 32^3 blocks, no tiles, no rescale
    assert (paper["q_init"], paper["q_min"], paper["q_max"], paper["block_size"]) == (1.0, 1.0, 20.0, (32, 32, 32))
    assert paper["tile_tables"] is False and paper["renormalize_slices"] is False and paper["tile_mm"] is None
    # the hybrid keeps its defaults (the measured tables and VAFT use them)
    assert (hybrid["q_init"], hybrid["q_min"], hybrid["block_size"], hybrid["tile_tables"]) == (None, 5.0, (8, 8, 8),
                                                                                             False)
    assert attack_defaults("vafa-2d-ref")["tile_tables"] is True
    assert attack_defaults("slice-rescale")["tile_mm"] == REF_TILE_MM


def test_tile_in_millimetres_maps_to_voxels_of_the_cases_spacing():
    # hand-computed: 192 / 2.5 = 76.8 -> 77; 144 / 0.8 = 180; 144 / 0.7 = 205.7 -> 206
    assert tile_voxels(REF_TILE_MM, (2.5, 0.8, 0.7)) == (77, 180, 206)
    assert tile_voxels(REF_TILE_MM, None) == (96, 96, 96)                 # the reference's own grid
    assert tile_voxels((10.0, 3.0, 3.0), (4.0, 2.0, 7.0)) == (3, 2, 1)     # 2.5 rounds half up; at least 1
    assert build_attack("vafa-3d-ref", spacing=(2.5, 0.8, 0.7)).tile() == (77, 180, 206)
    assert build_attack("vafa-3d-ref").tile() == (96, 96, 96)
    # a voxel tile still works and wins over the millimetres
    assert build_attack("vafa-3d-ref", rescale_tile=20, spacing=(2.5, 0.8, 0.7)).tile() == (20, 20, 20)
    assert build_attack("slice-rescale", spacing=(1.0, 1.0, 1.0)).tile() == (192, 144, 144)
    with pytest.raises(ValueError, match="a 3D volume needs a 3D spacing"):
        build_attack("vafa-3d-ref", spacing=(0.8, 0.7)).tile()


def test_the_attack_configuration_passes_the_spacing_and_refuses_it_from_a_user():
    x = torch.rand(1, 1, 8, 8, 8)
    tm = ThreatModel(["ZScoreNormalization"])
    attack = AttackConfig.parse("vafa-3d-ref").build(tm, x, spacing=[3.0, 1.0, 1.0])
    assert attack.options["spacing"] == (3.0, 1.0, 1.0) and attack.tile() == (64, 144, 144)
    assert "spacing" not in AttackConfig.parse("pgd").network_options(tm, x, spacing=[3.0, 1.0, 1.0])
    with pytest.raises(UserError, match="spacing"):
        AttackConfig.parse("vafa-3d-ref:spacing=(1,1,1)")
    assert AttackConfig.parse("vafa-3d-ref:tile_mm=(60,30,30)").build(tm, x, spacing=(3, 1, 1)).tile() == (20, 30, 30)


def test_block_32_on_a_40_cube_runs_and_a_larger_block_is_refused_in_one_line():
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x, y = torch.rand(1, 1, 40, 40, 40), torch.randint(0, 2, (1, 1, 40, 40, 40))
    xa = build_attack("vafa-3d-ref", steps=1, lower=0.0, upper=1.0)(net, x, y)   # padded to 64^3 inside the tile
    assert xa.shape == x.shape and torch.isfinite(xa).all()
    with pytest.raises(ValueError, match=r"block_size \(48, 48, 48\) is larger than the tile's") as e:
        build_attack("vafa-3d-ref", block_size=48)(net, x, y)
    assert "\n" not in str(e.value)


def _tiled(name="vafa-3d-ref", **options):
    """A -ref attack on a 10 x 8 x 8 volume in 8^3 tiles: along the first axis one at 0 and one moved
    back to 2 (it overwrites rows 2-7 of the first; its blocks start at rows 2 and 6, off the
    volume's block grid 0, 4, 8); 4^3 blocks."""
    return build_attack(name, rescale_tile=8, block_size=4, lower=0.0, upper=1.0, **options)


def test_each_tile_has_its_own_table_and_no_other_tile_moves_it():
    attack = _tiled()
    x01 = torch.rand(1, 1, 10, 8, 8, dtype=torch.float64)
    coeffs, _, sizes = attack.frequency_coefficients(x01)
    assert coeffs.shape == (1, 1, 2, 2, 2, 2, 4, 4, 4)   # (B, C, tiles, blocks.., coefficients..): the reference's
    q = torch.full_like(coeffs, 20.0, requires_grad=True)
    x_adv, _ = attack.reconstruct(coeffs, q, 0.05, sizes)
    g_first, = torch.autograd.grad(x_adv[:, :, :2].square().sum(), q)      # rows only the first tile writes
    assert g_first[:, :, 0].abs().sum() > 0 and g_first[:, :, 1].abs().sum() == 0
    x_adv, _ = attack.reconstruct(coeffs, q, 0.05, sizes)
    g_last, = torch.autograd.grad(x_adv[:, :, 2:].square().sum(), q)       # the overlap belongs to the later tile
    assert g_last[:, :, 0].abs().sum() == 0 and g_last[:, :, 1].abs().sum() > 0
    # one table per volume instead: one block grid over the whole image (10 rows padded to 12)
    whole = _tiled(tile_tables=False)
    assert whole.frequency_coefficients(x01)[0].shape == (1, 1, 3, 2, 2, 4, 4, 4)


def _reference_tiles(x01, q_tables, boxes, block, a):
    """The reference's computation, tile by tile (``generate_adv_samples.py`` + ``VAFA.forward``):
    each tile's blocks quantised with its own tables, every axial slice of the tile rescaled to
    [0, 1], the tiles written in order."""
    out = torch.zeros_like(x01)
    for k, box in enumerate(boxes):
        idx = (slice(None), slice(None)) + tuple(slice(s, e) for s, e in box)
        tile = x01[idx]
        table = from_blocks(q_tables[:, :, k], block)                      # the table in image layout
        coeffs = block_dct(tile * 255.0 - 128.0, block)
        rec = (block_idct(soft_round(coeffs / table, a) * table, block) + 128.0) / 255.0
        mn, mx = rec.amin(dim=(3, 4), keepdim=True), rec.amax(dim=(3, 4), keepdim=True)
        out[idx] = (rec - mn) / (mx - mn)
    return out


def test_tables_per_tile_reproduce_the_references_tiles():
    attack = _tiled()
    x01 = torch.rand(2, 1, 10, 8, 8)                      # the transforms run in fp32
    coeffs, _, sizes = attack.frequency_coefficients(x01)
    q = 5.0 + 15.0 * torch.rand(coeffs.shape, generator=torch.Generator().manual_seed(1))
    ours, _ = attack.reconstruct(coeffs, q, 0.05, sizes)
    boxes = tile_boxes((10, 8, 8), (8, 8, 8))
    assert [b[0] for b in boxes] == [(0, 8), (2, 10)]
    expected = _reference_tiles(x01, q, boxes, (4, 4, 4), 0.05)
    assert torch.allclose(ours, expected, atol=1e-6)
    # one table per volume (the previous behaviour) is not the reference's: the later tile's blocks differ
    flat = _tiled(tile_tables=False)
    c2, _, s2 = flat.frequency_coefficients(x01)
    other, _ = flat.reconstruct(c2, torch.full_like(c2, 12.0), 0.05, s2)
    assert not torch.allclose(other, _reference_tiles(x01, torch.full_like(q, 12.0), boxes, (4, 4, 4), 0.05))


def test_the_2d_variant_keeps_a_table_per_tile_and_slice():
    attack = _tiled("vafa-2d-ref")
    x01 = torch.rand(1, 1, 12, 8, 8)
    coeffs, _, sizes = attack.frequency_coefficients(x01)
    assert coeffs.shape == (1, 1, 2, 8, 2, 2, 4, 4)       # (B, C, tiles, slices, blocks.., coefficients..)
    x_adv, _ = attack.reconstruct(coeffs, torch.full_like(coeffs, 9.0), 0.05, sizes)
    assert x_adv.shape == x01.shape
    assert torch.allclose(x_adv[:, :, 4:].amin(dim=(3, 4)), torch.zeros(1))   # the later tile's rescaled slices
    assert torch.allclose(_minmax(x_adv[:, :, 8:], (3, 4)), x_adv[:, :, 8:])


@pytest.mark.parametrize("name,nsp,first_q", [("vafa-3d-ref", 3, (19.0, 20.0)), ("vafa-2d-ref", 3, (19.0, 20.0)),
                                              ("vafa-2d-ref", 2, (19.0, 20.0)), ("vafa-3d-paper", 3, (1.0, 2.0))])
@pytest.mark.parametrize("ds", [False, True])
def test_variants_keep_the_budget_and_raise_their_loss(name, nsp, first_q, ds):
    net = trained_model(nsp, deep_supervision=ds)
    x, y, labels = _data(nsp, ds)
    small = {"block_size": 4} if nsp == 2 else {"block_size": 8}
    tiles = {"rescale_tile": (8, 16, 16)} if name.endswith("-ref") and nsp == 3 else {}
    one = build_attack(name, steps=1, lower=0.0, upper=1.0, **small, **tiles)
    one(net, x, labels)
    assert set(one.q_tables.unique().tolist()) <= set(first_q)     # one step from the variant's initial q
    attack = build_attack(name, steps=4, lower=0.0, upper=1.0, **small, **tiles)
    xa = attack(net, x, labels)
    assert xa.shape == x.shape and float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0   # inside the window
    q = attack.q_tables
    o = attack.options
    assert float(q.min()) >= o["q_min"] and float(q.max()) <= o["q_max"]
    if name.endswith("-ref") and nsp == 3:
        assert q.shape[2] == 2                                      # two tiles along the slice axis: two tables
    loss = monai_dice_loss if name == "vafa-3d-paper" else monai_dice_ce
    with torch.no_grad():
        assert float(loss(net(xa), y)) > float(loss(net(x), y))


def test_the_paper_variant_ascends_the_dice_loss(monkeypatch):
    import nnunet_adv.attacks.vafa as vafa

    calls = []
    monkeypatch.setattr(vafa, "monai_dice_loss", lambda out, y: calls.append(1) or monai_dice_loss(out, y))
    net = trained_model(3)
    x, _, labels = _data(3, False)
    build_attack("vafa-3d-paper", steps=2, block_size=8, lower=0.0, upper=1.0)(net, x, labels)
    assert len(calls) == 2
