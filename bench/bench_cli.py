"""The whole `volconv filter` command against the least a tool can do: a Python process that only loads and
saves the same file with nibabel (float32). Both as fresh processes, timed in one run (best of N, alternating).
Target (issue 3): volconv filter --gaussian 2mm at most 1.3x the load-and-save process.

    python bench/bench_cli.py [--volume PATH] [--rounds 5]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BRAIN = os.path.join(HERE, "..", "sample_volumes", "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")
LOAD_SAVE = ("import sys, nibabel as nib, numpy as np; img = nib.load(sys.argv[1]); "
             "data = np.asarray(img.dataobj, dtype=np.float32); "
             "out = nib.Nifti1Image(data, img.affine, img.header); out.set_data_dtype(np.float32); "
             "nib.save(out, sys.argv[2])")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", default=BRAIN)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sigma", default="2mm")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "volconv filter": [sys.executable, "-m", "volconv", "filter", a.volume, os.path.join(tmp, "v.nii.gz"),
                               "--gaussian", a.sigma, "--force", "--quiet"],
            "nibabel load+save": [sys.executable, "-c", LOAD_SAVE, a.volume, os.path.join(tmp, "n.nii.gz")],
        }
        best = {name: float("inf") for name in commands}
        for r in range(a.rounds):
            for name in (list(commands) if r % 2 == 0 else list(reversed(commands))):
                t0 = time.perf_counter()
                subprocess.run(commands[name], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                best[name] = min(best[name], time.perf_counter() - t0)
    ratio = best["volconv filter"] / best["nibabel load+save"]
    print(f"### The whole command on {os.path.basename(a.volume)}, Gaussian {a.sigma}, best of {a.rounds}\n")
    print("| process | s |\n|---|---:|")
    for name, t in best.items():
        print(f"| {name} | {t:.2f} |")
    print(f"\nvolconv filter / nibabel load+save = **{ratio:.2f}x** (target: at most 1.3x)")


if __name__ == "__main__":
    main()
