"""NLCE modules and their insertion into dynamic_network_architectures networks (small, CPU)."""
import math
import tempfile

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_adv.modules.dual_norm import convert_to_dual_norm, forward_dual
from nnunet_adv.modules.nlce import NLCE, ContextEncoding, NonLocalBlock, insert_nlce

IN_KWARGS = {"eps": 1e-5, "affine": True}
ATOL = 1e-6  # identity at init is exact in practice (0 * y + x, z * 1.0); this bounds it


def build(kind: str, seed: int = 0, deep_supervision: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=3,
                  strides=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    if kind == "plain3d":
        net = PlainConvUNet(conv_op=nn.Conv3d, n_conv_per_stage=2, norm_op=nn.InstanceNorm3d,
                            norm_op_kwargs=IN_KWARGS, **common)
    elif kind == "plain2d":
        net = PlainConvUNet(conv_op=nn.Conv2d, n_conv_per_stage=2, norm_op=nn.InstanceNorm2d,
                            norm_op_kwargs=IN_KWARGS, **common)
    elif kind == "res2d":
        net = ResidualEncoderUNet(conv_op=nn.Conv2d, n_blocks_per_stage=1, norm_op=nn.InstanceNorm2d,
                                  norm_op_kwargs=IN_KWARGS, **common)
    else:
        raise ValueError(kind)
    net.apply(net.initialize)
    return net


def batch(kind: str, seed: int = 0, size: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((size, 1, 32, 32, 32) if "3d" in kind else (size, 1, 64, 64), generator=g)


def as_list(output):
    return list(output) if isinstance(output, (list, tuple)) else [output]


def ds_loss(output) -> torch.Tensor:
    return sum((o ** 2).mean() for o in as_list(output))


def nlces(network):
    return [m for m in network.modules() if isinstance(m, NLCE)]


def perturb_(module: nn.Module, seed: int):
    """Move every parameter away from its (partly zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------ non-local block

@pytest.mark.parametrize("dims, spatial", [(2, (16, 12)), (3, (8, 6, 5))])
def test_non_local_shape_identity_at_init_and_not_after(dims, spatial):
    block = NonLocalBlock(8, dims=dims)
    x = torch.randn(2, 8, *spatial)
    assert block(x).shape == x.shape
    torch.testing.assert_close(block(x), x, atol=ATOL, rtol=0)
    perturb_(block, 0)
    assert not torch.allclose(block(x), x, atol=1e-3)


@pytest.mark.parametrize("dims, spatial, subsample, expected_m", [
    (3, (8, 8, 8), 2, 64),           # N = 512: attention 512 x 64 instead of 512 x 512
    (3, (8, 8, 8), None, 512),
    (3, (5, 6, 1), 2, 3 * 3 * 1),    # odd sizes keep their border; a size-1 axis is not pooled
    (2, (16, 16), 2, 64),
    (2, (16, 16), (4, 2), 4 * 8),
])
def test_attention_matrix_is_bounded_by_subsampling(dims, spatial, subsample, expected_m):
    block = NonLocalBlock(4, dims=dims, subsample=subsample)
    seen = []
    block.attention.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    block(torch.randn(2, 4, *spatial))
    n = math.prod(spatial)
    assert seen == [(2, n, expected_m)]
    assert block.attention_size(spatial) == (n, expected_m)


# ------------------------------------------------------------------------ context encoding

def naive_encoding(module: ContextEncoding, z: torch.Tensor) -> torch.Tensor:
    """e_k = agg_i softmax_k(-s_k ||p_i - d_k||^2)(p_i - d_k), with an explicit (B, N, K, D) tensor."""
    p = module.project(z).flatten(2).transpose(1, 2)                  # (B, N, D)
    residual = p[:, :, None, :] - module.codewords[None, None]        # (B, N, K, D)
    assign = torch.softmax(-module.smoothing * (residual ** 2).sum(-1), dim=-1)
    e = (assign[..., None] * residual).sum(1)
    return e / p.shape[1] if module.aggregate == "mean" else e


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_encoding_matches_naive_formula(aggregate):
    module = ContextEncoding(6, num_codewords=5, reduced_channels=4, dims=2, aggregate=aggregate)
    z = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(module.encode(z), naive_encoding(module, z), atol=1e-5, rtol=1e-4)


def test_mean_encoding_does_not_depend_on_the_number_of_positions():
    """Tiling the input doubles N. The mean encoding stays, the sum doubles: the reason for mean."""
    torch.manual_seed(0)
    mean = ContextEncoding(6, num_codewords=4, dims=3, norm_op=nn.InstanceNorm3d, norm_op_kwargs=IN_KWARGS)
    summed = ContextEncoding(6, num_codewords=4, dims=3, norm_op=nn.InstanceNorm3d,
                             norm_op_kwargs=IN_KWARGS, aggregate="sum")
    summed.load_state_dict(mean.state_dict())
    z = torch.randn(2, 6, 4, 4, 4)
    tiled = torch.cat([z, z], dim=-1)  # same values, twice the positions (IN stats unchanged)
    torch.testing.assert_close(mean.encode(tiled), mean.encode(z), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(summed.encode(tiled), 2 * summed.encode(z), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dims, spatial", [(2, (6, 5)), (3, (4, 3, 5))])
def test_context_encoding_identity_at_init_only_for_scaled_gate(dims, spatial):
    z = torch.randn(2, 8, *spatial)
    module = ContextEncoding(8, dims=dims)
    for mode in (True, False):
        module.train(mode)
        torch.testing.assert_close(module(z), z, atol=ATOL, rtol=0)
    literal = ContextEncoding(8, dims=dims, gate="sigmoid")  # the paper's z * sigmoid(.)
    scale = literal.scale(z)
    assert scale.shape == (2, 8) and bool(((scale > 0) & (scale < 1)).all())
    assert not torch.allclose(literal(z), z)


def test_nlce_module_shapes_and_identity():
    for dims, spatial in [(2, (8, 8)), (3, (4, 4, 4))]:
        module = NLCE(16, dims=dims, num_codewords=8)
        x = torch.randn(2, 16, *spatial)
        torch.testing.assert_close(module(x), x, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        NLCE(4, dims=3, gate="tanh")


def test_encoding_runs_in_float32_under_autocast():
    module = NLCE(8, dims=2, num_codewords=4)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.context.encode(x).dtype == torch.float32
        out = module(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), x, atol=ATOL, rtol=0)  # identity survives autocast


# ------------------------------------------------------------------- insertion in networks

@pytest.mark.parametrize("kind, deep_supervision",
                         [("plain3d", True), ("plain2d", True), ("res2d", True), ("plain2d", False)])
def test_insert_keeps_shapes_keys_and_function(kind, deep_supervision):
    net = build(kind, deep_supervision=deep_supervision)
    x = batch(kind)
    keys_before = set(net.state_dict())
    channels_before = list(net.encoder.output_channels)
    net.eval()
    with torch.no_grad():
        before = as_list(net(x))

    assert insert_nlce(net) is net
    with torch.no_grad():
        after = as_list(net(x))
    assert [a.shape for a in after] == [b.shape for b in before]
    assert len(after) == (3 if deep_supervision else 1)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # Default placement: the bottleneck (NLCEN's rule for U-Nets), with matching width.
    assert net.encoder.output_channels == channels_before
    assert [m.channels for m in nlces(net)] == channels_before[-1:]
    # Every original key is still there; a plain checkpoint loads with only NLCE keys missing.
    new_keys = set(net.state_dict()) - keys_before
    assert keys_before <= set(net.state_dict()) and all(".nlce." in k for k in new_keys)
    result = net.load_state_dict(build(kind, seed=3, deep_supervision=deep_supervision).state_dict(),
                                 strict=False)
    # (BatchNorm fills a missing num_batches_tracked itself, so it is not reported.)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {k for k in new_keys if not k.endswith("num_batches_tracked")}
    # dynamic_network_architectures' memory estimate still runs and now counts the NLCEs.
    size = x.shape[2:]
    assert net.compute_conv_feature_map_size(size) > build(kind).compute_conv_feature_map_size(size)


def test_insert_identity_in_train_mode_and_stage_selection():
    net = build("plain3d").train()
    x = batch("plain3d")
    with torch.no_grad():
        before = net(x)
        insert_nlce(net, stages=[1, -1], num_codewords=8, subsample=(2, 2, 1))
        after = net(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert [m.channels for m in nlces(net)] == [8, 32]
    assert nlces(net)[0].non_local.subsample == (2, 2, 1)
    with pytest.raises(ValueError, match="already has an NLCE"):
        insert_nlce(net, stages=[1])
    with pytest.raises(IndexError):
        insert_nlce(build("plain2d"), stages=[4])


def test_attention_memory_bounded_inside_network():
    net = insert_nlce(build("plain3d"), stages=(-2, -1), subsample=2)
    seen = []
    for m in nlces(net):
        m.non_local.attention.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        net(batch("plain3d"))
    # 32^3 patch, strides 2: the coarse stages are 8^3 (N = 512) and 4^3 (N = 64); keys / 8.
    assert seen == [(1, 512, 64), (1, 64, 8)]


def test_automatic_subsampling_keeps_every_key_while_the_attention_fits(monkeypatch):
    """subsample='auto' (the default): N x N while it has at most ATTENTION_LIMIT entries, else keys
    max-pooled by the smallest power of 2 per axis that fits."""
    import nnunet_adv.modules.nlce as nlce_module

    block = NonLocalBlock(4, dims=3)
    assert block.attention_size((8, 8, 8)) == (512, 512)           # 2^18 entries: no subsampling
    monkeypatch.setattr(nlce_module, "ATTENTION_LIMIT", 512 * 64)
    assert block.attention_size((8, 8, 8)) == (512, 64)            # pooled by 2 per axis
    monkeypatch.setattr(nlce_module, "ATTENTION_LIMIT", 512 * 8)
    assert block.attention_size((8, 8, 8)) == (512, 8)             # by 4
    assert NonLocalBlock(4, dims=3, subsample=2).attention_size((8, 8, 8)) == (512, 64)


@pytest.mark.parametrize("kind", ["plain3d", "res2d"])
def test_gradients_reach_every_parameter(kind):
    """At init W_z and W_gamma are zero: they get gradients, everything behind them exact zeros.
    After one optimiser step has made them non-zero, every NLCE parameter gets a gradient."""
    net = insert_nlce(build(kind), num_codewords=8).train()
    x = batch(kind, size=1 if "3d" in kind else 2)  # the codeword BatchNorm1d works at batch 1
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)

    ds_loss(net(x)).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    for m in nlces(net):
        gates = {id(p) for p in (*m.non_local.w_z.parameters(), *m.context.fc.parameters())}
        for name, p in m.named_parameters():
            if id(p) in gates:
                assert torch.count_nonzero(p.grad) > 0, name
            else:
                assert torch.count_nonzero(p.grad) == 0, f"{name}: behind a zero-initialised gate"

    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    ds_loss(net(x)).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []


@pytest.mark.parametrize("kind", ["plain3d", "plain2d"])
def test_state_dict_loads_strictly_into_fresh_patched_network(kind):
    net = insert_nlce(build(kind, seed=0))
    for m in nlces(net):
        perturb_(m, 1)
    net.train()
    net(batch(kind))  # running statistics of the codeword BatchNorm
    with tempfile.TemporaryFile() as f:
        torch.save(net.state_dict(), f)
        f.seek(0)
        state = torch.load(f)
    fresh = insert_nlce(build(kind, seed=1))
    assert list(fresh.state_dict()) == list(state)
    fresh.load_state_dict(state, strict=True)
    net.eval()
    fresh.eval()
    x = batch(kind, seed=7)
    with torch.no_grad():
        for a, b in zip(net(x), fresh(x)):
            torch.testing.assert_close(a, b)


def test_nlce_then_dual_norm():
    """The intended order: insert NLCE, then dual norm, so NLCE's norms get two branches too."""
    net = convert_to_dual_norm(insert_nlce(build("plain2d"), num_codewords=8))
    for m in nlces(net):
        assert type(m.context.codeword_norm).__name__ == "DualNorm"
        assert type(m.context.project[1]).__name__ == "DualNorm"
    x = batch("plain2d", size=2)
    out_clean, out_adv = forward_dual(net, x, x + 0.1)
    assert [o.shape for o in out_clean] == [o.shape for o in out_adv]
