"""A small 3D U-Net trained on patches of the bundled brain volume, in three variants:

- plain: torch.nn.Conv3d everywhere;
- lowrank: the plain network after its first half of training, converted by vc.nn.convert (to="auto" within a
  tolerance: CP / Tucker / sparse where that is cheaper), then trained on;
- dynamic: the bottleneck is a vc.nn.NestedConv3d (depthwise 7^3 then 3^3) and a vc.nn.DynamicConv3d
  (a kernel per voxel produced from the features).

The task is denoising: input = the normalised T1 patch + Gaussian noise, target = the clean patch (MSE).
Prints each variant's loss curve and step time, and saves the curves as a PNG.

    python examples/unet3d.py [--steps 300] [--patch 32] [--channels 32 64 128] [--png unet3d.png]
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import volconv as vc

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_volumes",
                      "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")


def block(cin, cout):
    return torch.nn.Sequential(torch.nn.Conv3d(cin, cout, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(cout, cout, 3, padding=1), torch.nn.ReLU())


class Bottleneck(torch.nn.Module):
    """The dynamic variant's bottleneck: a nested depthwise 7^3 -> 3^3 chain, then per-voxel kernels."""

    def __init__(self, channels):
        super().__init__()
        self.nested = vc.nn.NestedConv3d(channels, channels, kernel_sizes=(7, 3), activation="relu",
                                         groups=channels)
        self.dynamic = vc.nn.DynamicConv3d(channels, 3, groups=max(1, channels // 16), hidden=channels // 4)

    def forward(self, x):
        return torch.relu(self.dynamic(self.nested(x))) + x


class UNet3d(torch.nn.Module):
    def __init__(self, channels=(32, 64, 128), in_channels=1, out_channels=1, dynamic=False):
        super().__init__()
        c1, c2, c3 = channels
        self.enc1, self.enc2 = block(in_channels, c1), block(c1, c2)
        self.middle = block(c2, c3)
        self.bottleneck = Bottleneck(c3) if dynamic else torch.nn.Identity()
        self.up2, self.dec2 = torch.nn.ConvTranspose3d(c3, c2, 2, stride=2), block(2 * c2, c2)
        self.up1, self.dec1 = torch.nn.ConvTranspose3d(c2, c1, 2, stride=2), block(2 * c1, c1)
        self.head = torch.nn.Conv3d(c1, out_channels, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        m = self.bottleneck(self.middle(F.max_pool3d(e2, 2)))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1) + x   # a residual denoiser


def load_brain(path=SAMPLE):
    data = vc.io.load(path).data
    return (data - data.mean()) / data.std()


def batches(volume, patch, batch, noise, rng):
    """Random patches inside the head (mean intensity above the volume's), with their noisy copies."""
    D, H, W = volume.shape
    while True:
        clean = []
        while len(clean) < batch:
            d, h, w = (int(rng.integers(0, n - patch + 1)) for n in (D, H, W))
            p = volume[d:d + patch, h:h + patch, w:w + patch]
            if p.mean() > 0:
                clean.append(p)
        clean = torch.from_numpy(np.stack(clean)[:, None].astype(np.float32))
        yield clean + noise * torch.randn_like(clean), clean


def train(model, data, steps, lr=2e-3, log=None):
    """Adam on MSE; returns (losses, seconds per step)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        noisy, clean = next(data)
        loss = F.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1:4d}  loss {np.mean(losses[-max(1, steps // 10):]):.4f}")
    return losses, (time.perf_counter() - start) / max(1, steps)


def run(steps=300, patch=32, channels=(32, 64, 128), batch=2, noise=0.3, tolerance=0.3, seed=0, png=None,
        log=print, volume=None):
    """Train the three variants; returns {variant: (losses, seconds per step)} and the conversion report."""
    torch.manual_seed(seed)
    volume = load_brain() if volume is None else volume
    results = {}
    log("plain (torch.nn.Conv3d)")
    plain = UNet3d(channels)
    first, t1 = train(plain, batches(volume, patch, batch, noise, np.random.default_rng(seed)), steps // 2, log=log)
    lowrank, report = vc.nn.convert(plain, "auto", tolerance=tolerance)
    rest, t2 = train(plain, batches(volume, patch, batch, noise, np.random.default_rng(seed + 1)), steps - steps // 2,
                     log=log)
    results["plain"] = (first + rest, (t1 * (steps // 2) + t2 * (steps - steps // 2)) / steps)
    log(f"lowrank (vc.nn.convert to='auto', tolerance={tolerance} after {steps // 2} steps)")
    log(str(report))
    more, t3 = train(lowrank, batches(volume, patch, batch, noise, np.random.default_rng(seed + 1)),
                     steps - steps // 2, log=log)
    results["lowrank"] = (first + more, t3)
    log("dynamic (NestedConv3d + DynamicConv3d bottleneck)")
    torch.manual_seed(seed)
    dynamic = UNet3d(channels, dynamic=True)
    results["dynamic"] = train(dynamic, batches(volume, patch, batch, noise, np.random.default_rng(seed)), steps,
                               log=log)
    for name, (losses, seconds) in results.items():
        log(f"{name:8s} loss {np.mean(losses[:5]):.4f} -> {np.mean(losses[-5:]):.4f}, {seconds * 1e3:.0f} ms/step")
    if png:
        plot(results, png)
    return results, report


def plot(results, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (losses, seconds) in results.items():
        ax.plot(losses, label=f"{name} ({seconds * 1e3:.0f} ms/step)", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--channels", type=int, nargs=3, default=(32, 64, 128))
    p.add_argument("--tolerance", type=float, default=0.3)
    p.add_argument("--png", default="unet3d.png")
    a = p.parse_args(argv)
    run(a.steps, a.patch, tuple(a.channels), tolerance=a.tolerance, png=a.png)


if __name__ == "__main__":
    main()
