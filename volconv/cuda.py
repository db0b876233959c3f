"""Build volconv's CUDA plugin: ``python -m volconv.cuda build`` (from a source checkout, after an install that
skipped it), or at install time when nvcc is present (``VOLCONV_CUDA=0`` skips it, ``=1`` insists).

nvcc alone compiles cuda_plugin/*.cu into volconv/_cuda_plugin.so, a shared library with a plain C interface
(cuda_plugin/volconv_cuda.h) that volconv/_cuda.py loads with ctypes: no torch headers, so it builds on a
machine without a GPU. Targets: sm_80 (A100), sm_90 (H100) and PTX for newer GPUs.

This file imports nothing from volconv: setup.py loads it by path.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys

ARCHS = ("80", "90")
LIBRARY = "_cuda_plugin.so"


def default_source():
    """cuda_plugin/ of the checkout this file sits in (an editable install or the source tree)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_plugin")


def nvcc_command(sources, out, nvcc="nvcc"):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    gencode.append(f"-gencode=arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}")   # PTX: newer GPUs JIT it
    # --threads 0: the three targets compile side by side, one per core
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0", *gencode, *sources,
            "-o", out]


def build(source_dir=None, out=None, nvcc=None):
    """Compile the plugin; returns the library's path. Raises RuntimeError naming what is missing or failed."""
    source_dir = source_dir or default_source()
    sources = sorted(glob.glob(os.path.join(source_dir, "*.cu")))
    if not sources:
        raise RuntimeError(f"no CUDA sources (*.cu) in {source_dir}: build from a volconv source checkout")
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH: install the CUDA toolkit to build volconv's CUDA plugin")
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY)
    tmp = out + ".tmp"
    proc = subprocess.run(nvcc_command(sources, tmp, nvcc), capture_output=True, text=True)
    if proc.returncode:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise RuntimeError(f"nvcc failed to build volconv's CUDA plugin:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)   # a half-written library is never loaded
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m volconv.cuda", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    b = sub.add_parser("build", help="compile the CUDA plugin with nvcc")
    b.add_argument("--source", help="directory of the .cu files (default: the checkout's cuda_plugin/)")
    b.add_argument("--out", help=f"library to write (default: volconv/{LIBRARY})")
    args = p.parse_args(argv)
    try:
        path = build(args.source, args.out)
    except RuntimeError as e:
        print(f"volconv.cuda: error: {e}", file=sys.stderr)
        return 1
    print(f"volconv.cuda: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
