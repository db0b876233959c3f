"""Dense 3D convolution benchmark (issue: foundation). Float32, one run, ratios against the anchors:
torch.conv3d (CPU, oneDNN), scipy.ndimage.correlate, scipy.signal.fftconvolve / oaconvolve.

    python bench/bench_dense.py [--quick] [--threads 2] [--out FILE.md]

Ratio = anchor time / volconv time (> 1: volconv faster). The cases live in volconv/_benchmark.py (shared
with `volconv bench`).
"""
import argparse

from volconv import _benchmark


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller volumes and fewer rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    text = _benchmark.dense(quick=a.quick, threads=a.threads)
    _benchmark.emit(text, a.out)


if __name__ == "__main__":
    main()
