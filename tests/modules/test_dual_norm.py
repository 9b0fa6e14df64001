"""Dual normalisation on real dynamic_network_architectures networks (small, CPU)."""
import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_adv.modules.dual_norm import (
    ADV,
    CLEAN,
    DEFAULT_NORM_TYPES,
    DualNorm,
    DualRouteWrapper,
    convert_to_dual_norm,
    dual_norms,
    end_statistics_warm_ups,
    forward_dual,
    norm_route,
    set_norm_route,
    start_fresh_statistics,
)

FEATURES = [4, 8, 16, 32]
IN_KWARGS = {"eps": 1e-5, "affine": True}  # nnU-Net's default norm kwargs


def build(kind: str, seed: int = 0) -> nn.Module:
    """Small nnU-Net-like networks with deep supervision, as nnU-Net trains them."""
    torch.manual_seed(seed)
    common = dict(input_channels=1, n_stages=4, features_per_stage=FEATURES, kernel_sizes=3,
                  strides=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if kind == "plain3d_in":
        net = PlainConvUNet(conv_op=nn.Conv3d, n_conv_per_stage=2, norm_op=nn.InstanceNorm3d,
                            norm_op_kwargs=IN_KWARGS, **common)
    elif kind == "plain2d_bn":
        net = PlainConvUNet(conv_op=nn.Conv2d, n_conv_per_stage=2, norm_op=nn.BatchNorm2d,
                            norm_op_kwargs={}, **common)
    elif kind == "res2d_in":
        net = ResidualEncoderUNet(conv_op=nn.Conv2d, n_blocks_per_stage=1, norm_op=nn.InstanceNorm2d,
                                  norm_op_kwargs=IN_KWARGS, **common)
    else:
        raise ValueError(kind)
    net.apply(net.initialize)  # as nnU-Net's get_network_from_plans does
    return net


def batch(kind: str, seed: int = 0, size: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (size, 1, 32, 32, 32) if "3d" in kind else (size, 1, 64, 64)
    return torch.randn(shape, generator=g)


def plain_norms(network: nn.Module):
    """Norm modules not inside any DualNorm."""
    inside = {id(m) for d in dual_norms(network) for m in d.modules()}
    return [m for m in network.modules() if isinstance(m, DEFAULT_NORM_TYPES) and id(m) not in inside]


def n_params(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())  # parameters() de-duplicates shared ones


def ds_loss(output) -> torch.Tensor:
    """A loss touching every deep-supervision output (nnU-Net weights them all)."""
    return sum((o ** 2).mean() for o in output)


KINDS = ["plain3d_in", "plain2d_bn", "res2d_in"]


# --------------------------------------------------------------------------- DualNorm itself

def test_batchnorm_branches_keep_separate_statistics_and_momentum():
    bn = nn.BatchNorm2d(3)
    dual = DualNorm(bn, momentum=0.01).train()
    x = torch.randn(4, 3, 5, 5) + 2.0
    dual(x)  # route 0 by default
    batch_mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(dual.norms[0].running_mean, 0.01 * batch_mean)
    assert torch.count_nonzero(dual.norms[1].running_mean) == 0, "adversarial stats must be untouched"
    dual.route = ADV
    dual(-x)
    torch.testing.assert_close(dual.norms[1].running_mean, -0.01 * batch_mean)
    torch.testing.assert_close(dual.norms[0].running_mean, 0.01 * batch_mean)
    assert bn.momentum == 0.1, "the original module is copied, not modified"


def test_fresh_statistics_are_the_batches_average_without_the_initial_values():
    """A BatchNorm whose statistics start fresh averages its first 1/momentum batches with equal weights (no
    pull towards mean 0 / variance 1), then takes its exponential average at its own momentum."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5) * 2 + 3 for _ in range(6)]
    net = nn.Sequential(DualNorm(nn.BatchNorm2d(3), momentum=0.25)).train()   # warm-up: 4 batches
    bn = net[0].norms[CLEAN]
    bn.running_mean.fill_(7.0)
    start_fresh_statistics(bn)
    assert bn.momentum is None and torch.all(bn.running_mean == 0)
    means = [b.mean(dim=(0, 2, 3)) for b in batches]
    for i, b in enumerate(batches[:4]):
        assert end_statistics_warm_ups(net) == 1 and bn.momentum is None
        net(b)
        torch.testing.assert_close(bn.running_mean, torch.stack(means[:i + 1]).mean(0))
    assert end_statistics_warm_ups(net) == 0 and bn.momentum == 0.25
    net(batches[4])
    torch.testing.assert_close(bn.running_mean, 0.75 * torch.stack(means[:4]).mean(0) + 0.25 * means[4])
    # without the warm-up the initial 0 still weighs 0.75^4 = 0.32 after as many batches
    plain = nn.BatchNorm2d(3, momentum=0.25).train()
    for b in batches[:4]:
        plain(b)
    assert torch.all(plain.running_mean < 0.75 * torch.stack(means[:4]).mean(0))
    # the adversarial branch was never started fresh: untouched by end_statistics_warm_ups
    assert net[0].norms[ADV].momentum == 0.25


def test_instancenorm_branches_differ_only_in_affine():
    inorm = nn.InstanceNorm3d(3, **IN_KWARGS)
    with torch.no_grad():
        inorm.weight.uniform_(0.5, 1.5)
    dual = DualNorm(inorm, momentum=0.01)
    for branch in dual.norms:  # both start from the original initialisation
        assert branch is not inorm and branch.weight is not inorm.weight
        torch.testing.assert_close(branch.weight, inorm.weight)
        assert not branch.track_running_stats and branch.running_mean is None
    x = torch.randn(2, 3, 4, 4, 4)
    torch.testing.assert_close(dual(x), inorm(x))
    with torch.no_grad():
        dual.norms[1].bias.add_(1.0)
    dual.route = ADV
    torch.testing.assert_close(dual(x), inorm(x) + 1.0)


# ------------------------------------------------------------------- conversion of networks

@pytest.mark.parametrize("kind", KINDS)
def test_convert_replaces_every_norm_once_everywhere(kind):
    net = build(kind)
    x = batch(kind, size=1)
    originals = {id(m): m for m in net.modules() if isinstance(m, DEFAULT_NORM_TYPES)}
    affine = sum(p.numel() for m in originals.values() for p in m.parameters(recurse=False))
    params_before = n_params(net)
    net.eval()
    with torch.no_grad():
        reference = net(x)

    assert convert_to_dual_norm(net) is net
    duals = list(dual_norms(net))
    assert plain_norms(net) == []
    assert len(duals) == len(originals)
    assert n_params(net) == params_before + affine  # exactly one extra copy of the affine params
    # The twice-registered norm (.norm and .all_modules[i]) is one and the same DualNorm.
    for block in (m for m in net.modules() if isinstance(m, ConvDropoutNormReLU)):
        assert isinstance(block.norm, DualNorm)
        assert any(m is block.norm for m in block.all_modules)
    # Conversion keeps the function: the clean branch is a copy of the original norm.
    with torch.no_grad():
        converted = net(x)
    for a, b in zip(reference, converted):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["plain3d_in", "res2d_in"])
@pytest.mark.parametrize("route", [CLEAN, ADV])
def test_every_dual_norm_is_reached_through_the_selected_branch(kind, route):
    net = convert_to_dual_norm(build(kind))
    calls = {}
    handles = []
    for i, d in enumerate(dual_norms(net)):
        for b, branch in enumerate(d.norms):
            handles.append(branch.register_forward_hook(
                lambda m, inp, out, key=(i, b): calls.__setitem__(key, calls.get(key, 0) + 1)))
    set_norm_route(net, route)
    with torch.no_grad():
        net(batch(kind, size=1))
    for h in handles:
        h.remove()
    n = len(list(dual_norms(net)))
    assert sorted(calls) == [(i, route) for i in range(n)], "each DualNorm once, through `route` only"
    assert set(calls.values()) == {1}


def test_convert_twice_is_a_noop_and_momentum_is_set():
    net = convert_to_dual_norm(build("plain2d_bn"), momentum=0.01)
    keys = list(net.state_dict())
    convert_to_dual_norm(net, momentum=0.5)
    assert list(net.state_dict()) == keys
    assert {b.momentum for d in dual_norms(net) for b in d.norms} == {0.01}


# ------------------------------------------------------------------------------- routing

def test_set_route_and_context_manager_restore_each_module():
    net = convert_to_dual_norm(build("plain2d_bn"))
    duals = list(dual_norms(net))
    assert set_norm_route(net, ADV) == len(duals)
    duals[0].route = CLEAN  # a mixed state must be restored as it was
    with norm_route(net, ADV):
        assert {d.route for d in duals} == {ADV}
        with norm_route(net, CLEAN):
            assert {d.route for d in duals} == {CLEAN}
        assert {d.route for d in duals} == {ADV}
    assert duals[0].route == CLEAN and {d.route for d in duals[1:]} == {ADV}
    with pytest.raises(RuntimeError):
        with norm_route(net, CLEAN):
            raise RuntimeError("boom")
    assert duals[0].route == CLEAN and {d.route for d in duals[1:]} == {ADV}
    with pytest.raises(ValueError):
        set_norm_route(net, 2)


# ---------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", ["plain3d_in", "plain2d_bn"])
def test_state_dict_loads_strictly_into_fresh_converted_network(kind):
    net = convert_to_dual_norm(build(kind, seed=0), momentum=0.01)
    if "bn" in kind:  # make the BN running statistics differ between the branches
        net.train()
        for route in (CLEAN, ADV):
            with norm_route(net, route):
                net(batch(kind, seed=route) * (1 + route))
    with torch.no_grad():  # and the affine parameters
        for d in dual_norms(net):
            d.norms[1].weight.mul_(1.5)
    with tempfile.TemporaryFile() as f:
        torch.save(net.state_dict(), f)
        f.seek(0)
        state = torch.load(f)

    fresh = convert_to_dual_norm(build(kind, seed=1), momentum=0.01)
    assert list(fresh.state_dict()) == list(state)  # deterministic keys, same order
    fresh.load_state_dict(state, strict=True)
    net.eval()
    fresh.eval()
    x = batch(kind, seed=5, size=1)
    with torch.no_grad():
        saved, loaded = forward_dual(net, x, x), forward_dual(fresh, x, x)
    for route in (CLEAN, ADV):
        for a, b in zip(saved[route], loaded[route]):
            torch.testing.assert_close(a, b)
    assert not torch.allclose(saved[CLEAN][0], saved[ADV][0]), "the branches should differ here"


def test_plain_checkpoint_initialises_both_branches():
    plain = build("plain2d_bn", seed=0)
    plain.train()
    plain(batch("plain2d_bn"))  # non-trivial running statistics
    state = copy.deepcopy(plain.state_dict())
    dual = convert_to_dual_norm(build("plain2d_bn", seed=1))
    dual.load_state_dict(state, strict=True)
    plain.eval()
    dual.eval()
    x = batch("plain2d_bn", seed=3, size=1)
    with torch.no_grad():
        clean, adv = forward_dual(dual, x, x)
        for a, b, c in zip(plain(x), clean, adv):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)


# ------------------------------------------------------------------- gradients and DDP

@pytest.mark.parametrize("kind", ["plain3d_in", "plain2d_bn"])
def test_wrapper_gives_every_parameter_a_gradient(kind):
    net = convert_to_dual_norm(build(kind), momentum=0.01).train()
    x = batch(kind, size=1 if "3d" in kind else 2)
    x_adv = x + 0.1 * torch.randn_like(x)
    wrapper = DualRouteWrapper(net)
    out_clean, out_adv = wrapper(x, x_adv)
    (ds_loss(out_clean) + ds_loss(out_adv)).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    for d in dual_norms(net):
        for branch in d.norms:
            assert torch.count_nonzero(branch.weight.grad) > 0
    assert {d.route for d in dual_norms(net)} == {CLEAN}, "the wrapper restores the route"


@pytest.fixture
def single_process_group(tmp_path):
    """A 1-process gloo group: enough for DDP's unused-parameter check to fire."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_accepts_wrapper_and_rejects_single_branch_steps(single_process_group):
    x = batch("plain2d_bn", size=2)[..., :32, :32]
    ddp = DDP(DualRouteWrapper(convert_to_dual_norm(build("plain2d_bn"))))
    for _ in range(2):  # the reducer complains at the *next* step
        out_clean, out_adv = ddp(x, x + 0.1)
        (ds_loss(out_clean) + ds_loss(out_adv)).backward()

    # One branch per step leaves the other branch without gradients; DDP refuses that.
    ddp_plain = DDP(convert_to_dual_norm(build("plain2d_bn")))
    with pytest.raises(RuntimeError, match="parameters that were not used"):
        for _ in range(2):
            ds_loss(ddp_plain(x)).backward()
