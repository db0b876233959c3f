"""The README's vesselness picture: a synthetic vessel tree (curved tubes of 0.8-3 mm radius branching in noise,
0.8 x 0.8 x 1.2 mm voxels) written as NIfTI, then `volconv filter --frangi 1:3:3mm --bright-ridges --preview`.

    python examples/vessel_preview.py [OUT_DIR]     (default: docs/, writes frangi_preview.png there)
"""
import os
import sys
import tempfile

import numpy as np


def vessel_tree(shape=(120, 120, 80), zooms=(0.8, 0.8, 1.2), seed=3):
    """Bright tubes along random smooth curves, radius shrinking at each branching, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) * z for n, z in zip(shape, zooms)], indexing="ij"), -1)
    extent = np.array(shape) * np.array(zooms)
    v = np.zeros(shape, np.float32)
    stack = [(extent * [0.5, 0.05, 0.5], np.array([0.0, 1.0, 0.1]), 3.0, 0)]
    while stack:
        p, d, radius, depth = stack.pop()
        for step in range(40):
            d = d + 0.25 * rng.standard_normal(3)
            d /= np.linalg.norm(d)
            p = p + 2.0 * d
            if np.any(p < 0) or np.any(p > extent):
                break
            lo = np.maximum(((p - 3 * radius) / zooms).astype(int), 0)
            hi = np.minimum(((p + 3 * radius) / zooms).astype(int) + 1, shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            r2 = ((grid[box] - p) ** 2).sum(-1)
            np.maximum(v[box], np.exp(-r2 / (2 * radius ** 2)).astype(np.float32), out=v[box])
            if step % 12 == 11 and depth < 3 and radius > 1.0:
                side = np.cross(d, rng.standard_normal(3))
                stack.append((p, d + side / np.linalg.norm(side), radius * 0.7, depth + 1))
    return v + 0.08 * rng.standard_normal(shape).astype(np.float32), zooms


def main(out_dir="docs"):
    import nibabel as nib

    from volconv.cli import main as volconv

    v, zooms = vessel_tree()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "vessels.nii.gz")
        img = nib.Nifti1Image(v, np.diag(list(zooms) + [1.0]))
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, src)
        return volconv(["filter", src, os.path.join(tmp, "frangi.nii.gz"), "--frangi", "1:3:3mm", "--bright-ridges",
                        "--preview", os.path.join(out_dir, "frangi_preview.png"), "--force"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
