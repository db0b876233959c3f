"""Pixel-adaptive convolution (issue 18 part 2), float32, 2 threads, one run (ratios in one process):
vc.nn.PacConv3d (tap by tap, no patches) against the unfold reference as PyTorch users write it (pacnet's
recipe in 3-D: the (N, C, T, D, H, W) patches of the input and of the guide, K from the guide's patches, einsum
with W), on 1 x 8 x 48^3 -> 8 channels, self-guided, k=3 and k=5, padding k // 2: forward (no grad) and a
training step (forward + backward to x, f, W, b); peak resident memory of each beyond the output (Linux VmHWM),
beside the reference's patch tensors' size computed analytically.

    python bench/bench_pac.py [--threads 2] [--out FILE]
"""
import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times, peak_extra_bytes


def unfold_reference(x, f, W, b, k):
    """PAC through unfolded patches (zero padding k // 2, stride 1)."""
    import torch.nn.functional as F
    import torch

    p = k // 2

    def patches(t):
        u = F.pad(t, (p,) * 6)
        for axis in range(3):
            u = u.unfold(2 + axis, k, 1)
        n, c, d, h, w = u.shape[:5]
        return u.reshape(n, c, d, h, w, -1).permute(0, 1, 5, 2, 3, 4)   # (N, C, T, D, H, W), a copy
    xp, fp = patches(x), patches(f)
    centre = (k**3) // 2
    K = torch.exp(-0.5 * ((fp - fp[:, :, centre:centre + 1]) ** 2).sum(1))
    out = torch.einsum("oct,nctdhw->nodhw", W.reshape(W.shape[0], W.shape[1], -1), xp * K[:, None])
    return out + b.reshape(1, -1, 1, 1, 1)


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv)
    import torch

    t, C, n = a.threads, 8, 48
    torch.manual_seed(0)
    tables = []
    with torch.no_grad():   # thread pools, oneDNN and the allocator set up before anything is measured
        vc.nn.PacConv3d(C, C, 3, padding=1)(torch.randn(1, C, 16, 16, 16))
    for k in (3, 5):
        layer = vc.nn.PacConv3d(C, C, k, padding=k // 2)
        x = torch.randn(1, C, n, n, n)
        W, b = layer.weight, layer.bias
        flops = 2 * C * C * k**3 * n**3
        patch_bytes = 2 * C * k**3 * n**3 * 4   # the reference's x and f patches (float32)
        table = Table(f"PacConv3d, 1 x {C} x {n}^3 -> {C}, k={k}, self-guided, float32, {t} threads")
        with torch.no_grad():
            ours = lambda: layer(x)   # noqa: E731
            ref = lambda: unfold_reference(x, x, W, b, k)   # noqa: E731
            err = float((ours() - ref()).abs().max())
            table.add("forward", best_times({"volconv": ours, "unfold reference": ref}, rounds=3, repeat=1),
                      ["volconv"], ["unfold reference"], flops=flops)
            mem_ours = peak_extra_bytes(lambda: ours().numpy())
            mem_ref = peak_extra_bytes(lambda: ref().numpy())
        xg = x.clone().requires_grad_()
        grad = torch.randn(1, C, n, n, n)

        def step(fn):
            def run():
                xg.grad = None
                layer.zero_grad()
                out = fn()
                out.backward(grad)
                return out.detach()
            return run
        s_ours, s_ref = step(lambda: layer(xg)), step(lambda: unfold_reference(xg, xg, W, b, k))
        table.add("forward+backward", best_times({"volconv": s_ours, "unfold reference": s_ref}, rounds=1,
                                                 repeat=1), ["volconv"], ["unfold reference"], flops=3 * flops)
        tmem_ours = peak_extra_bytes(lambda: s_ours().numpy())
        tmem_ref = peak_extra_bytes(lambda: s_ref().numpy())
        mib = 2**20
        tables.append(table.markdown() + "\n\n" + (
            f"Peak memory beyond the output, forward: volconv {mem_ours / mib:.0f} MiB, reference "
            f"{mem_ref / mib:.0f} MiB (**{mem_ref / max(mem_ours, 1):.1f}x** less); training step: volconv "
            f"{tmem_ours / mib:.0f} MiB, reference {tmem_ref / mib:.0f} MiB (**{tmem_ref / max(tmem_ours, 1):.1f}x** "
            f"less). The reference's x and f patches alone: {patch_bytes / mib:.0f} MiB; the input "
            f"{x.numel() * 4 / mib:.1f} MiB. Max |volconv - reference| (forward): {err:.1e}. GFLOP/s: "
            f"2 Cin Cout k^3 per output voxel (x3 for a training step)."))
    _benchmark.emit("\n\n".join(tables), a.out)


if __name__ == "__main__":
    main()
