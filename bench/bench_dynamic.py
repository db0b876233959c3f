"""Dynamic per-voxel kernels (issue: dynamic kernels), float32, 2 threads, one run each (ratios in one process):

1. vc.dynamic_conv3d, N=1, C=16, 48^3, k=5, G=1: forward vs the unfold reference in plain torch (target >= 20x),
   peak memory against input + output + kernel field (target <= 1.2x; the reference's reported beside it);
2. forward+backward of the same vs autograd through the unfold reference (target >= 10x);
3. vc.nn.DynamicConv3d on 1 x 16 x 96^3, k=5, a training step with tile=8 vs untiled: peak memory (target
   <= 25% of the untiled run) and time (target <= 1.5x);
GFLOP/s counts 2 * C * k^3 per output voxel.

    python bench/bench_dynamic.py [--threads 2] [--out FILE]
"""
import itertools

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times, peak_extra_bytes


def unfold_reference(x, K, k):
    """The per-voxel convolution as PyTorch users write it today: unfold every patch (no 5-D F.unfold: stacked
    shifted views), multiply by the kernels, sum. Zero 'same' padding, stride 1."""
    import torch
    import torch.nn.functional as F

    p = k // 2
    xp = F.pad(x, (p,) * 6)
    D, H, W = x.shape[2:]
    U = torch.stack([xp[:, :, a:a + D, b:b + H, e:e + W] for a, b, e in itertools.product(range(k), repeat=3)], 2)
    N, G = K.shape[:2]
    return (U.reshape(N, G, -1, *U.shape[2:]) * K[:, :, None]).sum(3).reshape(x.shape)


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv)
    import torch

    t = a.threads
    torch.manual_seed(0)
    tables = []

    # 1, 2: the operation
    C, n, k = 16, 48, 5
    x = torch.randn(1, C, n, n, n)
    K = torch.randn(1, 1, k**3, n, n, n) / k**1.5
    flops = 2 * C * k**3 * n**3
    table = Table(f"dynamic_conv3d, 1 x {C} x {n}^3, k={k}, G=1, float32, {t} threads")
    with torch.no_grad():
        table.add("forward", best_times({"volconv": lambda: vc.dynamic_conv3d(x, K, k, padding=k // 2, workers=t),
                                         "unfold reference": lambda: unfold_reference(x, K, k)}, rounds=3),
                  ["volconv"], ["unfold reference"], flops=flops)
        base = (x.numel() * 2 + K.numel()) * 4   # input + output + kernel field
        ours = x.numel() * 4 + K.numel() * 4 + peak_extra_bytes(
            lambda: vc.dynamic_conv3d(x, K, k, padding=k // 2, workers=t).numpy(), minus_result=False)
        theirs = x.numel() * 4 + K.numel() * 4 + peak_extra_bytes(lambda: unfold_reference(x, K, k).numpy(),
                                                                  minus_result=False)
    xg, Kg = x.clone().requires_grad_(), K.clone().requires_grad_()
    grad = torch.randn_like(x)

    def step(fn):
        def run():
            xg.grad = Kg.grad = None
            fn().backward(grad)
        return run
    table.add("forward+backward", best_times(
        {"volconv": step(lambda: vc.dynamic_conv3d(xg, Kg, k, padding=k // 2, workers=t)),
         "unfold reference": step(lambda: unfold_reference(xg, Kg, k))}, rounds=2, repeat=1),
        ["volconv"], ["unfold reference"], flops=3 * flops)
    tables.append(table.markdown() + f"\n\nPeak memory of the forward: volconv {ours / 2**20:.0f} MiB = "
                  f"**{ours / base:.2f}x** (input + output + kernel field = {base / 2**20:.0f} MiB; target <= 1.2x); "
                  f"the unfold reference {theirs / 2**20:.0f} MiB ({theirs / base:.1f}x). Targets: forward >= 20x, "
                  "forward+backward >= 10x the unfold reference. GFLOP/s: 2 C k^3 per output voxel (x3 for a "
                  "training step); the machine does ~110 per core in plain FMA loops.")

    # 3: the layer, tiled vs untiled, one training step each in a fresh measurement
    x = torch.randn(1, 16, 96, 96, 96)
    layer = vc.nn.DynamicConv3d(16, 5, hidden=16, workers=t)
    grad = torch.randn_like(x)

    def train(tile):
        def run():
            layer.tile = tile
            layer.zero_grad()
            out = layer(x)
            out.backward(grad)
            return out.detach()
        return run
    train(None)(), train(8)()   # first calls set up thread pools and oneDNN's caches: measure the second
    untiled_mem = peak_extra_bytes(lambda: train(None)().numpy())
    tiled_mem = peak_extra_bytes(lambda: train(8)().numpy())
    times = best_times({"tile=8": train(8), "untiled": train(None)}, rounds=2, repeat=1)
    table = Table(f"DynamicConv3d training step, 1 x 16 x 96^3, k=5, G=1, float32, {t} threads")
    table.add("forward+backward", times, ["tile=8"], ["untiled"])
    tables.append(table.markdown() + f"\n\nPeak memory beyond the output: tile=8 {tiled_mem / 2**20:.0f} MiB, "
                  f"untiled {untiled_mem / 2**20:.0f} MiB: **{tiled_mem / untiled_mem:.0%}** (target <= 25%); "
                  "time target: tiled <= 1.5x untiled (ratio above >= 0.67x).")
    _benchmark.emit("\n\n".join(tables), a.out)


if __name__ == "__main__":
    main()
