"""The memory promise through the command (issues 3 and 14): `volconv filter` on a float32 uncompressed NIfTI
larger than its working-memory budget (--max-memory), with every option that changes how the file is read or
written: a .nii output, a .nii.gz output, --odt int16, --mask (a gzipped uint8 mask) with --normalize, and
--sigma-map (a spatially varying Gaussian); against a Python process that only loads and saves the same file
with nibabel. Each is a fresh process. Two peaks: the process's whole (os.wait4's ru_maxrss, imports included)
and the filter's own (Linux's VmHWM reset by clear_refs once volconv is imported: what the run adds).
Promise: the filter's own peak stays under the budget plus one output slab (at most a quarter of the budget).

    python bench/bench_large.py [--shape 256 256 1024] [--max-memory 64MiB] [--dir DIR] [--out FILE]

The default is a 256 MiB volume at a 64 MiB budget: 64 planes' worth for plain filtering, as the 512 MiB
default budget is for a 2 GiB 1024x1024x512 scan (`--shape 1024 1024 512 --max-memory 512MiB`). Needs about 4x the volume's size of free disk
in DIR (default: the system's temporary directory).
"""
import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from volconv import _benchmark
from volconv.io.slabs import memory_bytes

LOAD_SAVE = ("import sys, nibabel as nib, numpy as np; img = nib.load(sys.argv[1]); "
             "data = np.asarray(img.dataobj, dtype=np.float32); "
             "out = nib.Nifti1Image(data, img.affine, img.header); out.set_data_dtype(np.float32); "
             "nib.save(out, sys.argv[2])")

# the filter's own peak: VmHWM reset after the imports (their transient peak would hide it), freed memory
# handed back first so that the run's allocations take fresh pages
VOLCONV = """
import ctypes, sys
import volconv.cli, volconv.io, volconv.ops.filtering, volconv.ops.dynamic

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

ctypes.CDLL("libc.so.6").malloc_trim(0)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rc = volconv.cli.main(sys.argv[1:])
print(status("VmHWM") - base)
sys.exit(rc)
"""


def make_volume(path, shape, planes, dtype=np.float32):
    """A NIfTI volume written plane by plane (this process never holds it): planes(rng) gives each plane;
    gzipped when path ends in .gz."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_xyzt_units("mm", "sec")
    header.set_sform(np.eye(4), code="aligned")
    rng = np.random.default_rng(0)
    with (gzip.open(path, "wb", compresslevel=1) if path.endswith(".gz") else open(path, "wb")) as f:
        header.write_to(f)
        f.write(bytes(int(header.get_data_offset()) - f.tell()))
        for _ in range(shape[2]):
            f.write(np.asarray(planes(rng, shape[:2]), dtype).tobytes(order="F"))


def run(cmd):
    """(seconds, peak RSS in bytes, the last line of stdout) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, (out.split() or [""])[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 1024))
    p.add_argument("--max-memory", default="64MiB", help="volconv's working-memory budget (default 64MiB)")
    p.add_argument("--threads", type=int, default=2, help="volconv's threads (default 2)")
    p.add_argument("--dir", default=None)
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    shape = tuple(a.shape)
    size = 4 * int(np.prod(shape))
    budget = memory_bytes(a.max_memory, "--max-memory")
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        src, mask, sigma = (os.path.join(tmp, name) for name in ("big.nii", "mask.nii.gz", "sigma.nii"))
        make_volume(src, shape, lambda rng, s: rng.random(s, dtype=np.float32))
        make_volume(mask, shape, lambda rng, s: rng.random(s) > 0.3, np.uint8)
        make_volume(sigma, shape, lambda rng, s: rng.random(s, dtype=np.float32))   # 0-1 mm (1 mm voxels)
        common = ["--max-memory", a.max_memory, "--workers", str(a.threads), "--force", "--quiet"]
        cases = {
            ".nii output": ("v.nii", ["--gaussian", "2mm"]),
            ".nii.gz output": ("v.nii.gz", ["--gaussian", "2mm"]),
            "--odt int16": ("v.nii", ["--gaussian", "2mm", "--odt", "int16"]),
            "--mask --normalize": ("v.nii", ["--gaussian", "2mm", "--mask", mask, "--normalize"]),
            "--sigma-map (0-1 mm)": ("v.nii", ["--sigma-map", sigma]),
        }
        rows = {}
        for name, (out, options) in cases.items():
            seconds, rss, own = run([sys.executable, "-c", VOLCONV, "filter", src, os.path.join(tmp, out)]
                                    + options + common)
            rows[f"volconv filter, {name}"] = (seconds, rss, int(own))
        seconds, rss, _ = run([sys.executable, "-c", LOAD_SAVE, src, os.path.join(tmp, "n.nii")])
        rows["nibabel load+save"] = (seconds, rss, None)
    lines = [f"### A {shape[0]}x{shape[1]}x{shape[2]} float32 volume ({size / 2**20:.0f} MiB, uncompressed), "
             f"--max-memory {a.max_memory}, {a.threads} threads; one fresh process each", "",
             "| process | s | peak RSS (MiB) | filter's own peak (MiB) | own peak / budget |",
             "|---|---:|---:|---:|---:|"]
    for name, (seconds, rss, own) in rows.items():
        mine = "" if own is None else f"{own / 2**20:.0f}"
        ratio = "" if own is None else f"{own / budget:.2f}x"
        lines.append(f"| {name} | {seconds:.1f} | {rss / 2**20:.0f} | {mine} | {ratio} |")
    worst = max(own for _, _, own in rows.values() if own is not None)
    lines += ["", f"The filter's own peak is at most **{worst / budget:.2f}x** the budget (promise: the budget plus "
              f"one output slab, at most 1.25x); the output is {size / budget:.0f}x the budget."]
    _benchmark.emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
