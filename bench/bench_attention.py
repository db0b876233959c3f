"""CBAM attention (issue 18 part 4), 1 x 32 x 64^3, float32, 2 threads, one run (ratios in one process):
vc.nn.SpatialAttention3d(7) and vc.nn.ChannelSpatialAttention3d(32) against the same layers written in plain
torch (the 7^3 2 -> 1 convolution by torch.nn.functional.conv3d, i.e. oneDNN), forward and forward+backward.

    python bench/bench_attention.py [--threads 2] [--out FILE]
"""
import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv)
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(1, 32, 64, 64, 64)
    spatial = vc.nn.SpatialAttention3d(7, workers=a.threads)
    both = vc.nn.ChannelSpatialAttention3d(32, workers=a.threads)

    def torch_spatial(m, v):
        pooled = torch.cat([v.mean(1, keepdim=True), v.amax(1, keepdim=True)], 1)
        return v * torch.sigmoid(F.conv3d(pooled, m.conv.weight, padding=m.conv.padding))

    def torch_both(m, v):
        return torch_spatial(m.spatial, m.channel(v))   # the channel gate has no convolution: the same code

    table = Table(f"CBAM gates, 1 x 32 x 64^3, float32, {a.threads} threads")
    for name, layer, ref in (("SpatialAttention3d(7)", spatial, torch_spatial),
                             ("ChannelSpatialAttention3d(32)", both, torch_both)):
        with torch.no_grad():
            err = (layer(x) - ref(layer, x)).abs().max().item()
            times = best_times({"volconv": lambda: layer(x), "torch": lambda: ref(layer, x)}, rounds=5)
        table.add(f"{name} forward", times, ["volconv"], ["torch"], note=f"max |diff| {err:.1e}")
        xg = x.clone().requires_grad_()
        times = best_times({"volconv": lambda: layer(xg).sum().backward(),
                            "torch": lambda: ref(layer, xg).sum().backward()}, rounds=5)
        table.add(f"{name} forward+backward", times, ["volconv"], ["torch"])
    notes = "\n".join(f"- {r['case']}: {r['note']}" for r in table.rows if r["note"])
    _benchmark.emit(table.markdown() + "\n\n" + notes, a.out)


if __name__ == "__main__":
    main()
