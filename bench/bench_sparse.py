"""Sparse kernels (issue: large kernels made cheap): a 15^3 single-channel kernel at 1% density on a 128^3
volume, float32, 2 threads, one run. Anchors: torch.conv3d with the dense kernel, and volconv's own dense paths:
the FFT (the best at this size) and the direct kernel. (conv3d "auto" given this dense weight picks the sparse
path itself.) Then the density sweep against the
dense direct kernel (break-even density) and the time per non-zero tap against the dense time per tap.
Targets: >= 30x torch, >= 5x volconv's best dense/FFT path, break-even at 10% density or more.

    python bench/bench_sparse.py [--size 128] [--k 15] [--density 0.01] [--threads 2] [--out FILE]
"""
import argparse

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times


def weight(k, density, seed=0):
    r = np.random.default_rng(seed)
    w = r.standard_normal((1, 1, k, k, k)).astype(np.float32)
    w[r.random(w.shape) >= density] = 0
    return w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    n, k, t = a.size, a.k, a.threads
    x = np.random.default_rng(1).standard_normal((1, 1, n, n, n)).astype(np.float32)
    w = weight(k, a.density)
    sk = vc.SparseKernel.from_dense(w)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    pad = k // 2
    c = {"volconv sparse": lambda: vc.sparse_conv3d(x, sk, padding=pad, workers=t),
         "volconv dense fft": lambda: vc.conv3d(x, w, padding=pad, algorithm="fft", workers=t),
         "volconv dense direct": lambda: vc.conv3d(x, w, padding=pad, algorithm="direct", workers=t),
         "torch": lambda: torch.nn.functional.conv3d(xt, wt, padding=pad)}
    times = best_times(c, rounds=3, repeat=1)
    voxels = float(n) ** 3
    table = Table(f"Sparse {k}^3 kernel, {sk.nnz} non-zeros ({sk.density:.1%}), 1 channel, {n}^3, float32, "
                  f"{t} threads")
    table.add(f"{k}^3 at {sk.density:.1%}", times, ["volconv sparse"],
              ["torch", "volconv dense fft", "volconv dense direct"], flops=2 * sk.nnz * voxels)

    # density sweep against the dense direct kernel (whose time does not depend on the density)
    sweep = []
    for density in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        wd = weight(k, density, seed=2)
        kd = vc.SparseKernel.from_dense(wd)
        s = best_times({"sparse": lambda: vc.sparse_conv3d(x, kd, padding=pad, workers=t)}, rounds=3)
        sweep.append((density, kd.nnz, s["sparse"]))
    dense_t = times["volconv dense direct"]
    lines = [table.markdown(), "", f"Density sweep ({k}^3, {n}^3) against the dense direct kernel "
             f"({dense_t * 1e3:.1f} ms, {k**3} taps: {dense_t / k**3 / voxels * 1e12:.2f} ps per tap-voxel):", "",
             "| density | nnz | sparse ms | ps per tap-voxel | dense direct / sparse |", "|---:|---:|---:|---:|---:|"]
    for density, nnz, s in sweep:
        lines.append(f"| {density:.0%} | {nnz} | {s * 1e3:.1f} | {s / nnz / voxels * 1e12:.2f} | "
                     f"{dense_t / s:.2f}x |")
    even = [d for d, _, s in sweep if s <= dense_t]
    lines += ["", f"Break-even density against the dense direct kernel: "
              f"{'above ' + format(max(even), '.0%') if even else 'below 1%'} (target: 10% or more). "
              "Targets: >= 30x torch, >= 5x volconv's best dense/FFT path."]
    _benchmark.emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
