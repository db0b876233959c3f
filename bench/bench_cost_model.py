"""Does "auto" pick the fastest algorithm on this machine? (issue 20, goal 4: the cost model holds on other
machines.) This machine's constants are measured first (engine/rates.py, what `volconv bench --calibrate` stores;
here kept in a temporary directory, the user's stored calibration untouched), then every algorithm that suits a
convolution is timed on cases around the crossovers (one channel k=5..11 on 48^3..96^3, 8 and 16 channels k=3..7,
a 10%-dense 9^3 kernel), float32, interleaved rounds. For each case: the fastest, and the pick of the cost model
with its built-in constants and with this machine's, as the pick's time over the fastest (1.00x: right).

    python bench/bench_cost_model.py [--threads 2] [--quick] [--out FILE]
"""
import argparse
import os
import tempfile

import numpy as np

import volconv
from volconv import _benchmark
from volconv._validate import ConvSpec
from volconv.engine import calibration, cost, dense, rates


def cases(quick):
    sizes = (48, 64) if quick else (48, 64, 96)
    for n in sizes:
        for k in (5, 7, 9, 11):
            yield f"1 ch {n}^3 k={k}", (1, 1, n, n, n), (1, 1, k, k, k), 1.0
    for c in (8, 16):
        for k in (3, 5, 7):
            yield f"{c} ch 32^3 k={k}", (1, c, 32, 32, 32), (c, c, k, k, k), 1.0
    yield "1 ch 64^3 9^3 at 10%", (1, 1, 64, 64, 64), (1, 1, 9, 9, 9), 0.1


def picks(spec, nnz, threads, times):
    """The cost model's pick among the timed algorithms, with the built-in constants and with this machine's."""
    out = {}
    for name, setting in (("built-in", "off"), ("calibrated", "on")):
        os.environ["VOLCONV_CALIBRATION"] = setting
        calibration.reset()
        costs = {a: c for a, c in cost.algorithm_costs(spec, threads, allow_torch=False, nnz=nnz).items()
                 if a in times}
        out[name] = min(costs, key=costs.get)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    p.add_argument("--out")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VOLCONV_CACHE_DIR"] = cache
        constants = rates.measure(quick=a.quick, nthreads=a.threads)
        calibration.store(constants, version=volconv.__version__, threads=a.threads, quick=a.quick)
        rng = np.random.default_rng(0)
        lines = [f"### The cost model's picks, {a.threads} threads, {calibration.machine_key()}", "",
                 "| case | fastest | times (ms) | built-in picks | calibrated picks |", "|---|---|---|---|---|"]
        score = {"built-in": [], "calibrated": []}
        for case, x_shape, w_shape, density in cases(a.quick):
            x = rng.standard_normal(x_shape, dtype=np.float32)
            w = rng.standard_normal(w_shape, dtype=np.float32)
            w[rng.random(w.shape) >= density] = 0
            spec = ConvSpec(x_shape, w_shape, stride=(1, 1, 1), pads=tuple(((k - 1) // 2, k // 2)
                                                                             for k in w_shape[2:]),
                            dilation=(1, 1, 1), groups=1, mode="constant")
            suitable = ["direct"] + (["fft"] if min(w_shape[2:]) > 3 else []) + (["sparse"] if density < 0.5 else [])
            times = _benchmark.best_times({alg: (lambda alg=alg: dense.ALGORITHMS[alg](x, w, None, spec, a.threads))
                                           for alg in suitable}, rounds=2 if a.quick else 4)
            fastest = min(times, key=times.get)
            chosen = picks(spec, np.count_nonzero(w), a.threads, times)
            cells = []
            for name, alg in chosen.items():
                score[name].append(times[alg] / times[fastest])
                cells.append(f"{alg} ({times[alg] / times[fastest]:.2f}x)")
            lines.append(f"| {case} | {fastest} | " + ", ".join(f"{alg} {1e3 * t:.2f}" for alg, t in times.items())
                         + " | " + " | ".join(cells) + " |")
    lines.append("")
    for name, slowdowns in score.items():
        right = sum(s == 1.0 for s in slowdowns)
        lines.append(f"{name} constants: the fastest in {right} of {len(slowdowns)} cases, worst pick "
                     f"{max(slowdowns):.2f}x the fastest, mean {sum(slowdowns) / len(slowdowns):.2f}x")
    _benchmark.emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
