"""Low-rank kernels (issue: large kernels made cheap), float32, 2 threads, one run each:

1. a CP rank-4 15^3 single-channel kernel on a 128^3 volume: vc.cp_conv3d vs volconv's FFT path with the
   dense kernel and torch.conv3d (target: >= 10x the FFT path);
2. vc.nn.CPConv3d 32 -> 32, k=5, rank 16, on 1 x 32 x 64^3, forward and forward+backward, vs the five-pass
   execution of tensorly-torch in plain torch (1x1x1, three 1-D depthwise, 1x1x1 convolutions) and the dense
   torch.conv3d (targets: >= 3x and >= 10x);
3. vc.nn.TuckerConv3d 32 -> 32, k=3, ranks (8, 8), 64^3, forward and forward+backward, vs dense torch.conv3d
   (target: >= 3x);
4. the time vc.decompose.cp takes for a (64, 64, 3, 3, 3) weight at rank 16 (target: under 5 s).

    python bench/bench_lowrank.py [--threads 2] [--out FILE]
"""
import time

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times


def five_pass(x, layer):
    """tensorly-torch's CP convolution in plain torch: five separate convolutions over memory."""
    import torch.nn.functional as F

    R, k = layer.rank, layer.kernel_size
    z = F.conv3d(x, layer.in_factor.T[:, :, None, None, None])
    z = F.conv3d(z, layer.factor_d.T[:, None, :, None, None], padding=(k[0] // 2, 0, 0), groups=R)
    z = F.conv3d(z, layer.factor_h.T[:, None, None, :, None], padding=(0, k[1] // 2, 0), groups=R)
    z = F.conv3d(z, layer.factor_w.T[:, None, None, None, :], padding=(0, 0, k[2] // 2), groups=R)
    return F.conv3d(z, layer.out_factor[:, :, None, None, None], layer.bias)


def train_step(fn, x, grad):
    """One forward and backward with a dense output gradient (as a real loss gives: `.sum()` would hand every
    backward a broadcast constant, which some kernels must copy first)."""
    def step():
        x.grad = None
        fn(x).backward(grad)
    return step


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv)
    import torch

    t = a.threads
    r = np.random.default_rng(0)
    tables = []

    # 1. CP rank 4 of a 15^3 kernel on 128^3
    cp = vc.CPKernel(np.ones(4), [r.standard_normal((n, 4)) for n in (1, 1, 15, 15, 15)])
    x = r.standard_normal((1, 1, 128, 128, 128)).astype(np.float32)
    w = cp.to_dense().astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    times = best_times({"volconv cp_conv3d": lambda: vc.cp_conv3d(x, cp, padding=7, workers=t),
                        "volconv fft": lambda: vc.conv3d(x, w, padding=7, algorithm="fft", workers=t),
                        "torch": lambda: torch.nn.functional.conv3d(xt, wt, padding=7)}, rounds=3, repeat=1)
    table = Table(f"CP rank 4 of a 15^3 kernel, 1 channel, 128^3, float32, {t} threads")
    table.add("cp rank 4, 15^3", times, ["volconv cp_conv3d"], ["volconv fft", "torch"],
              flops=2 * 4 * (15 * 3) * 128**3)
    tables.append(table.markdown() + "\n\nTarget: >= 10x volconv's FFT path.")

    # 2. CPConv3d 32 -> 32, k=5, rank 16, 64^3; 3. TuckerConv3d 32 -> 32, k=3, ranks (8, 8)
    torch.manual_seed(0)
    x = torch.randn(1, 32, 64, 64, 64)
    xg = x.clone().requires_grad_()
    cp_layer = vc.nn.CPConv3d(32, 32, 5, padding=2, rank=16)
    dense5 = torch.nn.Conv3d(32, 32, 5, padding=2)
    tk_layer = vc.nn.TuckerConv3d(32, 32, 3, padding=1, ranks=(8, 8))
    dense3 = torch.nn.Conv3d(32, 32, 3, padding=1)
    cases = [("CPConv3d 32->32 k=5 rank 16", cp_layer, {"five-pass torch": lambda v: five_pass(v, cp_layer),
                                                       "dense torch.conv3d": dense5},
              "Targets: >= 3x the five-pass execution, >= 10x the dense torch.conv3d."),
             ("TuckerConv3d 32->32 k=3 ranks (8, 8)", tk_layer, {"dense torch.conv3d": dense3},
              "Target: >= 3x the dense torch.conv3d.")]
    for title, layer, anchors, target in cases:
        table = Table(f"{title}, 1 x 32 x 64^3, float32, {t} threads")
        with torch.no_grad():
            c = {"volconv": lambda: layer(x), **{n: (lambda f=f: f(x)) for n, f in anchors.items()}}
            table.add("forward", best_times(c, rounds=5), ["volconv"], list(anchors))
        grad = torch.randn(1, 32, 64, 64, 64)
        c = {"volconv": train_step(layer, xg, grad), **{n: train_step(f, xg, grad) for n, f in anchors.items()}}
        table.add("forward+backward", best_times(c, rounds=5), ["volconv"], list(anchors))
        tables.append(table.markdown() + "\n\n" + target)

    # 4. decomposition time
    weight = np.random.default_rng(1).standard_normal((64, 64, 3, 3, 3))
    start = time.perf_counter()
    k = vc.decompose.cp(weight, 16)
    seconds = time.perf_counter() - start
    tables.append(f"vc.decompose.cp of a (64, 64, 3, 3, 3) weight at rank 16: {seconds:.2f} s (relative error "
                  f"{k.relative_error:.3f} on a random weight; target: under 5 s).")
    _benchmark.emit("\n\n".join(tables), a.out)


if __name__ == "__main__":
    main()
