"""Nested chains and parallel multi-scale branches (issue: nested multi-scale kernels), float32, 2 threads, one
run each (ratios in one process):

1. depthwise 32 channels, 7^3 then 3^3 with ReLU, 64^3, forward: vc.nested_conv3d vs two vc.conv3d calls
   (target >= 1.2x) and the two torch.conv3d calls (>= 3x); peak extra memory of the call (resident memory
   above the input and the output) against one intermediate volume (target <= 10%);
2. 16 -> 16 -> 16 channels, 7^3 then 3^3 with ReLU, 64^3: "auto" and "fused" vs the torch chain ("auto" at
   least as fast), the fused pass's peak extra memory;
3. forward+backward of case 1 vs torch autograd through the two convolutions (>= 2x);
4. multi-scale depthwise 32 channels, 3/5/7 summed, 64^3: vc.multiscale_conv3d vs the three torch convs
   (>= 2x), beside the merged-kernel and branch-by-branch paths.

    python bench/bench_nested.py [--threads 2] [--out FILE]
"""
import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times, peak_extra_bytes


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv)
    import torch
    import torch.nn.functional as F

    t = a.threads
    r = np.random.default_rng(0)
    tables = []

    # 1 and 2: nested chains, forward
    for title, C, G in (("depthwise 32 channels", 32, 32), ("16 -> 16 -> 16 channels", 16, 1)):
        x = r.standard_normal((1, C, 64, 64, 64)).astype(np.float32)
        ws = [(r.standard_normal((C, C // G, k, k, k)) / np.sqrt(C // G * k**3)).astype(np.float32) for k in (7, 3)]
        xt, wt = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]

        def two_calls():
            y = vc.conv3d(x, ws[0], padding=3, groups=G, workers=t)
            np.maximum(y, 0, out=y)
            return vc.conv3d(y, ws[1], padding=1, groups=G, workers=t)

        def torch_chain():
            with torch.no_grad():
                return F.conv3d(F.relu(F.conv3d(xt, wt[0], padding=3, groups=G)), wt[1], padding=1, groups=G)

        contenders = {"volconv auto": lambda: vc.nested_conv3d(x, ws, None, "relu", G, workers=t),
                      "volconv fused": lambda: vc.nested_conv3d(x, ws, None, "relu", G, algorithm="fused", workers=t),
                      "two vc.conv3d": two_calls, "torch chain": torch_chain}
        times = best_times(contenders, rounds=5)
        table = Table(f"Nested {title}, 7^3 then 3^3 with ReLU, 1 x {C} x 64^3, float32, {t} threads")
        table.add("forward", times, ["volconv auto"], ["volconv fused", "two vc.conv3d", "torch chain"])
        one = 4 * x.size
        extra = peak_extra_bytes(lambda: vc.nested_conv3d(x, ws, None, "relu", G, algorithm="fused", workers=t))
        chain_extra = peak_extra_bytes(lambda: torch_chain().numpy())
        tables.append(table.markdown() + f"\n\nPeak extra memory of the fused pass: {extra / 2**20:.1f} MiB = "
                      f"**{extra / one:.1%}** of one intermediate volume ({one / 2**20:.0f} MiB); the torch chain: "
                      f"{chain_extra / 2**20:.1f} MiB ({chain_extra / one:.0%}).")

        if G == 32:   # 3: forward+backward of the depthwise chain
            grad = torch.randn(1, C, 64, 64, 64)
            params = [torch.from_numpy(w.copy()).requires_grad_() for w in ws]
            xg = xt.clone().requires_grad_()

            def ours():
                xg.grad = None
                vc.nested_conv3d(xg, params, None, "relu", G, workers=t).backward(grad)

            def theirs():
                xg.grad = None
                F.conv3d(F.relu(F.conv3d(xg, params[0], padding=3, groups=G)), params[1], padding=1,
                         groups=G).backward(grad)

            table = Table(f"Nested depthwise 32 channels, forward+backward, 1 x 32 x 64^3, float32, {t} threads")
            table.add("forward+backward", best_times({"volconv": ours, "torch autograd": theirs}, rounds=3),
                      ["volconv"], ["torch autograd"])
            tables.append(table.markdown() + "\n\nTarget: >= 2x torch autograd.")

    # 4: multi-scale depthwise, summed
    x = r.standard_normal((1, 32, 64, 64, 64)).astype(np.float32)
    ws = [r.standard_normal((32, 1, k, k, k)).astype(np.float32) for k in (3, 5, 7)]
    xt, wt = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]

    def torch_branches():
        with torch.no_grad():
            return sum(F.conv3d(xt, w, padding=w.shape[-1] // 2, groups=32) for w in wt)

    contenders = {"volconv auto": lambda: vc.multiscale_conv3d(x, ws, None, 32, "sum", workers=t),
                  "volconv merged": lambda: vc.multiscale_conv3d(x, ws, None, 32, "sum", algorithm="merged",
                                                                 workers=t),
                  "volconv branches": lambda: vc.multiscale_conv3d(x, ws, None, 32, "sum", algorithm="branches",
                                                                   workers=t),
                  "three torch convs": torch_branches}
    table = Table(f"Multi-scale depthwise 32 channels, 3/5/7 summed, 1 x 32 x 64^3, float32, {t} threads")
    table.add("forward", best_times(contenders, rounds=5), ["volconv auto"],
              ["volconv merged", "volconv branches", "three torch convs"])
    tables.append(table.markdown() + "\n\nTarget: >= 2x the three torch convs.")
    _benchmark.emit("\n\n".join(tables), a.out)


if __name__ == "__main__":
    main()
