"""The GPU check: on a machine with an NVIDIA GPU, one command that builds the CUDA plugin, runs the whole
cuda-marked suite, compute-sanitizer (memcheck, racecheck) on a small subset, and the GPU benchmarks (volconv
against cuDNN through torch.conv3d for every family, cupyx.scipy.ndimage for correlate where CuPy is
installed), then appends device, date, commit and ratios to bench/RESULTS-gpu.md.

    python bench/gpu_check.py [--out bench/RESULTS-gpu.md] [--quick]

Written to finish in under 8 minutes on an H200. Timings use CUDA events around each call after warm-up, the
median of several rounds; ratio = cuDNN time / volconv time (> 1: volconv faster). Families without a CUDA
version yet are listed as such, not timed. Without a GPU it says so and exits with status 2.
"""
import argparse
import datetime
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# compute-sanitizer's subset: every kernel of every family once (each family's every_kernel_once, conv3d's modes)
SANITIZER_SUBSET = "every_kernel_once or padding_mode_and_dtype or depthwise_kernel_against_torch"
BENCH_BUDGET_S = 240   # the benchmarks stop starting cases after this (the rest are listed as not run)


def cases(torch, vc):
    """(family, label, goal ratio, build) for every benchmark: build() -> (volconv, anchor name, anchor, backward)
    where volconv() and anchor() compute the same result from the same inputs, and backward says whether a
    forward+backward timing follows (both then take requires-grad inputs). Goals: issue 16's."""
    F = torch.nn.functional
    dev = "cuda"

    def dense(shape, w_shape, pad, goal, label, backward=False):
        def build():
            x, w = torch.randn(shape, device=dev), torch.randn(w_shape, device=dev)
            g = shape[1] // w_shape[1]
            return (lambda x=x, w=w: vc.conv3d(x, w, padding=pad, groups=g)), "cuDNN", \
                (lambda x=x, w=w: F.conv3d(x, w, padding=pad, groups=g)), (x, w) if backward else None
        return "dense", label, goal, build

    def sparse():
        x = torch.randn(1, 1, 128, 128, 128, device=dev)
        dense_w = torch.randn(1, 1, 15, 15, 15, device=dev) * (torch.rand(1, 1, 15, 15, 15, device=dev) < 0.01)
        k = vc.SparseKernel.from_dense(dense_w.cpu().numpy())
        return (lambda: vc.sparse_conv3d(x, k, padding=7)), "cuDNN dense", \
            (lambda: F.conv3d(x, dense_w, padding=7)), None

    def nested():
        x = torch.randn(1, 32, 96, 96, 96, device=dev)
        w1, w2 = torch.randn(32, 1, 7, 7, 7, device=dev), torch.randn(32, 1, 3, 3, 3, device=dev)
        return (lambda: vc.nested_conv3d(x, [w1, w2], groups=32)), "two cuDNN calls", \
            (lambda: F.conv3d(F.conv3d(x, w1, padding=3, groups=32), w2, padding=1, groups=32)), None

    def lowrank(kind):
        def build():
            x = torch.randn(1, 32, 64, 64, 64, device=dev)
            layer = (vc.nn.CPConv3d(32, 32, 7, padding=3, rank=16) if kind == "cp" else
                     vc.nn.TuckerConv3d(32, 32, 7, padding=3, ranks=(8, 8, 4, 4, 4))).to(dev)
            ref = torch.nn.Conv3d(32, 32, 7, padding=3).to(dev)
            with torch.no_grad():   # the same layer, its weight rebuilt dense
                ref.weight.copy_(layer.to_dense())
                ref.bias.copy_(layer.bias)
            return (lambda: layer(x)), "cuDNN dense", (lambda: ref(x)), None
        return build

    def correlate():
        try:
            import cupy
            from cupyx.scipy import ndimage as cnd
        except ImportError:
            return None
        v = torch.randn(256, 256, 256, device=dev)
        k = torch.from_numpy(vc.kernels.gaussian(2.0).to_dense()).float().to(dev)
        cv, ck = cupy.asarray(v), cupy.asarray(k)
        return (lambda: vc.correlate(v, k, mode="reflect")), "cupyx.scipy.ndimage", \
            (lambda: cnd.correlate(cv, ck, mode="reflect")), None

    def dynamic(backward):
        def build():
            x = torch.randn(1, 16, 64, 64, 64, device=dev)
            field = torch.randn(1, 1, 125, 64, 64, 64, device=dev) / 125   # (N, G, k^3, D, H, W): one group

            def unfold(x, field):   # torch's way: every voxel's 5^3 patch materialised
                p = F.pad(x, (2,) * 6).unfold(2, 5, 1).unfold(3, 5, 1).unfold(4, 5, 1)   # (N, C, D, H, W, 5, 5, 5)
                return torch.einsum("ncdhwt,ntdhw->ncdhw", p.flatten(5), field[:, 0])
            return (lambda: vc.dynamic_conv3d(x, field, 5, padding="same")), "torch unfold", \
                (lambda: unfold(x, field)), (x, field) if backward else None
        return build

    def adaptive():
        brain = vc.io.load(ROOT / "sample_volumes" / "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")
        v = torch.from_numpy(brain.data).float().to(dev)
        sigma = torch.linspace(0.5, 3.0, v.shape[2], device=dev).expand(v.shape).contiguous()
        gauss = vc.kernels.gaussian(2.0, brain.zooms)
        return (lambda: vc.adaptive_filter(v, sigma, brain.zooms)), "constant-sigma Gaussian (same GPU)", \
            (lambda: vc.correlate(v, gauss)), None

    def bilateral():
        brain = vc.io.load(ROOT / "sample_volumes" / "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")
        v = torch.from_numpy(brain.data).float().to(dev)
        sigma, sr, zooms = 2.0, 20.0, [float(z) for z in brain.zooms]
        radii = [int(3.0 * sigma / z + 0.5) for z in zooms]

        taps = [(i, j, k) for i in range(2 * radii[0] + 1) for j in range(2 * radii[1] + 1)
                for k in range(2 * radii[2] + 1)]
        spatial = torch.tensor([-sum(((q - r) * z) ** 2 for q, r, z in zip(t, radii, zooms)) / (2 * sigma ** 2)
                                for t in taps], device=dev)   # each tap's term, on the GPU once

        def tap_loop():   # torch's way on the same GPU: the definition tap by tap over shifted views (5 passes)
            p = F.pad(v[None, None], [r for r in radii[::-1] for _ in range(2)], mode="reflect")[0, 0]
            num, den, (D, H, W) = torch.zeros_like(v), torch.zeros_like(v), v.shape
            for n, (i, j, k) in enumerate(taps):
                d = p[i:i + D, j:j + H, k:k + W] - v
                w = torch.addcmul(spatial[n], d, d, value=-1 / (2 * sr * sr)).exp_()
                num.addcmul_(w, d)
                den += w
            return v + num / den
        return (lambda: vc.bilateral_filter(v, sigma, sr, brain.zooms, mode="mirror")), \
            "torch tap loop (same GPU)", tap_loop, None

    return [
        dense((1, 1, 256, 256, 256), (1, 1, 7, 7, 7), 3, 3.0, "one channel 256^3 k=7"),
        dense((1, 1, 256, 256, 256), (1, 1, 15, 15, 15), 7, 3.0, "one channel 256^3 k=15"),
        dense((1, 1, 128, 128, 128), (1, 1, 31, 31, 31), 15, 3.0, "one channel 128^3 k=31"),
        dense((1, 64, 96, 96, 96), (64, 1, 7, 7, 7), 3, 3.0, "depthwise 64 ch 96^3 k=7", backward=True),
        dense((1, 64, 96, 96, 96), (64, 1, 15, 15, 15), 7, 3.0, "depthwise 64 ch 96^3 k=15", backward=True),
        dense((1, 64, 64, 64, 64), (64, 1, 31, 31, 31), 15, 3.0, "depthwise 64 ch 64^3 k=31"),
        dense((1, 32, 96, 96, 96), (32, 32, 3, 3, 3), 1, 1.0, "layer 32->32 96^3 k=3 (cuDNN's own)",
              backward=True),
        ("sparse", "sparse 15^3 at 1%, 128^3", 10.0, sparse),
        ("nested", "nested depthwise 32 ch 96^3 7^3 -> 3^3", 2.0, nested),
        ("low-rank", "CPConv3d 32->32 k=7 rank 16, 64^3", 3.0, lowrank("cp")),
        ("low-rank", "TuckerConv3d 32->32 k=7 ranks (8, 8, 4, 4, 4), 64^3", 3.0, lowrank("tucker")),
        ("filtering", "correlate 256^3 Gaussian sigma 2 (reflect)", 3.0, correlate),
        ("dynamic", "dynamic_conv3d 16 ch 64^3 k=5 G=1", 20.0, dynamic(False)),
        ("dynamic", "dynamic_conv3d 16 ch 64^3 k=5 G=1, fwd+bwd (goal 10x)", 20.0, dynamic(True)),
        # the adaptive filter's goal: within 3x of a constant Gaussian, ratio >= 0.33 (its numbers differ: no error)
        ("dynamic", "adaptive_filter, 1 mm brain, sigma 0.5-3 mm", 0.33, adaptive),
        # the bilateral filter: one fused pass against torch's five per tap (issue 18's CPU goal: >= 20x SimpleITK)
        ("filtering", "bilateral_filter, 1 mm brain, sigma 2 mm, range 20 (13^3 taps)", 10.0, bilateral),
    ]


def run(cmd, budget):
    """(exit status, seconds, last lines of output) of cmd, stopped after budget seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
    return status, time.perf_counter() - start, "\n".join(out.strip().splitlines()[-3:])


def timed(torch, fn, rounds):
    """Median milliseconds of fn() by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def peak_mib(torch, fn):
    """MiB one call of fn allocates at its peak beyond what is allocated before it (its output included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def benchmarks(torch, vc, quick):
    """One table row per case: times, ratio (anchor / volconv: > 1 means volconv is faster), goal, error."""
    torch.backends.cudnn.benchmark = True
    rows, start, rounds = [], time.perf_counter(), 3 if quick else 7
    for family, label, goal, build in cases(torch, vc):
        if time.perf_counter() - start > BENCH_BUDGET_S:
            rows.append(f"| {label} | not run: the benchmarks' {BENCH_BUDGET_S} s were spent | | | | | | |")
            continue
        try:
            built = build()
            if built is None:
                rows.append(f"| {label} | not run: its anchor is not installed | | | | | | |")
                continue
            ours_fn, anchor_name, anchor_fn, grads = built
            with torch.no_grad():
                got, ref = ours_fn(), torch.as_tensor(anchor_fn(), device="cuda")
                error = float((got - ref).abs().max() / ref.abs().max())
            ours, anchor = timed(torch, ours_fn, rounds), timed(torch, anchor_fn, rounds)
            peaks = [peak_mib(torch, f) for f in (ours_fn, anchor_fn)]
            row = f"| {label} | {anchor_name} | {ours:.2f} | {anchor:.2f} | **{anchor / ours:.2f}x** (goal {goal:g}x)"
            if grads is not None:
                for t in grads:
                    t.requires_grad_()
                ours_b = timed(torch, lambda: ours_fn().sum().backward(), rounds)
                anchor_b = timed(torch, lambda: anchor_fn().sum().backward(), rounds)
                row += f" | **{anchor_b / ours_b:.2f}x** ({ours_b:.1f} / {anchor_b:.1f} ms)"
            else:
                row += " | -"
            rows.append(row + f" | {peaks[0]:.0f} / {peaks[1]:.0f} | {error:.1e} |")
        except Exception as e:   # one failing case must not hide the others' numbers
            rows.append(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | | |")
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-gpu.md"))
    p.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing measured (the emulated suite: VOLCONV_CUDA_EMULATOR=1 "
              "python -m pytest -m cuda)")
        return 2
    lines = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines.append(f"## {datetime.date.today().isoformat()}, commit {commit}, {torch.cuda.get_device_name(0)}")
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")
    if shutil.which("nvcc"):
        status, seconds, tail = run([sys.executable, "-m", "volconv.cuda", "build"], 240)
        lines.append(f"- plugin build: {status} ({seconds:.0f} s) {tail.splitlines()[-1] if tail else ''}")
    import volconv as vc

    if not vc.has_cuda():
        lines.append("- volconv's CUDA plugin is not usable here (not built, or its runtime sees no GPU)")
        print("\n".join(lines))
        return 1
    status, seconds, tail = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], 240)
    lines.append(f"- cuda suite: exit {status}, {seconds:.0f} s: {tail.splitlines()[-1] if tail else ''}")
    if shutil.which("compute-sanitizer"):
        for tool in ("memcheck", "racecheck"):
            status, seconds, tail = run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9",
                                         sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-k",
                                         SANITIZER_SUBSET, "tests"], 120)
            lines.append(f"- compute-sanitizer {tool}: exit {status}, {seconds:.0f} s")
    else:
        lines.append("- compute-sanitizer: not on PATH")
    lines.append("")
    lines.append("| float32 | anchor | volconv ms | anchor ms | fwd ratio | fwd+bwd ratio (volconv / anchor) | "
                 "peak MiB beyond the inputs, volconv / anchor | max rel. difference |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    lines += benchmarks(torch, vc, a.quick)
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(a.out)
    header = "" if out.exists() else "# GPU results (bench/gpu_check.py)\n\n"
    with open(out, "a") as f:
        f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
