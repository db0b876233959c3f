"""Issue 14, NIfTI filtering: masks that keep outside voxels out (NaN included) and the `nan` option (item 4),
the returned volume is what was written (item 6), the memory promise for every option of the command (item 12),
volumes thinner than the kernel (item 13), and max_memory with units (item 16)."""
import os
import subprocess
import sys
import textwrap
import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings, strategies as st

import volconv as vc
from volconv import cli
from volconv.io import parallel_gzip as _gzip, slabs as _slabs
from volconv.ops.dynamic import adaptive_filter

MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]


def write(path, data, affine=None):
    img = nib.Nifti1Image(data, np.diag([1.0, 1.2, 0.9, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def forced_slabs(monkeypatch, planes):
    """filter_nifti(max_memory=1) then runs in slabs of `planes` output planes (thinner than the rule's)."""
    monkeypatch.setattr(_slabs, "thickness", lambda *args: planes)


def stat_map(seed=0, shape=(14, 13, 15)):
    """A statistical map: values inside a ball-shaped brain, NaN outside it (and a few NaN/Inf inside)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    grid = np.indices(shape) - (np.array(shape) // 2)[:, None, None, None]
    brain = (grid ** 2).sum(0) <= (min(shape) // 2 - 1) ** 2
    x[~brain] = np.nan
    return x, brain


# ------------------------------------------------------------------------------------- item 4: masks and NaN


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_nan_outside_the_mask_does_not_contribute(tmp_path, normalize, mode):
    x, brain = stat_map()
    src = write(tmp_path / "stat.nii", x)
    box = np.ones((3, 3, 3), np.float32)
    clean = np.where(brain, x, 0)   # what the mask promises: outside voxels contribute nothing
    if normalize:
        with np.errstate(invalid="ignore"):   # 0 / 0 far outside the brain, not compared
            ref = ndi.correlate(clean, box, mode="constant") / ndi.correlate(brain.astype(np.float32), box,
                                                                            mode="constant")
    else:
        ref = ndi.correlate(clean, box, mode=mode)
    out = vc.io.filter_nifti(src, tmp_path / "o.nii", box, mode=mode, mask=brain, normalize=normalize,
                             outside="zero")
    assert np.isfinite(out.data).all()   # today: NaN from outside reaches every voxel near the brain's edge
    np.testing.assert_allclose(out.data[brain], ref[brain], rtol=0, atol=1e-5)   # float32 sums of 27 terms
    assert (out.data[~brain] == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_nan_option(tmp_path, normalize):
    x, brain = stat_map(1)
    x[7, 6, 7], x[5, 6, 8] = np.nan, np.inf   # non-finite voxels inside the brain too
    src = write(tmp_path / "stat.nii", x)
    finite = np.isfinite(x)
    box = np.ones((3, 3, 3), np.float32)

    def masked(inside):   # the mask rule, reference: outside voxels contribute nothing, kept as they were
        num = ndi.correlate(np.where(inside, x, 0), box, mode="constant")
        with np.errstate(invalid="ignore"):   # 0 / 0 where no inside voxel is near: kept as they were
            filtered = num / ndi.correlate(inside.astype(np.float32), box, mode="constant") if normalize else num
        return np.where(inside, filtered, x)

    zero = np.where(finite, x, 0)
    expected = {
        "zero": ndi.correlate(zero, box, mode="constant") / ndi.correlate(np.ones_like(x), box, mode="constant")
        if normalize else ndi.correlate(zero, box, mode="constant"),
        "mask": masked(finite),
    }
    for nan, ref in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # no "NaN spread" warning: nothing spreads
            out = vc.io.filter_nifti(src, tmp_path / f"{nan}.nii", box, mode="constant", normalize=normalize,
                                     nan=nan, overwrite=True)
        np.testing.assert_allclose(out.data, ref, rtol=0, atol=1e-5, equal_nan=True)
    # with a mask as well: non-finite voxels join the outside
    out = vc.io.filter_nifti(src, tmp_path / "both.nii", box, mode="constant", normalize=normalize,
                             mask=brain, nan="mask")
    np.testing.assert_allclose(out.data, masked(finite & brain), rtol=0, atol=1e-5, equal_nan=True)
    # "propagate" (the default) is vc.correlate's NaN rule, and says that NaN spread
    if not normalize:
        with pytest.warns(vc.io.NiftiWarning, match="non-finite"):
            out = vc.io.filter_nifti(src, tmp_path / "p.nii", box, mode="constant", nan="propagate")
        ref = vc.correlate(x, box, mode="constant")
        np.testing.assert_array_equal(np.isnan(out.data), np.isnan(ref))
        np.testing.assert_allclose(out.data, ref, rtol=0, atol=1e-5, equal_nan=True)
    with pytest.raises(ValueError, match="nan must be"):
        vc.io.filter_nifti(src, tmp_path / "bad.nii", box, nan="ignore")


@pytest.mark.parametrize("nan", ["zero", "mask", "propagate"])
def test_nan_option_in_slabs_equals_whole(tmp_path, monkeypatch, nan):
    x, brain = stat_map(2, shape=(9, 10, 23))
    src = write(tmp_path / "stat.nii.gz", x)
    kw = dict(mask=brain, normalize=True, nan=nan, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vc.io.NiftiWarning)
        whole = vc.io.filter_nifti(src, tmp_path / "w.nii", vc.kernels.gaussian(1.0), **kw)
        forced_slabs(monkeypatch, 4)
        sliced = vc.io.filter_nifti(src, tmp_path / "s.nii", vc.kernels.gaussian(1.0), max_memory=1, **kw)
    np.testing.assert_array_equal(np.asarray(sliced.data), whole.data)


def test_cli_nan_option(tmp_path):
    x, brain = stat_map(3)
    src = write(tmp_path / "stat.nii.gz", x)
    write(tmp_path / "brain.nii.gz", brain.astype(np.uint8))
    assert cli.main(["filter", str(src), str(tmp_path / "o.nii.gz"), "--box", "3vox", "--mode", "constant",
                     "--nan", "zero", "-q"]) == 0
    ref = ndi.correlate(np.nan_to_num(x, nan=0.0), vc.kernels.box(3).to_dense().astype(np.float32), mode="constant")
    np.testing.assert_allclose(vc.io.load(tmp_path / "o.nii.gz").data, ref, rtol=0, atol=1e-5)
    os.mkdir(tmp_path / "in")
    os.replace(src, tmp_path / "in" / "stat.nii.gz")
    assert cli.main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--box", "3vox", "--nan", "mask",
                     "--mask", str(tmp_path / "brain.nii.gz"), "--normalize", "-q"]) == 0
    assert np.isfinite(vc.io.load(tmp_path / "out" / "stat.nii.gz").data[brain]).all()
    # --nan mask makes a mask of its own: --outside applies to it
    assert cli.main(["filter", str(tmp_path / "in" / "stat.nii.gz"), str(tmp_path / "z.nii"), "--box", "3vox",
                     "--nan", "mask", "--outside", "zero", "--normalize", "-q"]) == 0
    out = vc.io.load(tmp_path / "z.nii").data
    assert np.isfinite(out).all() and (out[~brain] == 0).all()


# ---------------------------------------------------------------------- item 6: what was written comes back


@pytest.mark.parametrize("slabbed", [False, True])
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_integer_output_returns_what_was_written(tmp_path, monkeypatch, slabbed, ext):
    x = (np.random.default_rng(4).random((12, 11, 10)) * 70000).astype(np.float32)
    src = write(tmp_path / "in.nii", x)
    if slabbed:
        forced_slabs(monkeypatch, 3)
    with pytest.warns(vc.io.NiftiWarning, match="clipped"):
        out = vc.io.filter_nifti(src, tmp_path / f"o{ext}", vc.kernels.box(3), dtype="int16",
                                 max_memory=1 if slabbed else None)
    written = np.asarray(nib.load(tmp_path / f"o{ext}").dataobj)
    assert out.data.dtype == np.int16 and written.dtype == np.int16
    np.testing.assert_array_equal(np.asarray(out.data), written)


# ------------------------------------------------------------------------------- item 12: the memory promise


def big_volume(path, shape, seed=5, dtype=np.float32):
    """A plain float NIfTI written plane by plane (this process never holds it)."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4))
    img.header.set_data_shape(shape)
    img.header.set_xyzt_units("mm", "sec")
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        img.header.write_to(f)
        f.write(bytes(int(img.header.get_data_offset()) - f.tell()))
        for _ in range(shape[2]):
            f.write(rng.random(shape[:2], dtype=np.float32).astype(dtype).tobytes(order="F"))
    return path


def peak_growth(args, imports=""):
    """Peak RSS growth (bytes) of `volconv ARGS` in a fresh process, beyond its resident memory once imported.
    Linux's peak (VmHWM) is reset after the imports (clear_refs 5): their own transient peak would hide the
    filter's. `imports`: further modules the run imports (matplotlib for a preview), imported before."""
    script = textwrap.dedent(f"""
        import volconv.cli, volconv.io, volconv.ops.filtering, volconv.ops.dynamic, nibabel, numpy, gzip{imports}

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rc = volconv.cli.main({args!r})
        print(status("VmHWM") - base, rc)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    grown, rc = run.stdout.split()[-2:]
    assert rc == "0", run.stderr[-3000:]
    return int(grown)


SHAPE = (128, 128, 768)   # 48 MiB of float32 in 64 KiB planes; the budget is 8 MiB
BUDGET = 8 * 2**20
# The promise: the budget plus one output slab; slack for the allocator, thread stacks and nibabel's buffers.
SLACK = 12 * 2**20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    big_volume(d / "big.nii", SHAPE)
    mask = (np.random.default_rng(6).random(SHAPE) > 0.3).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), d / "mask.nii.gz")
    return d


@pytest.mark.parametrize("option", ["gz", "odt", "mask", "sigma-map", "gz-preview"])
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak RSS reset")
def test_peak_memory_for_every_option(big, tmp_path, option):
    src = str(big / "big.nii")
    out = str(tmp_path / ("o.nii.gz" if option.startswith("gz") else "o.nii"))
    # a sigma map's slab holds ~40 float32s per voxel: 32 MiB is what 8 MiB is to the others (a few planes)
    budget = 4 * BUDGET if option == "sigma-map" else BUDGET
    args = ["filter", src, out, "--max-memory", str(budget), "--workers", "2", "-q"]
    if option == "sigma-map":
        sigma = big_volume(tmp_path / "sigma.nii", SHAPE, seed=7)   # sigma 0..1 voxel: a small halo
        args += ["--sigma-map", str(sigma), "--truncate", "2"]
    else:
        args += ["--gaussian", "1vox"]
    if option == "odt":
        args += ["--odt", "int16"]
    if option == "mask":
        args += ["--mask", str(big / "mask.nii.gz"), "--normalize"]
    imports = ""
    if option == "gz-preview":   # the mid-slices of input and output, never either volume
        args += ["--preview", str(tmp_path / "p.png")]
        imports = ", matplotlib.figure, matplotlib.backends.backend_agg, nibabel.orientations"
    grown = peak_growth(args, imports)
    slab = budget // _slabs.copies(False)   # the thickest output slab this budget allows
    output = 4 * int(np.prod(SHAPE))
    figure = 16 * 2**20 if imports else 0   # matplotlib's figure and renderer: fixed, whatever the volume's size
    assert grown < budget + slab + SLACK + figure, (f"{option}: peak RSS grew by {grown / 2**20:.0f} MiB for a "
                                           f"{output / 2**20:.0f} MiB output at a {budget / 2**20:.0f} MiB budget")


def test_a_corrupt_gzipped_mask_read_in_slabs_leaves_nothing(tmp_path, monkeypatch):
    x = np.random.default_rng(12).random((10, 10, 30)).astype(np.float32)
    src = write(tmp_path / "in.nii", x)
    mask = write(tmp_path / "mask.nii.gz", (x > 0.5).astype(np.uint8))
    raw = bytearray(mask.read_bytes())
    raw[-6] ^= 0xFF   # the CRC: noticed only at the end of the stream, after every slab was written
    mask.write_bytes(bytes(raw))
    forced_slabs(monkeypatch, 4)
    with pytest.raises(vc.io.NiftiError, match="corrupt or truncated gzip"):
        vc.io.filter_nifti(src, tmp_path / "out.nii", vc.kernels.box(3), mask=mask, max_memory=1)
    assert sorted(os.listdir(tmp_path)) == ["in.nii", "mask.nii.gz"]


def test_gzip_writer_keeps_few_blocks_in_flight():
    import io

    raw = io.BytesIO()
    limit = 4 * _gzip.BLOCK
    w = _gzip.ParallelGzipWriter(raw, threads=8, max_in_flight=limit)
    rng = np.random.default_rng(0)
    for _ in range(24):
        w.write(rng.integers(0, 4, _gzip.BLOCK, dtype=np.uint8).tobytes())
        assert len(w.tasks) * 2 * _gzip.BLOCK <= limit   # a block and its deflated form, per task
    w.close()
    import gzip
    assert len(gzip.decompress(raw.getvalue())) == 24 * _gzip.BLOCK


@pytest.mark.parametrize("mode", MODES)
def test_sigma_map_in_slabs_equals_adaptive_filter(tmp_path, monkeypatch, mode):
    rng = np.random.default_rng(8)
    x = rng.random((9, 8, 21)).astype(np.float32)
    sigma = (rng.random(x.shape) * 2.0).astype(np.float32)
    src, smap = write(tmp_path / "x.nii.gz", x), write(tmp_path / "s.nii", sigma)
    zooms = vc.io.load(src).zooms
    ref = adaptive_filter(x, sigma, zooms, 2.5, mode=mode, cval=0.5)
    forced_slabs(monkeypatch, 4)
    out = vc.io.adaptive_filter_nifti(src, tmp_path / "o.nii", smap, truncate=2.5, mode=mode, cval=0.5,
                                      max_memory=1)
    np.testing.assert_allclose(np.asarray(out.data), ref, rtol=0, atol=1e-6)   # float32 weights, sums of <= 21
    assert cli.main(["filter", str(src), str(tmp_path / "c.nii.gz"), "--sigma-map", str(smap), "--truncate", "2.5",
                     "--mode", mode, "--cval", "0.5", "-q"]) == 0
    np.testing.assert_allclose(vc.io.load(tmp_path / "c.nii.gz").data, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alias, mode", [("grid-constant", "constant"), ("grid-wrap", "wrap"),
                                         ("grid-mirror", "reflect")])
def test_mode_aliases_filter_nifti_files_as_their_names(tmp_path, monkeypatch, alias, mode):
    """scipy's grid-* aliases are their modes in the slab filters too (grid-constant once read the planes
    before the volume, the file's header bytes, as its halo)."""
    rng = np.random.default_rng(9)
    x = rng.random((9, 8, 21)).astype(np.float32) + 5
    sigma = (rng.random(x.shape) * 2.0).astype(np.float32)
    src, smap = write(tmp_path / "x.nii", x), write(tmp_path / "s.nii", sigma)
    forced_slabs(monkeypatch, 4)
    out = vc.io.filter_nifti(src, tmp_path / "f.nii", vc.kernels.box(3), mode=alias, cval=0.5, max_memory=1)
    np.testing.assert_allclose(np.asarray(out.data), ndi.correlate(x, np.full((3, 3, 3), 1 / 27, np.float32),
                                                                   mode=mode, cval=0.5), rtol=0, atol=1e-5)
    out = vc.io.adaptive_filter_nifti(src, tmp_path / "a.nii", smap, mode=alias, cval=0.5, max_memory=1)
    ref = adaptive_filter(x, sigma, vc.io.load(src).zooms, mode=mode, cval=0.5)
    np.testing.assert_allclose(np.asarray(out.data), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ item 13: thin volumes


@pytest.mark.parametrize("shape,kernel", [((64, 64, 1), vc.kernels.gaussian(2.0)),
                                          ((17, 21, 3), vc.kernels.box(5)),
                                          ((8, 8, 8), vc.kernels.box(13))], ids=["slice", "functional", "patch"])
@pytest.mark.parametrize("mode", MODES)
def test_volumes_thinner_than_the_kernel(tmp_path, monkeypatch, shape, kernel, mode):
    x = np.random.default_rng(9).random(shape).astype(np.float32)
    src = write(tmp_path / "thin.nii.gz", x)
    ref = ndi.correlate(x, kernel.to_dense().astype(np.float32), mode=mode, cval=0.25)
    out = vc.io.filter_nifti(src, tmp_path / "o.nii", kernel, mode=mode, cval=0.25)
    np.testing.assert_allclose(out.data, ref, rtol=0, atol=1e-5)   # float32 sums of up to 13^3 terms in [0, 1)
    forced_slabs(monkeypatch, 1)
    sliced = vc.io.filter_nifti(src, tmp_path / "s.nii", kernel, mode=mode, cval=0.25, max_memory=1)
    np.testing.assert_allclose(np.asarray(sliced.data), ref, rtol=0, atol=1e-5)


def test_thin_volume_through_the_command(tmp_path):
    x = np.random.default_rng(10).random((64, 64, 1)).astype(np.float32)
    os.mkdir(tmp_path / "in")
    src = write(tmp_path / "in" / "slice.nii.gz", x, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    assert cli.main(["filter", str(src), str(tmp_path / "o.nii.gz"), "--gaussian", "4mm", "-q"]) == 0
    assert cli.main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--gaussian", "4mm", "-q"]) == 0
    ref = ndi.gaussian_filter(x, 2.0)
    for path in (tmp_path / "o.nii.gz", tmp_path / "out" / "slice.nii.gz"):
        np.testing.assert_allclose(vc.io.load(path).data, ref, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------- item 16: max_memory units


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4096), st.sampled_from([("", 1), ("B", 1), ("K", 2**10), ("KiB", 2**10), ("kB", 10**3),
                                              ("M", 2**20), ("MiB", 2**20), ("MB", 10**6), ("G", 2**30),
                                              ("GiB", 2**30), ("GB", 10**9), ("T", 2**40), ("TiB", 2**40)]),
       st.sampled_from(["", " "]))
def test_memory_sizes_with_units(n, unit, space):
    suffix, factor = unit
    assert _slabs.memory_bytes(f"{n}{space if suffix else ''}{suffix}") == n * factor
    assert _slabs.memory_bytes(n * factor) == n * factor


def test_max_memory_accepts_units_and_names_itself(tmp_path):
    x = np.random.default_rng(11).random((8, 9, 10)).astype(np.float32)
    src = write(tmp_path / "x.nii", x)
    ref = vc.io.filter_nifti(src, tmp_path / "a.nii", vc.kernels.box(3)).data
    for size in ("1GB", "512MiB", "2G", "1.5 GiB", 10**9, "100"):
        out = vc.io.filter_nifti(src, tmp_path / "b.nii", vc.kernels.box(3), max_memory=size, overwrite=True)
        np.testing.assert_array_equal(np.asarray(out.data), ref)
    for bad in ("abc", "1XB", -1, 0, "nan", "inf GB", True, 2.5, "", [1]):
        with pytest.raises((ValueError, TypeError), match="max_memory"):
            vc.io.filter_nifti(src, tmp_path / "c.nii", vc.kernels.box(3), max_memory=bad)
    assert cli.main(["filter", str(src), str(tmp_path / "d.nii"), "--box", "3vox", "--max-memory", "2MiB",
                     "-q"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["filter", str(src), str(tmp_path / "e.nii"), "--box", "3vox", "--max-memory", "lots"])
    assert e.value.code == 2
