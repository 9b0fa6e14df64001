"""Cost of one attack step relative to one forward + backward-to-input pass.

Measures, in ONE run on the same network and batch:
  * fwdbwd: ``model(x)``, CE on the full-resolution logits, ``torch.autograd.grad(loss, x)``;
  * one PGD step: ``build_attack('pgd', steps=S, random_start=False)`` time / S;
  * one VAFA-3D step (block 8, SSIM term on, early stop off): ``build_attack('vafa-3d', steps=S)``
    time / S, with the DCT-matrix backend (default) and with torch_dct (the reference's DCT);
and prints the ratios PGD/fwdbwd (target <= 1.10) and VAFA/PGD (target <= 1.25).

The three (four) measurements are interleaved round-robin after a warm-up, so that a change
of machine load affects them alike; the reported value is the median over the repeats.
Attack times include the per-call work (input checks, setup) amortised over S steps.

Network: nnU-Net's PlainConvUNet from dynamic_network_architectures (InstanceNorm, LeakyReLU,
deep supervision on: the default attack loss uses the full-resolution output), 4 stages with
16-32-64-128 features by default; a plain conv net if the package is missing.

Example:  python benchmarks/bench_attack_step.py --size 64 --batch 1 --repeats 7 --steps 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_adv.attacks import build_attack


def make_net(features, num_classes: int, in_channels: int = 1) -> nn.Module:
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:  # pragma: no cover - fallback
        print("dynamic_network_architectures not found: using a plain conv net", file=sys.stderr)
        return nn.Sequential(nn.Conv3d(in_channels, features[0], 3, padding=1), nn.LeakyReLU(),
                             nn.Conv3d(features[0], features[0], 3, padding=1), nn.LeakyReLU(),
                             nn.Conv3d(features[0], num_classes, 1))
    n = len(features)
    return PlainConvUNet(input_channels=in_channels, n_stages=n, features_per_stage=list(features),
                         conv_op=nn.Conv3d, kernel_sizes=3, strides=[1] + [2] * (n - 1),
                         n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=2,
                         conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="cubic patch edge (default 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--steps", type=int, default=4, help="attack steps per timed call (default 4)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--block", type=int, default=8, help="VAFA block edge (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-torch-dct", action="store_true", help="skip the torch_dct VAFA variant")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = make_net(args.features, args.classes).to(device).eval()
    shape = (args.batch, 1) + (args.size,) * 3
    x = torch.rand(shape, device=device)
    y = torch.randint(0, args.classes, (args.batch, 1) + (args.size,) * 3, device=device)

    def fwdbwd():
        xi = x.detach().requires_grad_(True)
        out = net(xi)
        z = out[0] if isinstance(out, (list, tuple)) else out
        loss = F.cross_entropy(z.float(), y[:, 0])
        (g,) = torch.autograd.grad(loss, xi)
        return g

    S = args.steps
    pgd = build_attack("pgd", steps=S, random_start=False, seed=0)
    bs = (args.block,) * 3
    vafa = build_attack("vafa-3d", steps=S, block_size=bs, use_ssim_loss=True, early_stop=False)
    runs = {
        "fwdbwd": (fwdbwd, 1),
        "pgd_step": (lambda: pgd(net, x, y), S),
        "vafa3d_step(matrix)": (lambda: vafa(net, x, y), S),
    }
    if not args.no_torch_dct:
        vafa_t = build_attack("vafa-3d", steps=S, block_size=bs, use_ssim_loss=True, early_stop=False,
                              dct_backend="torch_dct")
        runs["vafa3d_step(torch_dct)"] = (lambda: vafa_t(net, x, y), S)

    times = {k: [] for k in runs}
    for r in range(args.warmup + args.repeats):
        for name, (fn, div) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= args.warmup:
                times[name].append((time.perf_counter() - t0) / div)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"net=PlainConvUNet{tuple(args.features)} batch={shape} classes={args.classes} "
          f"steps/call={S} repeats={args.repeats} warmup={args.warmup} vafa_block={bs}")
    for k, v in med.items():
        spread = f"[min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f}]"
        print(f"  {k:<24s} median {v * 1e3:9.1f} ms  {spread}")
    r1 = med["pgd_step"] / med["fwdbwd"]
    r2 = med["vafa3d_step(matrix)"] / med["pgd_step"]
    print(f"  ratio PGD/fwdbwd            {r1:.3f}   (target <= 1.10: {'met' if r1 <= 1.10 else 'MISSED'})")
    print(f"  ratio VAFA(matrix)/PGD      {r2:.3f}   (target <= 1.25: {'met' if r2 <= 1.25 else 'MISSED'})")
    if "vafa3d_step(torch_dct)" in med:
        r3 = med["vafa3d_step(torch_dct)"] / med["pgd_step"]
        print(f"  ratio VAFA(torch_dct)/PGD   {r3:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
