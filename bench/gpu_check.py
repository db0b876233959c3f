"""The GPU check: on a machine with an NVIDIA GPU, one command that builds the CUDA plugin, runs the whole
cuda-marked suite, compute-sanitizer (memcheck, racecheck) on a small subset, and the GPU benchmarks (volconv
against cuDNN through torch.conv3d), then appends device, date, commit and ratios to bench/RESULTS-gpu.md.

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
# (label, input shape, weight shape, padding): the goals of issue 16 for the families the plugin has
CASES = [
    ("one channel 256^3 k=7", (1, 1, 256, 256, 256), (1, 1, 7, 7, 7), 3),
    ("one channel 256^3 k=15", (1, 1, 256, 256, 256), (1, 1, 15, 15, 15), 7),
    ("one channel 128^3 k=31", (1, 1, 128, 128, 128), (1, 1, 31, 31, 31), 15),
    ("depthwise 64 ch 96^3 k=7", (1, 64, 96, 96, 96), (64, 1, 7, 7, 7), 3),
    ("depthwise 64 ch 96^3 k=15", (1, 64, 96, 96, 96), (64, 1, 15, 15, 15), 7),
    ("layer 32->32 96^3 k=3", (1, 32, 96, 96, 96), (32, 32, 3, 3, 3), 1),
]
NOT_YET = ["sparse 15^3 at 1%", "nested depthwise 7^3 -> 3^3", "CP / Tucker layers", "correlate / convolve",
           "dynamic kernels"]
SANITIZER_SUBSET = "padding_mode_and_dtype or too_large or same_even or beyond_the_grid or layer"   # as CI's ASan pass
BENCH_BUDGET_S = 180   # the benchmarks stop starting cases after this (the rest are listed as not run)


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


def benchmarks(torch, vc, quick):
    torch.backends.cudnn.benchmark = True
    rows, start = [], time.perf_counter()
    for label, xs, ws, pad in CASES[:3] if quick else CASES:
        if time.perf_counter() - start > BENCH_BUDGET_S:
            rows.append(f"| {label} | not run: the benchmarks' {BENCH_BUDGET_S} s were spent | | | | | | |")
            continue
        x = torch.randn(xs, device="cuda")
        w = torch.randn(ws, device="cuda")
        groups = xs[1] // ws[1]
        ref = torch.nn.functional.conv3d(x, w, padding=pad, groups=groups)
        got = vc.conv3d(x, w, padding=pad, groups=groups)
        error = float((got - ref).abs().max() / ref.abs().max())
        rounds = 3 if quick else 7
        ours = timed(torch, lambda: vc.conv3d(x, w, padding=pad, groups=groups), rounds)
        cudnn = timed(torch, lambda: torch.nn.functional.conv3d(x, w, padding=pad, groups=groups), rounds)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def step(conv):
            conv(xg, wg).sum().backward()

        ours_bwd = timed(torch, lambda: step(lambda a, b: vc.conv3d(a, b, padding=pad, groups=groups)), rounds)
        cudnn_bwd = timed(torch, lambda: step(lambda a, b: torch.nn.functional.conv3d(a, b, padding=pad,
                                                                                     groups=groups)), rounds)
        rows.append(f"| {label} | {ours:.2f} | {cudnn:.2f} | **{cudnn / ours:.2f}x** | {ours_bwd:.2f} | "
                    f"{cudnn_bwd:.2f} | **{cudnn_bwd / ours_bwd:.2f}x** | {error:.1e} |")
        del x, w, xg, wg, ref, got
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
                                         SANITIZER_SUBSET, "tests/test_cuda.py"], 120)
            lines.append(f"- compute-sanitizer {tool}: exit {status}, {seconds:.0f} s")
    else:
        lines.append("- compute-sanitizer: not on PATH")
    lines.append("")
    lines.append("| conv3d, float32 | volconv ms | cuDNN ms | fwd ratio | volconv fwd+bwd ms | cuDNN fwd+bwd ms | "
                 "fwd+bwd ratio | max rel. error |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    lines += benchmarks(torch, vc, a.quick)
    lines.append("")
    lines.append(f"No CUDA version yet (not timed): {', '.join(NOT_YET)}.")
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
