"""volconv.dask: vc.dask.filter block by block against vc.correlate / vc.convolve on the whole volume, and
vc.dask.filter_files / `volconv batch --scheduler` on a local dask.distributed cluster against the
single-machine results.

Tolerance of `filter`: every kept voxel is the sum of the same products as in the whole-volume call (the
overlap gives each block its real neighbours; only the true edges are filled by volconv's mode). The two
results differ only in how that sum is rounded: the vector/scalar split of a row and the FMA contraction
depend on where a row starts in its block, and "auto" may pick another algorithm for a block. Each result
is within a few roundings of its partial sums, each at most eps * sum|k| * (max|x| + |cval|), of the exact
value; we allow 4 of these units per pass over the volume (one pass for a dense kernel, three per rank-1
term of a separable one, each rounded to the dtype before the next). Measured: at most 0.7 unit for the dense
kernels here, 3.0 units (of 12 allowed) for the 2 mm Gaussian on the 1 mm ICBM brain in 64^3 chunks.
"""
import sys

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

import volconv as vc  # noqa: E402
import volconv.dask as vd  # noqa: E402
from volconv.cli import main  # noqa: E402

MODES = ("reflect", "constant", "nearest", "mirror", "wrap")


def tolerance(x, kernel, cval=0.0):
    """4 * eps * passes * sum|k| * (max|x| + |cval|); for a separable kernel sum|k| is that of its 1-D
    passes: sum over terms of |weight| * the product of the factors' sums of magnitudes."""
    if isinstance(kernel, vc.SeparableKernel):
        passes = 3 * kernel.rank
        size = sum(abs(w) * np.prod([np.abs(f).sum() for f in fs]) for w, fs in kernel.terms())
    else:
        passes, size = 1, np.abs(np.asarray(kernel)).sum()
    scale = float(np.abs(x).max()) + abs(cval)
    return 4 * float(np.finfo(x.dtype).eps) * passes * float(size) * scale


def check(x, chunks, kernel, *, mode="reflect", cval=0.0, origin=0, convolve=False):
    """vc.dask.filter on x in these chunks == the whole-volume call, with the input's chunks and dtype."""
    lazy = vd.filter(da.from_array(x, chunks=chunks), kernel, mode=mode, cval=cval, origin=origin,
                     convolve=convolve)
    whole = (vc.convolve if convolve else vc.correlate)(x, kernel, mode=mode, cval=cval, origin=origin)
    assert isinstance(lazy, da.Array)
    assert lazy.chunks == da.from_array(x, chunks=chunks).chunks
    assert lazy.dtype == whole.dtype
    got = lazy.compute(scheduler="sync")
    assert got.dtype == whole.dtype
    np.testing.assert_allclose(got, whole, rtol=0, atol=tolerance(x, kernel, cval))


# kernel shape, origin, dtype: odd, even (every reach one-sided), shifted odd
CASES = {"odd": ((3, 5, 3), 0, np.float32),
         "even-origin": ((4, 2, 5), (-2, -1, 2), np.float64),
         "odd-origin": ((5, 3, 3), (1, -1, 0), np.float32)}


@pytest.mark.parametrize("convolve", [False, True], ids=["correlate", "convolve"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_whole_volume(mode, case, convolve, rng):
    shape, origin, dtype = CASES[case]
    x = rng.standard_normal((15, 13, 14)).astype(dtype)
    kernel = rng.standard_normal(shape)
    # 2 x 3 x 2 blocks of unequal sizes: every block has interior faces, several touch the true edges
    check(x, (8, 5, 7), kernel, mode=mode, cval=1.5, origin=origin, convolve=convolve)


@pytest.mark.parametrize("kernel, mode, cval, convolve, dtype", [
    (vc.kernels.gaussian((1.5, 0.8, 1.2)), "reflect", 0.0, False, np.float32),
    (vc.kernels.log(1.0), "constant", 2.0, False, np.float64),
    (vc.kernels.box((3, 2, 4)), "wrap", 0.0, True, np.float32),
    (vc.kernels.ball(2.0), "mirror", 0.0, False, np.float32),
], ids=["gaussian", "log-cval", "box-wrap-convolve", "ball"])
def test_kernel_objects(kernel, mode, cval, convolve, dtype, rng):
    x = rng.standard_normal((18, 16, 17)).astype(dtype)
    check(x, (9, 8, 9), kernel, mode=mode, cval=cval, convolve=convolve)


@pytest.mark.parametrize("mode", ["reflect", "wrap"])
def test_chunks_smaller_than_the_reach_are_merged_then_restored(mode, rng):
    """Gaussian sigma 1.5: reach 6 voxels. Axis 0 (chunks of 2) is merged into chunks of >= 6 for the
    computation; axis 2 (10 voxels, chunks of 1) becomes one chunk; the result has the input's chunks."""
    x = rng.standard_normal((20, 12, 10)).astype(np.float32)
    check(x, (2, 12, 1), vc.kernels.gaussian(1.5), mode=mode)


def test_lazy_with_volconvs_dtypes(rng):
    x = (rng.random((12, 10, 9)) * 1000).astype(np.int16)
    k = np.ones((3, 3, 3)) / 27
    lazy = vd.filter(da.from_array(x, chunks=6), k)
    assert lazy.dtype == np.float32  # as vc.correlate: small integers become float32
    np.testing.assert_allclose(lazy.compute(scheduler="sync"), vc.correlate(x, k), rtol=0,
                               atol=tolerance(x.astype(np.float32), k))
    # a numpy array is wrapped (dask's automatic chunks); workers is volconv's threads per block
    got = vd.filter(x.astype(np.float64), k, workers=2)
    assert isinstance(got, da.Array) and got.dtype == np.float64
    np.testing.assert_allclose(got.compute(scheduler="sync"), vc.correlate(x.astype(np.float64), k), rtol=0,
                               atol=tolerance(x.astype(np.float64), k))


def test_argument_errors():
    x = da.zeros((8, 8, 8), chunks=4, dtype=np.float32)
    with pytest.raises(ValueError, match="array must be 3-D"):
        vd.filter(da.zeros((8, 8), chunks=4), np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="kernel must be"):
        vd.filter(x, np.ones((3, 3)))
    with pytest.raises(ValueError, match="mode must be one of"):
        vd.filter(x, np.ones((3, 3, 3)), mode="edge")
    with pytest.raises(ValueError, match="origin"):
        vd.filter(x, np.ones((3, 3, 3)), origin=2)
    with pytest.raises(ValueError, match="workers must be"):
        vd.filter(x, np.ones((3, 3, 3)), workers=0)
    with pytest.raises(TypeError, match="scheduler must be"):
        vd.filter_files([], np.ones((1, 1, 1)), scheduler=3.5)


def test_without_dask_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "dask" or m.startswith("dask.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r"volconv\[dask\]"):
        vd.filter(np.zeros((4, 4, 4)), np.ones((3, 3, 3)))


# ------------------------------------------------------------------------------------ dask.distributed


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster):
    import distributed

    with distributed.Client(cluster, set_as_default=False) as c:
        yield c


AFFINE = np.diag([1.0, 2.0, 2.5, 1.0])


def scans(directory, n=2):
    """n small synthetic scans (float32, 1 x 2 x 2.5 mm) in directory; their paths. The third has no spatial
    unit in its header (volconv warns that it assumes mm)."""
    directory.mkdir(exist_ok=True)
    paths = []
    for i, shape in enumerate([(20, 16, 14), (18, 10, 12), (16, 12, 9)][:n]):
        img = nib.Nifti1Image((np.random.default_rng(i).random(shape) * 100).astype(np.float32), AFFINE)
        if i < 2:
            img.header.set_xyzt_units("mm", "sec")
        paths.append(directory / f"scan{i}.nii.gz")
        nib.save(img, str(paths[-1]))
    return paths


def fdata(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def smooth(zooms):
    return vc.kernels.gaussian(2.0, zooms)


def test_filter_files_on_a_cluster(tmp_path, client):
    sources = scans(tmp_path / "in")
    (tmp_path / "out").mkdir()
    pairs = [(src, tmp_path / "out" / src.name) for src in sources]
    done = vd.filter_files(pairs, smooth, scheduler=client, mode="nearest")
    assert done == [str(dst) for _, dst in pairs]
    for src, dst in pairs:
        vc.filter_nifti(src, tmp_path / f"ref-{src.name}", smooth, mode="nearest")
        np.testing.assert_array_equal(fdata(dst), fdata(tmp_path / f"ref-{src.name}"))
    # every file is tried; the first failure (in the order given) is raised, naming its file
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        vd.filter_files([(broken, tmp_path / "out" / "b.nii.gz")] + pairs, smooth, scheduler=client,
                        overwrite=True)
    with pytest.raises(FileExistsError) as info:
        vd.filter_files(pairs, smooth, scheduler=client)
    assert info.value.filename == str(pairs[0][1])


def test_filter_files_on_a_local_cluster_by_default(tmp_path):
    pytest.importorskip("distributed")
    [src] = scans(tmp_path, n=1)
    assert vd.filter_files([(src, tmp_path / "out.nii")], np.ones((3, 3, 3)) / 27) == [str(tmp_path / "out.nii")]
    np.testing.assert_array_equal(fdata(tmp_path / "out.nii"), vc.correlate(fdata(src), np.ones((3, 3, 3)) / 27))


def test_cli_batch_with_a_scheduler(tmp_path, cluster, capsys):
    sources = scans(tmp_path / "in", n=3)
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "in"), str(out), "--fwhm", "4mm", "--scheduler", cluster.scheduler_address])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "3 files filtered" in err and f"{sources[0]} -> {out / sources[0].name}: gaussian of FWHM 4 mm" in err
    # warnings come back from the workers, naming the file as given
    assert err.count("volconv: warning:") == 1
    assert f"volconv: warning: {sources[2]}: xyzt_units give no spatial unit" in err
    for src in sources:  # the same numbers as `volconv filter` in this process
        assert main(["filter", str(src), str(tmp_path / f"ref-{src.name}"), "--fwhm", "4mm", "--quiet"]) == 0
        np.testing.assert_array_equal(fdata(out / src.name), fdata(tmp_path / f"ref-{src.name}"))
    # the batch's own refusals and messages: outputs exist; then one broken file among good ones
    code = main(["batch", str(tmp_path / "in"), str(out), "--fwhm", "4mm", "--scheduler", cluster.scheduler_address])
    assert code == 1 and capsys.readouterr().err.startswith(f"volconv: error: {out / sources[0].name}: output "
                                                             f"file exists; use --force")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a scan")
    code = main(["batch", str(tmp_path / "in"), str(out), "--box", "3mm", "--force", "--quiet", "--scheduler",
                 cluster.scheduler_address])
    errors = capsys.readouterr().err.splitlines()
    assert code == 1
    assert errors[0].startswith(f"volconv: error: {tmp_path / 'in' / 'broken.nii.gz'}: not a NIfTI file")
    assert errors[1:] == [f"volconv: error: {tmp_path / 'in'}: 1 of 4 files failed: broken.nii.gz"]


def test_cli_batch_scheduler_errors(tmp_path, capsys):
    import dask

    scans(tmp_path / "in", n=1)
    code = main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--fwhm", "4mm", "--scheduler", "nohost"])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        "volconv: error: nohost: cannot connect to the dask scheduler: 'nohost' is not a scheduler address like "
        "tcp://host:8786 (missing port number in address 'nohost')"]
    with dask.config.set({"distributed.comm.timeouts.connect": "0.3s"}):
        code = main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--fwhm", "4mm", "--scheduler",
                     "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("volconv: error: tcp://127.0.0.1:9: cannot connect to the dask scheduler: ")
    assert not (tmp_path / "out" / "scan0.nii.gz").exists()
