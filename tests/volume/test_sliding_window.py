"""Tests of nnunet_adv.volume.sliding_window.SlidingWindowModel (CPU, tiny networks).

References used:
  * nnU-Net's own ``nnUNetPredictor`` (forward): constructed directly and given the few fields
    its sliding-window code reads (network, configuration_manager.patch_size,
    label_manager.num_segmentation_heads, allowed_mirroring_axes, list_of_parameters).
    nnU-Net accumulates the tiles in float16; ``accumulation_dtype=torch.float16`` must match it
    bit for bit, and the default float32 mode must match nnU-Net's code run with float32
    accumulators (obtained by pointing the ``torch.half`` it reads at float32).
  * a naive full-graph sliding window written here (gradient): every tile stays in one autograd
    graph, so ``torch.autograd.grad`` gives the reference gradient.
"""
import copy
import itertools
import types
import warnings
import weakref

import nnunetv2.inference.predict_from_raw_data as nnunet_predict_module
import pytest
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import nn

from nnunet_adv.volume.sliding_window import SlidingWindowModel

N_IN, N_CLASSES = 2, 3
PATCH_3D, SHAPE_3D = (12, 16, 16), (20, 24, 28)
PATCH_2D = (16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# tiny networks
# ----------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """conv-IN-LReLU-conv-IN-LReLU-conv; optionally returns a deep-supervision list."""

    def __init__(self, dim: int, deep_supervision: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        self.body = nn.Sequential(conv(N_IN, 6, 3, padding=1), norm(6, affine=True), nn.LeakyReLU(0.01),
                                  conv(6, 6, 3, padding=1), norm(6, affine=True), nn.LeakyReLU(0.01))
        self.head = conv(6, N_CLASSES, 1)
        self.low_res_head = conv(6, N_CLASSES, 1)
        self.dim = dim
        self.deep_supervision = deep_supervision

    def forward(self, x):
        features = self.body(x)
        out = self.head(features)
        if self.deep_supervision:
            pooled = F.avg_pool3d(features, 2) if self.dim == 3 else F.avg_pool2d(features, 2)
            return [out, self.low_res_head(pooled)]
        return out


def tiny_nets(dim, n=1, deep_supervision=False):
    return [TinyNet(dim, deep_supervision, seed=i).eval() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
class _TorchWithFloat32Half(types.ModuleType):
    """``torch`` as seen by nnU-Net's predictor module, except that ``torch.half`` is float32."""

    def __init__(self):
        super().__init__("torch")
        self.half = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def nnunet_logits(nets, patch, mirror_axes, volume, monkeypatch=None, use_gaussian=True):
    """nnU-Net's own prediction: (1, C, *spatial) -> (1, K, *spatial) float32.

    With ``monkeypatch`` the predictor's accumulators are float32 instead of float16.
    """
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=use_gaussian,
                                use_mirroring=mirror_axes is not None,
                                perform_everything_on_device=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    # predict_logits_from_preprocessed_data loads each fold's weights into one network.
    predictor.network = copy.deepcopy(nets[0])
    predictor.list_of_parameters = [n.state_dict() for n in nets]
    predictor.configuration_manager = types.SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = types.SimpleNamespace(num_segmentation_heads=N_CLASSES)
    predictor.allowed_mirroring_axes = mirror_axes
    if monkeypatch is not None:
        monkeypatch.setattr(nnunet_predict_module, 'torch', _TorchWithFloat32Half())
    data = volume[0] if volume.ndim == 5 else volume[0][:, None]  # nnU-Net wants (C, Z, Y, X)
    out = predictor.predict_logits_from_preprocessed_data(data)
    if monkeypatch is not None:
        monkeypatch.undo()
    return out.float().reshape(1, N_CLASSES, *volume.shape[2:])


def naive_logits(nets, patch, mirror_axes, volume, use_gaussian=True, step=0.5):
    """Full-graph sliding window written independently of the module under test.

    volume (1, C, *spatial) -> (1, K, *spatial); every tile stays in the autograd graph.
    """
    data = volume[0] if (len(patch) == 3 or volume.ndim == 5) else volume[0][:, None]
    padded, revert = pad_nd_image(data, patch, 'constant', {'value': 0}, True, None)  # F.pad
    spatial = padded.shape[1:]
    two_d = len(patch) == 2
    steps = compute_steps_for_sliding_window(spatial[1:] if two_d else spatial, patch, step)
    if two_d:
        positions = [(z, *s) for z in range(spatial[0]) for s in itertools.product(*steps)]
    else:
        positions = list(itertools.product(*steps))
    g = compute_gaussian(tuple(patch), 1. / 8, 10, dtype=torch.float16, device=torch.device('cpu')).float() \
        if use_gaussian else torch.ones(patch)
    dims = [m + 2 for m in (mirror_axes or ())]
    flips = [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]

    def tile_slicer(pos):
        if two_d:
            return (slice(None), pos[0], *[slice(p, p + t) for p, t in zip(pos[1:], patch)])
        return (slice(None), *[slice(p, p + t) for p, t in zip(pos, patch)])

    results = []
    for net in nets:
        logits = torch.zeros((N_CLASSES, *spatial))
        weights = torch.zeros(spatial)
        for pos in positions:
            s = tile_slicer(pos)
            tile = padded[s][None]
            pred = sum(torch.flip(_first(net(torch.flip(tile, f))), f) if f else _first(net(tile))
                       for f in flips) / len(flips)
            canvas = torch.zeros_like(logits)
            canvas[s] = pred[0] * g
            logits = logits + canvas  # out of place: keeps every tile in the graph
            weights[s[1:]] += g
        results.append((logits / weights)[(slice(None), *revert[1:])])
    out = sum(results) / len(results)
    return out.reshape(1, N_CLASSES, *volume.shape[2:])


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def ce_loss(logits, target):
    return F.cross_entropy(logits, target)


def random_case(dim, shape, seed=1):
    torch.manual_seed(seed)
    volume = torch.randn(1, N_IN, *shape)
    target = torch.randint(0, N_CLASSES, (1, *shape))
    return volume, target


# (dimension of the networks, patch, volume spatial shape, mirror axes)
CASES = {
    '3d': (3, PATCH_3D, SHAPE_3D, None),
    '3d_mirror': (3, PATCH_3D, SHAPE_3D, (0, 2)),
    '3d_padded': (3, PATCH_3D, (9, 20, 13), (1,)),       # smaller than the patch on 2 axes
    '2d_on_3d_mirror': (2, PATCH_2D, (3, 24, 28), (0, 1)),  # slice by slice along Z
    '2d_image': (2, PATCH_2D, (26, 20), (1,)),              # plain (1, C, Y, X)
}


# ----------------------------------------------------------------------------------------------
# forward equals nnU-Net
# ----------------------------------------------------------------------------------------------
# every case with one network, and fold ensembles on a 3D and a 2D configuration
FORWARD_CASES = [(case, 1) for case in CASES] + [('3d_mirror', 2), ('2d_on_3d_mirror', 2)]


@pytest.mark.parametrize('case,n_nets', FORWARD_CASES)
def test_forward_float16_matches_nnunet_predictor_bitwise(case, n_nets):
    dim, patch, shape, mirror = CASES[case]
    nets = tiny_nets(dim, n_nets)
    volume, _ = random_case(dim, shape)
    ref = nnunet_logits(nets, patch, mirror, volume)
    with torch.no_grad():
        out = SlidingWindowModel(nets, patch, mirror_axes=mirror, accumulation_dtype=torch.float16)(volume)
    assert out.shape == (1, N_CLASSES, *shape)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize('case,n_nets', FORWARD_CASES)
def test_forward_float32_matches_nnunet_code_with_float32_accumulators(case, n_nets, monkeypatch):
    dim, patch, shape, mirror = CASES[case]
    nets = tiny_nets(dim, n_nets)
    volume, _ = random_case(dim, shape)
    ref = nnunet_logits(nets, patch, mirror, volume, monkeypatch=monkeypatch)
    with torch.no_grad():
        out = SlidingWindowModel(nets, patch, mirror_axes=mirror)(volume)
    assert (out - ref).abs().max().item() < 1e-5
    # and the naive reference agrees (it is the gradient reference below)
    with torch.no_grad():
        naive = naive_logits(nets, patch, mirror, volume)
    assert (out - naive).abs().max().item() < 1e-5


def test_forward_without_gaussian_and_tile_batching(monkeypatch):
    nets = tiny_nets(3)
    volume, _ = random_case(3, SHAPE_3D)
    ref = nnunet_logits(nets, PATCH_3D, None, volume, monkeypatch=monkeypatch, use_gaussian=False)
    with torch.no_grad():
        out = SlidingWindowModel(nets, PATCH_3D, use_gaussian=False, tile_batch_size=4)(volume)
    assert (out - ref).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------------
# gradient equals the full-graph gradient
# ----------------------------------------------------------------------------------------------
def _volume_gradient(model, volume, target):
    x = volume.clone().requires_grad_(True)
    loss = ce_loss(model(x), target)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize('case,n_nets,tile_batch', [
    ('3d', 1, 1), ('3d_mirror', 1, 1), ('3d_padded', 1, 1), ('2d_on_3d_mirror', 1, 1),
    ('2d_image', 1, 1), ('3d', 2, 1), ('3d_mirror', 2, 3), ('2d_on_3d_mirror', 2, 4),
])
def test_gradient_equals_full_graph_gradient(case, n_nets, tile_batch):
    dim, patch, shape, mirror = CASES[case]
    nets = tiny_nets(dim, n_nets)
    volume, target = random_case(dim, shape)
    vm = SlidingWindowModel(nets, patch, mirror_axes=mirror, tile_batch_size=tile_batch)
    loss, grad = _volume_gradient(vm, volume, target)
    loss_ref, grad_ref = _volume_gradient(lambda x: naive_logits(nets, patch, mirror, x), volume, target)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
    rel = (grad - grad_ref).norm() / grad_ref.norm()
    assert rel.item() < 1e-4, rel.item()
    assert (grad - grad_ref).abs().max().item() < 1e-4 * grad_ref.abs().max().item()


def test_backward_via_loss_backward_fills_only_the_input_grad():
    nets = tiny_nets(3)
    for p in nets[0].parameters():
        assert p.grad is None
    volume, target = random_case(3, SHAPE_3D)
    x = volume.clone().requires_grad_(True)
    ce_loss(SlidingWindowModel(nets, PATCH_3D)(x), target).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in nets[0].parameters())


# ----------------------------------------------------------------------------------------------
# memory: the backward holds the graph of one network forward at a time
# ----------------------------------------------------------------------------------------------
class _Box:
    """A weak-referenceable holder (SimpleNamespace is not)."""

    def __init__(self, tensor=None):
        self.tensor = tensor


class SavedTensorMeter:
    """Tracks the bytes of tensors autograd currently keeps saved for backward.

    Every tensor saved by any graph passes through the pack hook; its box is released when
    the graph that holds it is freed, so ``live`` is the memory held by autograd graphs.
    """

    def __init__(self):
        self.live = self.peak = self.packs = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        box = _Box(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.packs += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._release, nbytes)
        return box

    def _release(self, nbytes):
        self.live -= nbytes

    @staticmethod
    def _unpack(box):
        return box.tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _one_tile_graph_bytes(net, patch, n_batch=1):
    """Saved-tensor bytes of one network forward on ``n_batch`` tiles."""
    tile = torch.randn(n_batch, N_IN, *patch, requires_grad=True)
    with SavedTensorMeter() as meter:
        out = net(tile)
    assert meter.live > 0
    del out
    return meter.peak


class ForwardCounter:
    """Counts network forward calls made with grad enabled, and the most alive at once."""

    def __init__(self, net):
        self.calls = self.alive = self.max_alive = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():
            self.calls += 1
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
            self._track(output)

    def _track(self, output):
        # the output's autograd node lives exactly as long as its graph; a hook registered on it
        # holds ``box``, so the box's finaliser runs when the graph is freed
        box = _Box()
        output.grad_fn.register_hook(lambda *a, b=box: None)  # graph keeps the lambda -> box
        weakref.finalize(box, self._dead)

    def _dead(self):
        self.alive -= 1


@pytest.mark.parametrize('mirror,tile_batch', [(None, 1), ((0, 2), 1), ((0, 2), 3)])
def test_backward_holds_one_tile_graph_at_a_time(mirror, tile_batch):
    net = tiny_nets(3)[0]
    volume, target = random_case(3, SHAPE_3D)
    one_forward = _one_tile_graph_bytes(net, PATCH_3D, tile_batch)
    volume_bytes = volume.numel() * volume.element_size()
    vm = SlidingWindowModel(net, PATCH_3D, mirror_axes=mirror, tile_batch_size=tile_batch)
    n_tiles, n_flips = vm.num_tiles(volume), 2 ** len(mirror or ())
    assert n_tiles >= 12  # several overlapping tiles

    x = volume.clone().requires_grad_(True)
    counter = ForwardCounter(net)
    with SavedTensorMeter() as meter:
        loss = ce_loss(vm(x), target)
        after_forward = meter.live
        packs_forward = meter.packs
        (grad,) = torch.autograd.grad(loss, x)
    # the forward keeps no tile activations: only the input volume and the loss's tensors
    logits_bytes = volume_bytes // N_IN * N_CLASSES
    # (CE saves log-probabilities twice, the target and a scalar weight)
    assert after_forward <= volume_bytes + 2 * logits_bytes + target.numel() * target.element_size() + 64
    # the backward really recomputed tiles with a graph (the meter saw them) ...
    assert meter.packs > packs_forward
    assert counter.calls == -(-n_tiles // tile_batch) * n_flips == vm.num_network_forwards(volume)
    # ... but never held more than one network forward's graph at a time
    assert counter.max_alive == 1
    assert meter.peak <= after_forward + 1.05 * one_forward

    # the naive full-graph implementation holds all of them
    x2 = volume.clone().requires_grad_(True)
    with SavedTensorMeter() as naive_meter:
        ce_loss(naive_logits([net], PATCH_3D, mirror, x2), target)
    assert naive_meter.peak >= 0.9 * n_tiles * n_flips * _one_tile_graph_bytes(net, PATCH_3D)
    assert naive_meter.peak > 5 * meter.peak


@pytest.mark.parametrize('n_cached', [5, 1000])
def test_cached_tile_graphs_trade_memory_for_recomputation(n_cached):
    nets = tiny_nets(3, 2)
    volume, target = random_case(3, SHAPE_3D)
    mirror = (1,)
    vm = SlidingWindowModel(nets, PATCH_3D, mirror_axes=mirror, cache_tile_graphs=n_cached)
    units = vm.num_network_forwards(volume)
    kept = min(n_cached, units)
    one_forward = _one_tile_graph_bytes(nets[0], PATCH_3D)
    counters = [ForwardCounter(net) for net in nets]
    x = volume.clone().requires_grad_(True)
    with SavedTensorMeter() as meter:
        loss = ce_loss(vm(x), target)
        assert sum(c.calls for c in counters) == kept  # graphs built in the forward pass
        assert meter.live >= kept * one_forward
        (grad,) = torch.autograd.grad(loss, x)
    assert sum(c.calls for c in counters) == units  # cached units are not recomputed
    assert sum(c.max_alive for c in counters) <= kept + 1
    _, grad_ref = _volume_gradient(SlidingWindowModel(nets, PATCH_3D, mirror_axes=mirror), volume, target)
    assert (grad - grad_ref).norm() / grad_ref.norm() < 1e-6
    # without a volume that requires grad nothing is cached
    calls = sum(c.calls for c in counters)
    with torch.enable_grad():
        vm(volume)
    assert sum(c.calls for c in counters) == calls


# ----------------------------------------------------------------------------------------------
# the networks are left alone; deep supervision
# ----------------------------------------------------------------------------------------------
def test_parameter_grads_and_modes_untouched():
    nets = tiny_nets(3, 2)
    sentinel = [torch.full_like(p, 7.) for p in nets[0].parameters()]
    for p, s in zip(nets[0].parameters(), sentinel):
        p.grad = s.clone()
    nets[1].train()  # a network in training mode stays in training mode (with a warning)
    vm = SlidingWindowModel(nets, PATCH_3D, mirror_axes=(0,))
    volume, target = random_case(3, SHAPE_3D)
    with pytest.warns(UserWarning, match='training mode'):
        _volume_gradient(vm, volume, target)
    assert nets[0].training is False and nets[1].training is True
    assert all(torch.equal(p.grad, s) for p, s in zip(nets[0].parameters(), sentinel))
    assert all(p.grad is None for p in nets[1].parameters())


def test_module_training_flag_follows_networks_without_changing_them():
    net = tiny_nets(3)[0]
    vm = SlidingWindowModel(net, PATCH_3D)
    assert vm.training is False and net.training is False
    assert list(vm.parameters())  # networks are registered (for .to(device), attack libraries)


def test_deep_supervision_list_outputs_use_full_resolution():
    plain = tiny_nets(3)[0]
    deep = tiny_nets(3, deep_supervision=True)[0]
    volume, target = random_case(3, SHAPE_3D)
    loss_p, grad_p = _volume_gradient(SlidingWindowModel(plain, PATCH_3D, mirror_axes=(2,)), volume, target)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loss_d, grad_d = _volume_gradient(SlidingWindowModel(deep, PATCH_3D, mirror_axes=(2,)), volume, target)
    assert torch.equal(loss_p, loss_d) and torch.equal(grad_p, grad_d)
    with pytest.raises(TypeError, match='deep supervision'):
        SlidingWindowModel(deep, PATCH_3D, deep_supervision_first_only=False)(volume)


def test_batch_of_volumes_and_no_grad_prediction():
    net = tiny_nets(3)[0]
    volumes = torch.randn(2, N_IN, *SHAPE_3D)
    vm = SlidingWindowModel(net, PATCH_3D)
    with torch.no_grad():
        both = vm(volumes)
        one = vm(volumes[1:])
    assert torch.equal(both[1:], one)
    assert not both.requires_grad
