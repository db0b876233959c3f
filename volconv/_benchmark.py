"""Benchmark machinery shared by bench/*.py and `volconv bench`: contenders timed round-robin in ONE run
(this machine is shared and noisy: compare ratios, not absolute times), best of the rounds, printed as a
markdown table with GFLOP/s and ratios against the anchors."""
import time

import numpy as np

from . import _cpu
from .ops.conv import conv3d


def best_times(contenders, rounds=5, min_seconds=0.0, repeat=2):
    """{name: fn} -> {name: best seconds}. One warm-up call each, then `rounds` round-robin passes, each
    starting with the next contender; within a pass each contender runs `repeat` times back to back (the
    first call after another contender meets its cold caches and freshly released memory)."""
    for fn in contenders.values():
        fn()
    best = {name: float("inf") for name in contenders}
    names = list(contenders)
    start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - start < min_seconds:
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = contenders[name]
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        r += 1
    return best


def arguments(doc, argv=None, configure=None):
    """A benchmark's command line: --threads (default 2; torch's threads set to it) and --out FILE;
    `configure(parser)` adds the benchmark's own options."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    if configure is not None:
        configure(p)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    return args


def peak_extra_bytes(fn, *, minus_result=True):
    """Resident memory a call adds at its peak (Linux: the peak, VmHWM, reset by clear_refs after malloc_trim
    hands freed memory back, so the call's allocations take fresh pages); minus its result's size unless told."""
    import ctypes

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    out = fn()
    return status("VmHWM:") - before - (out.nbytes if minus_result else 0)


class Machine:
    """This machine's limits, measured now (benchmarks hold volconv's kernels against them, in the same run):
    the vector units' multiply-add peak (an FMA loop, every thread) and the memory bandwidth of a STREAM-like
    copy (a 256 MiB array copied into another, both halves at once; bytes read plus bytes written)."""

    def __init__(self, threads, dtype=np.float32):
        from concurrent.futures import ThreadPoolExecutor

        double = np.dtype(dtype) == np.float64
        self.flops = 2 * max(_cpu.compiled.fma_peak(5_000_000, threads, double) for _ in range(3))
        src = np.ones(2**26, np.float32)
        dst = np.zeros_like(src)
        parts = [slice(i * src.size // threads, (i + 1) * src.size // threads) for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:   # numpy's copy releases the GIL
            copy = lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))  # noqa: E731
            self.bandwidth = 2 * src.nbytes / best_times({"copy": copy}, rounds=5)["copy"]

    def limit(self, flops, nbytes):
        """The least time a kernel of this many floating-point operations and bytes of memory traffic can take:
        compute-bound or bandwidth-bound, whichever is longer."""
        return max(flops / self.flops, nbytes / self.bandwidth)

    def describe(self):
        return f"FMA peak {self.flops / 1e9:.0f} GFLOP/s, copy bandwidth {self.bandwidth / 1e9:.1f} GB/s"


class Table:
    """Rows of (case, volconv variant, ms, GFLOP/s, ratios vs anchors), printed as markdown."""

    def __init__(self, title):
        self.title, self.rows = title, []

    def add(self, case, times, ours, anchors, flops=None, note=""):
        """times: {name: s}; ours: names of volconv's contenders; anchors: names to compare against.
        Ratio = anchor time / our time (> 1: volconv is faster)."""
        for name in ours:
            t = times[name]
            ratios = {a: times[a] / t for a in anchors if a in times}
            best_anchor = min((times[a] for a in anchors if a in times), default=None)
            self.rows.append({
                "case": case, "volconv": name, "ms": t * 1e3,
                "gflops": None if flops is None else flops / t / 1e9,
                "anchors": ", ".join(f"{a} {times[a] * 1e3:.1f} ms" for a in anchors if a in times),
                "ratios": ", ".join(f"{r:.2f}x vs {a}" for a, r in ratios.items()),
                "vs_best": None if best_anchor is None else best_anchor / t, "note": note,
            })

    def markdown(self):
        lines = [f"### {self.title}", "",
                 "| case | volconv | ms | GFLOP/s | vs best anchor | ratios | anchors |",
                 "|---|---|---:|---:|---:|---|---|"]
        for r in self.rows:
            g = "" if r["gflops"] is None else f"{r['gflops']:.0f}"
            vb = "" if r["vs_best"] is None else f"**{r['vs_best']:.2f}x**"
            lines.append(f"| {r['case']} | {r['volconv']} | {r['ms']:.2f} | {g} | {vb} | {r['ratios']} | "
                         f"{r['anchors']} |")
        return "\n".join(lines)


def emit(text, path=None):
    """Print a benchmark's markdown and, when asked, write it to a file too."""
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# ------------------------------------------------------------------------------------------- dense conv3d
TARGETS = """Targets (issue 2): 1 ch 128^3 k=3 >= 10x ndimage and >= 50x torch; k=5, 7 >= 3x the best anchor;
k=11..31 >= 1.5x the better of fftconvolve/oaconvolve; depthwise 32 ch 64^3 k=7 fwd and fwd+bwd >= 3x torch;
16->16 64^3 k=3: 'auto' >= 1x torch, direct kernel aim >= 0.5x."""


def single_channel(table, sizes, n, threads, rounds):
    import scipy.ndimage as ndi
    import scipy.signal as ss
    torch = _torch()
    rng = np.random.default_rng(0)
    x = rng.random((n, n, n), dtype=np.float32)
    for k in sizes:
        w = rng.random((k, k, k), dtype=np.float32)
        x5, w5 = x[None, None], w[None, None]
        xt, wt = (torch.from_numpy(x5), torch.from_numpy(w5)) if torch is not None else (None, None)
        c = {"volconv": lambda: conv3d(x5, w5, padding=k // 2, workers=threads)}
        if k <= 7:
            c["volconv fft"] = lambda: conv3d(x5, w5, padding=k // 2, algorithm="fft", workers=threads)
            c["ndimage"] = lambda: ndi.correlate(x, w, mode="constant")
            if torch is not None:
                c["torch"] = lambda: torch.nn.functional.conv3d(xt, wt, padding=k // 2)
        else:
            c["volconv direct"] = lambda: conv3d(x5, w5, padding=k // 2, algorithm="direct", workers=threads)
        c["fftconvolve"] = lambda: ss.fftconvolve(x, w[::-1, ::-1, ::-1], mode="same")
        c["oaconvolve"] = lambda: ss.oaconvolve(x, w[::-1, ::-1, ::-1], mode="same")
        times = best_times(c, rounds=rounds if k <= 7 else max(len(c) + 1, rounds // 2))
        ours = [name for name in c if name.startswith("volconv")]
        anchors = [name for name in c if not name.startswith("volconv")]
        table.add(f"1 ch {n}^3 k={k}", times, ours, anchors, flops=2.0 * n ** 3 * k ** 3)


def layer(table, name, C, O, groups, k, n, threads, rounds):
    """Forward, and forward+backward through autograd, against torch.conv3d (needs torch)."""
    import torch

    torch.manual_seed(0)
    x = torch.rand(1, C, n, n, n)
    w = torch.rand(O, C // groups, k, k, k) - 0.5
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    flops = 2.0 * O * (C // groups) * k ** 3 * n ** 3

    def fwd(algorithm):
        return lambda: conv3d(x, w, padding=k // 2, groups=groups, algorithm=algorithm, workers=threads)

    def fwd_bwd(fn):
        def run():
            xg.grad = wg.grad = None
            fn(xg, wg).sum().backward()
        return run

    torch_fwd = lambda: torch.nn.functional.conv3d(x, w, padding=k // 2, groups=groups)  # noqa: E731
    c = {"volconv": fwd("auto"), "volconv direct": fwd("direct"), "torch": torch_fwd}
    table.add(f"{name} fwd", best_times(c, rounds=rounds), ["volconv", "volconv direct"], ["torch"], flops=flops)
    c = {
        "volconv": fwd_bwd(lambda a, b: conv3d(a, b, padding=k // 2, groups=groups, workers=threads)),
        "volconv direct": fwd_bwd(lambda a, b: conv3d(a, b, padding=k // 2, groups=groups,
                                                      algorithm="direct", workers=threads)),
        "torch": fwd_bwd(lambda a, b: torch.nn.functional.conv3d(a, b, padding=k // 2, groups=groups)),
    }
    table.add(f"{name} fwd+bwd", best_times(c, rounds=max(len(c) + 1, rounds // 2)), ["volconv", "volconv direct"],
              ["torch"], flops=3 * flops)


def dense(quick=False, threads=2):
    """The dense-convolution benchmark of bench/bench_dense.py -> markdown text."""
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    rounds = 3 if quick else 7
    n, m = (64, 32) if quick else (128, 64)
    table = Table(f"Dense conv3d, float32, {threads} threads ({_cpu.SIMD} build)")
    single_channel(table, (3, 5, 7), n, threads, rounds)
    single_channel(table, (11, 21) if quick else (11, 15, 21, 31), n, threads, rounds)
    if torch is not None:
        layer(table, f"depthwise 32 ch {m}^3 k=7", 32, 32, 32, 7, m, threads, rounds)
        layer(table, f"layer 16->16 {m}^3 k=3", 16, 16, 1, 3, m, threads, rounds)
    skipped = "" if torch is not None else "\n(torch is not installed: the torch anchors and layer cases are skipped)"
    return table.markdown() + "\n\n" + TARGETS + skipped
