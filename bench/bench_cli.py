"""The whole `volconv filter` command against the least a tool can do: a Python process that only loads and
saves the same file with nibabel (float32), and against `niimath IN -s SIGMA OUT` (the open fslmaths, OpenMP C;
when installed: `pip install niimath`), on the same .nii.gz, with OMP_NUM_THREADS=2. All as fresh processes, timed
in one run (best of N, in turn). Targets: volconv filter --gaussian 2mm at most 1.3x the load-and-save process
(issue 3) and faster than niimath -s 2 (issue 20). Run it with an installed volconv (`pip install .`: its modules
byte-compiled); under PYTHONDONTWRITEBYTECODE=1 an editable install recompiles volconv's sources at every start
(about 60 ms here).

    python bench/bench_cli.py [--volume PATH] [--rounds 5]
"""
import argparse
import os
import shutil
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
        if shutil.which("niimath"):
            commands["niimath -s"] = ["niimath", a.volume, "-s", a.sigma.removesuffix("mm"),
                                      os.path.join(tmp, "m.nii.gz")]
        env = dict(os.environ, OMP_NUM_THREADS="2")
        best = {name: float("inf") for name in commands}
        for r in range(a.rounds):
            names = list(commands)
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                subprocess.run(commands[name], check=True, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                best[name] = min(best[name], time.perf_counter() - t0)
    ratio = best["volconv filter"] / best["nibabel load+save"]
    print(f"### The whole command on {os.path.basename(a.volume)}, Gaussian {a.sigma}, best of {a.rounds}\n")
    print("| process | s |\n|---|---:|")
    for name, t in best.items():
        print(f"| {name} | {t:.2f} |")
    print(f"\nvolconv filter / nibabel load+save = **{ratio:.2f}x** (target: at most 1.3x)")
    if "niimath -s" in best:
        print(f"niimath -s / volconv filter = **{best['niimath -s'] / best['volconv filter']:.2f}x** (target: > 1)")


if __name__ == "__main__":
    main()
