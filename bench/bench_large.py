"""A volume larger than comfortable memory (issue 3): `volconv filter` on a 1024 x 1024 x 512 float32
uncompressed NIfTI (2 GiB), Gaussian 2 mm, against a Python process that only loads and saves the same file
with nibabel. Each is a fresh process; peak resident memory is the child's own (os.wait4).
Target: volconv's peak RSS below 1.5x the output's size.

    python bench/bench_large.py [--shape 1024 1024 512] [--dir DIR] [--out FILE]

Needs about 3x the volume's size of free disk in DIR (default: the system's temporary directory).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from volconv import _benchmark

LOAD_SAVE = ("import sys, nibabel as nib, numpy as np; img = nib.load(sys.argv[1]); "
             "data = np.asarray(img.dataobj, dtype=np.float32); "
             "out = nib.Nifti1Image(data, img.affine, img.header); out.set_data_dtype(np.float32); "
             "nib.save(out, sys.argv[2])")


def make_volume(path, shape):
    """A smooth-ish random volume written plane by plane (this process never holds it)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm", "sec")
    header.set_sform(np.eye(4), code="aligned")
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(bytes(int(header.get_data_offset()) - f.tell()))
        for _ in range(shape[2]):
            f.write(rng.random(shape[:2], dtype=np.float32).tobytes(order="F"))


def run(cmd):
    """(seconds, peak RSS in bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(1024, 1024, 512))
    p.add_argument("--dir", default=None)
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    shape = tuple(a.shape)
    size = 4 * int(np.prod(shape))
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        src = os.path.join(tmp, "big.nii")
        make_volume(src, shape)
        volconv = [sys.executable, "-m", "volconv", "filter", src, os.path.join(tmp, "v.nii"), "--gaussian",
                   "2mm", "--force", "--quiet"]
        nibabel = [sys.executable, "-c", LOAD_SAVE, src, os.path.join(tmp, "n.nii")]
        rows = {"volconv filter --gaussian 2mm": run(volconv), "nibabel load+save": run(nibabel)}
    lines = [f"### A {shape[0]}x{shape[1]}x{shape[2]} float32 volume ({size / 2**30:.1f} GiB, uncompressed), "
             "one fresh process each", "", "| process | s | peak RSS (GiB) | peak RSS / output size |",
             "|---|---:|---:|---:|"]
    for name, (seconds, rss) in rows.items():
        lines.append(f"| {name} | {seconds:.1f} | {rss / 2**30:.2f} | {rss / size:.2f}x |")
    ratio = rows["volconv filter --gaussian 2mm"][1] / size
    lines += ["", f"volconv's peak RSS = **{ratio:.2f}x** the output's size (target: below 1.5x); its time = "
              f"{rows['volconv filter --gaussian 2mm'][0] / rows['nibabel load+save'][0]:.2f}x the load+save "
              "process's."]
    _benchmark.emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
