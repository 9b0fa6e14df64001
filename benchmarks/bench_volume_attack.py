"""Benchmark of the whole-volume attack engine (nnunet_adv.volume.sliding_window).

Measures, with a small nnU-Net PlainConvUNet in eval mode:
  (a) peak memory of one attack step (forward + CE loss + backward to the volume) on a volume V
      and on a volume with 4x the voxels; each size runs in a fresh subprocess so that the
      process's max RSS (CPU) or torch.cuda.max_memory_allocated (CUDA) belongs to that size;
  (b) time per tile of the attack step for both sizes (should be flat: linear total time);
  (c) one attack step against one plain sliding-window prediction without mirroring under
      no_grad (nnU-Net's own nnUNetPredictor, and SlidingWindowModel under no_grad), with the
      per-tile floor of the two-pass approach and the naive one-graph alternative.

Usage (this is what docs/whole_volume.md reports):
    /work/venv/bin/python benchmarks/bench_volume_attack.py --threads 1

Not a test: nothing is asserted; ratios are printed with their targets.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 3


# ----------------------------------------------------------------------------------------------
# set-up shared by the workers
# ----------------------------------------------------------------------------------------------
def build_network(device: torch.device) -> nn.Module:
    """Small nnU-Net PlainConvUNet: 4 stages, 8..64 features, InstanceNorm, eval mode."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(0)
    net = PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 64],
                        conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2,
                        num_classes=N_CLASSES, n_conv_per_stage_decoder=2, conv_bias=True,
                        norm_op=nn.InstanceNorm3d, norm_op_kwargs={'eps': 1e-5, 'affine': True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True}, deep_supervision=False)
    return net.to(device).eval()


def make_case(shape, device):
    torch.manual_seed(1)
    volume = torch.randn(1, 1, *shape, device=device)
    target = torch.randint(0, N_CLASSES, (1, *shape), device=device)
    return volume, target


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of one call.

    On the CPU the seconds are this process's CPU time (all its threads): on a shared machine
    other processes inflate wall time by a varying factor but not CPU time, and with one thread
    CPU time is the wall time an idle machine would show.  On CUDA: wall time.
    """
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    sync(device)
    start = clock()
    result = fn()
    sync(device)
    return clock() - start, result


def current_rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def attack_step(vm, volume, target):
    """One attack step: forward, CE loss on the stitched logits, gradient w.r.t. the volume.

    Returns (t_forward, t_backward) in seconds.
    """
    device = volume.device
    x = volume.clone().requires_grad_(True)
    t_fwd, loss = timed(lambda: F.cross_entropy(vm(x), target), device)
    t_bwd, _ = timed(lambda: torch.autograd.grad(loss, x), device)
    return t_fwd, t_bwd


def naive_full_graph_logits(vm, volume):
    """Sliding window with every tile kept in one autograd graph (the memory-hungry baseline).

    Uses the engine's tiling and weights (no mirroring, one network): equals ``vm(volume)``.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    engine = vm._engine
    plan = engine.plan(volume[0])
    padded = pad_nd_image(volume[0], vm.patch_size, 'constant', {'value': 0}, False)  # F.pad
    gaussian = engine.gaussian(volume.device, torch.float32)
    logits = 0
    for s in plan.slicers:
        canvas = torch.zeros((N_CLASSES, *plan.padded_shape[1:]), device=volume.device)
        canvas[s] = engine.networks[0](padded[s][None])[0] * gaussian
        logits = logits + canvas  # out of place: every tile stays in the graph
    return (logits / engine.weight_sum(plan, volume.device, torch.float32))[plan.revert][None]


def warm_up(net, device):
    """Initialise the convolution back-ends on a tiny input (negligible memory)."""
    x = torch.randn(1, 1, 16, 16, 16, device=device, requires_grad=True)
    with torch.no_grad():
        net(x)
    torch.autograd.grad(net(x).sum(), x)


def nnunet_predictor(net, patch, device):
    """nnU-Net's own predictor, minimal fields for predict_sliding_window_return_logits."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == 'cuda', device=device,
                                allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = types.SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = types.SimpleNamespace(num_segmentation_heads=N_CLASSES)
    predictor.allowed_mirroring_axes = None
    return predictor


# ----------------------------------------------------------------------------------------------
# workers (one fresh process each)
# ----------------------------------------------------------------------------------------------
def worker(args) -> dict:
    from nnunet_adv.volume.sliding_window import SlidingWindowModel
    device = torch.device(args.device)
    net = build_network(device)
    volume, target = make_case(args.shape, device)
    vm = SlidingWindowModel(net, args.patch, tile_batch_size=args.tile_batch_size,
                            cache_tile_graphs=args.cache_tile_graphs)
    warm_up(net, device)
    res = {'shape': args.shape, 'n_tiles': vm.num_tiles(volume), 'mode': args.worker,
           'threads': torch.get_num_threads(), 'tile_batch_size': args.tile_batch_size,
           'cache': args.cache_tile_graphs}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        base = current_rss_mib()
    res['mem_base_mib'] = base

    wall = time.perf_counter()
    if args.worker == 'naive':  # memory and time of the one-graph alternative
        x = volume.clone().requires_grad_(True)
        t_fwd, loss = timed(lambda: F.cross_entropy(naive_full_graph_logits(vm, x), target), device)
        t_bwd, _ = timed(lambda: torch.autograd.grad(loss, x), device)
        res.update(t_forward=t_fwd, t_backward=t_bwd, t_step=t_fwd + t_bwd)
    else:
        t_fwd, t_bwd = attack_step(vm, volume, target)  # first: its peak is the memory result
        res.update(t_forward=t_fwd, t_backward=t_bwd, t_step=t_fwd + t_bwd)
    res['wall_step'] = time.perf_counter() - wall
    res['mem_peak_mib'] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda'
                           else peak_rss_mib())

    # plain sliding-window prediction under no_grad, same tiling and tile batching
    with torch.no_grad():
        res['t_vm_nograd'], _ = timed(lambda: vm(volume), device)
    if args.worker == 'full':  # nnU-Net's own predictor (batch of one tile, as it does)
        predictor = nnunet_predictor(net, args.patch, device)
        res['t_nnunet_predict'], _ = timed(lambda: predictor.predict_sliding_window_return_logits(volume[0]), device)
    if args.tile_floor:
        res.update(tile_floor(net, args.patch, device, args.tile_batch_size))
    return res


def tile_floor(net, patch, device, batch, repeats=3) -> dict:
    """Seconds per tile of the three passes an attack step needs (min over repeats)."""
    tile = torch.randn(batch, 1, *patch, device=device)
    best = {'tile_nograd': float('inf'), 'tile_grad_forward': float('inf'), 'tile_backward': float('inf')}
    for _ in range(repeats):
        with torch.no_grad():
            t, _ = timed(lambda: net(tile), device)
        best['tile_nograd'] = min(best['tile_nograd'], t / batch)
        x = tile.clone().requires_grad_(True)
        t, out = timed(lambda: net(x), device)
        best['tile_grad_forward'] = min(best['tile_grad_forward'], t / batch)
        t, _ = timed(lambda: torch.autograd.grad(out, x, torch.ones_like(out)), device)
        best['tile_backward'] = min(best['tile_backward'], t / batch)
    return best


def run_worker(args, shape, mode, tile_batch_size=1, cache=0, floor=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', mode, '--shape', *map(str, shape),
           '--patch', *map(str, args.patch), '--device', args.device, '--threads', str(args.threads),
           '--tile-batch-size', str(tile_batch_size), '--cache-tile-graphs', str(cache)]
    if floor:
        cmd.append('--tile-floor')
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def main(args):
    small, large = args.small, list(args.small)
    large[1] *= 2
    large[2] *= 2  # 4x the voxels
    unit = 'CUDA max_memory_allocated' if args.device.startswith('cuda') else 'process max RSS'
    clock = 'wall' if args.device.startswith('cuda') else 'process CPU'
    print(f'device {args.device}, torch {torch.__version__}, threads {args.threads}, patch {args.patch}, '
          f'PlainConvUNet 4 stages 8..64, InstanceNorm, eval; CE loss; no mirroring; step 0.5; '
          f'times in {clock} seconds ("wall s": wall clock of the step)')
    sizes = {}  # tile batch size -> (row on V, row on 4V)
    rows = []
    for tb in [1, *args.extra_tile_batch_sizes]:
        mode = 'full' if tb == 1 else 'step'
        sizes[tb] = (run_worker(args, small, mode, tb, floor=True), run_worker(args, large, mode, tb))
        rows += sizes[tb]
    cached = [run_worker(args, small, 'step', tb, cache=10 ** 9) for tb in sorted(sizes)] if args.cache_all else []
    naive = [run_worker(args, small, 'naive')] if args.naive else []
    rows += cached + naive
    predictor = {tuple(r['shape']): r['t_nnunet_predict'] for r in rows if 't_nnunet_predict' in r}

    print(f'\n{"mode":6} {"volume":>11} {"tiles":>5} {"tb":>2} {"cache":>5} {"base MiB":>8} {"peak MiB":>8} '
          f'{"step s":>7} {"fwd s":>6} {"bwd s":>6} {"s/tile":>6} {"no_grad s":>9} {"step/no_grad":>12} '
          f'{"step/nnU-Net":>12} {"wall s":>7}')
    for r in rows:
        cache = 'all' if r['cache'] >= r['n_tiles'] else str(r['cache'])
        nnunet = predictor.get(tuple(r['shape']), float('nan'))
        print(f'{r["mode"]:6} {"x".join(map(str, r["shape"])):>11} {r["n_tiles"]:5d} {r["tile_batch_size"]:2d} '
              f'{cache:>5} {r["mem_base_mib"]:8.1f} {r["mem_peak_mib"]:8.1f} {r["t_step"]:7.2f} '
              f'{r["t_forward"]:6.2f} {r["t_backward"]:6.2f} {r["t_step"] / r["n_tiles"]:6.3f} '
              f'{r["t_vm_nograd"]:9.2f} {r["t_step"] / r["t_vm_nograd"]:12.2f} {r["t_step"] / nnunet:12.2f} '
              f'{r["wall_step"]:7.2f}')
    print('nnU-Net predictor (batch 1, float16 buffers): ' +
          ', '.join(f'{"x".join(map(str, k))}: {v:.2f} s' for k, v in predictor.items()))

    for tb, (r1, r4) in sizes.items():
        print(f'\ntile_batch_size {tb}:')
        print(f'(a) peak memory ({unit}) 4x voxels / 1x: {r4["mem_peak_mib"] / r1["mem_peak_mib"]:.3f} '
              f'(target <= 1.3); increase over the pre-step baseline {r1["mem_peak_mib"] - r1["mem_base_mib"]:.1f}'
              f' -> {r4["mem_peak_mib"] - r4["mem_base_mib"]:.1f} MiB '
              f'({(r4["mem_peak_mib"] - r4["mem_base_mib"]) / (r1["mem_peak_mib"] - r1["mem_base_mib"]):.2f}x)')
        per_tile = [r['t_step'] / r['n_tiles'] for r in (r1, r4)]
        print(f'(b) attack step per tile {per_tile[0]:.3f} s ({r1["n_tiles"]} tiles) vs {per_tile[1]:.3f} s '
              f'({r4["n_tiles"]} tiles): ratio {per_tile[1] / per_tile[0]:.3f} (linear = 1)')
        print(f'(c) attack step / no_grad prediction with the same tiling: '
              f'{r1["t_step"] / r1["t_vm_nograd"]:.2f} (V), {r4["t_step"] / r4["t_vm_nograd"]:.2f} (4V) '
              f'(target <= 2.2)')
        two_pass = (r1['tile_nograd'] + r1['tile_grad_forward'] + r1['tile_backward']) / r1['tile_nograd']
        one_graph = (r1['tile_grad_forward'] + r1['tile_backward']) / r1['tile_nograd']
        print(f'    per tile: no-grad forward {r1["tile_nograd"]:.3f} s, forward with graph '
              f'{r1["tile_grad_forward"]:.3f} s, backward to the input {r1["tile_backward"]:.3f} s; floor of '
              f'the two-pass engine {two_pass:.2f}, of a one-graph step (naive / cache all) {one_graph:.2f}')
    for r in cached + naive:
        label = 'naive full graph' if r['mode'] == 'naive' else f'cache_tile_graphs=all, tb {r["tile_batch_size"]}'
        print(f'{label}: step / no_grad {r["t_step"] / r["t_vm_nograd"]:.2f}, peak {r["mem_peak_mib"]:.1f} MiB '
              f'(+{r["mem_peak_mib"] - r["mem_base_mib"]:.1f} MiB over the baseline)')


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--patch', type=int, nargs=3, default=[48, 48, 48])
    p.add_argument('--small', type=int, nargs=3, default=[64, 64, 64],
                   help='volume V (Z Y X); the large volume doubles Y and X (4x voxels)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=1,
                   help='torch intra-op threads (1: stable timings on a shared machine)')
    p.add_argument('--extra-tile-batch-sizes', type=int, nargs='*', default=[4])
    p.add_argument('--no-naive', dest='naive', action='store_false',
                   help='skip the naive one-graph step (its memory grows with the volume)')
    p.add_argument('--no-cache-all', dest='cache_all', action='store_false',
                   help='skip the step with cache_tile_graphs covering every tile')
    # worker-only
    p.add_argument('--worker', choices=['full', 'step', 'naive'], help=argparse.SUPPRESS)
    p.add_argument('--shape', type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument('--tile-batch-size', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--tile-floor', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--cache-tile-graphs', type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == '__main__':
    arguments = parse()
    torch.set_num_threads(arguments.threads)
    if arguments.worker:
        print(json.dumps(worker(arguments)))
    else:
        main(arguments)
