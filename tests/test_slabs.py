"""vc.io.filter_nifti in slabs (volconv/io/slabs.py): a volume filtered slab by slab, each with the kernel's halo,
must give the bits of the whole volume filtered at once, for every boundary mode (wrap reads its halo from the
other end), masks and normalisation, 3-D and 4-D, plain and gzipped, scaled integer files; and its memory must
not grow with the volume."""
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

import volconv as vc
from volconv.io import slabs as _slabs

MODES = ["reflect", "constant", "nearest", "mirror", "wrap"]


def write(path, data, scale=None):
    img = nib.Nifti1Image(data, np.diag([1.0, 1.2, 0.9, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    if scale is not None:
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(*scale)
    nib.save(img, path)
    return path


def whole_and_slabs(src, tmp_path, kernel, planes, monkeypatch, **kw):
    """The file filtered whole, and in slabs of `planes` output planes (forced: max_memory=1 asks for slabs,
    the patched thickness sets them, thinner than the default rule would)."""
    whole = vc.io.filter_nifti(src, tmp_path / "whole.nii", kernel, overwrite=True, **kw)
    with monkeypatch.context() as m:
        m.setattr(_slabs, "thickness", lambda *args: planes)
        sliced = vc.io.filter_nifti(src, tmp_path / "slabs.nii.gz", kernel, max_memory=1, overwrite=True, **kw)
    return whole.data, np.asarray(sliced.data)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", [vc.kernels.gaussian(1.0), vc.kernels.box((3, 2, 4)), vc.kernels.log(1.0),
                                    np.random.default_rng(0).random((3, 4, 5))],
                         ids=["gaussian", "box-even", "log-rank3", "dense-even"])
def test_slabs_equal_the_whole_volume(tmp_path, monkeypatch, mode, kernel):
    data = np.random.default_rng(1).random((13, 11, 17)).astype(np.float32)
    src = write(tmp_path / "in.nii", data)
    for planes in (1, 3, 7):   # thinner and thicker than the kernel's reach (4 planes for the Gaussian)
        whole, sliced = whole_and_slabs(src, tmp_path, kernel, planes, monkeypatch, mode=mode, cval=0.25)
        assert np.array_equal(whole, sliced), f"{planes} planes per slab"


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("outside", ["keep", "zero"])
def test_slabs_with_mask_and_normalise(tmp_path, monkeypatch, normalize, outside):
    rng = np.random.default_rng(2)
    data = rng.random((12, 10, 15)).astype(np.float32)
    mask = rng.random((12, 10, 15)) > 0.3
    src = write(tmp_path / "in.nii.gz", data)
    whole, sliced = whole_and_slabs(src, tmp_path, vc.kernels.gaussian(1.0), 4, monkeypatch, mask=mask, normalize=normalize,
                                    outside=outside, mode="wrap")
    assert np.array_equal(whole, sliced)


def test_slabs_4d_scaled_int16_gzipped(tmp_path, monkeypatch):
    data = np.random.default_rng(3).integers(-300, 300, (10, 9, 14, 3)).astype(np.int16)
    src = write(tmp_path / "in.nii.gz", data, scale=(0.5, 10.0))
    seen = []
    whole, sliced = whole_and_slabs(src, tmp_path, vc.kernels.gaussian(1.0), 4, monkeypatch, mode="nearest",
                                    progress=lambda done, total: seen.append((done, total)))
    assert np.array_equal(whole, sliced) and whole.shape == data.shape
    first = seen.index((42, 42)) + 1   # the whole volumes (3 steps), then the slabs (more), each increasing
    assert seen[:first] == [(14, 42), (28, 42), (42, 42)] and seen[-1] == (42, 42) and len(seen) - first > 3
    assert all(a[0] < b[0] for a, b in zip(seen[first:], seen[first + 1:]))


def test_plan_covers_every_plane_once():
    from volconv._validate import pad_index

    for n, slab, reach in [(10, 3, (2, 1)), (7, 7, (3, 3)), (5, 1, (0, 0)), (9, 4, (4, 4))]:
        for mode in (None, "reflect", "mirror", "nearest", "wrap"):
            outputs = []
            for k0, k1, planes, halo in _slabs.plan(n, slab, reach, mode):
                outputs.extend(range(k0, k1))
                assert planes.size == (k1 - k0) + sum(halo) and ((planes >= 0) & (planes < n)).all()
                if mode is None:   # clipped at the ends: the filter pads there
                    assert halo[0] <= reach[0] and halo[1] <= reach[1]
                    assert list(planes) == list(range(k0 - halo[0], k1 + halo[1]))
                else:              # the whole volume's padding
                    assert halo == reach
                    assert list(planes) == list(pad_index(n, *reach, mode)[k0:k1 + sum(reach)])
            assert outputs == list(range(n))


def test_gather_reads_forward_and_copies_the_halo():
    volume = np.arange(4 * 3 * 10, dtype=np.float32).reshape((4, 3, 10), order="F")
    reads = []

    def read_into(view, a):
        reads.append((a, a + view.shape[2]))
        view[...] = volume[..., a:a + view.shape[2]]

    reader = _slabs.PlaneReader(read_into, (4, 3), np.float32)
    for planes in ([1, 0, 0, 1, 2, 3], [2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 9, 8], [8, 9, 0]):
        block = _slabs.gather(np.array(planes), reader)
        assert block.flags.f_contiguous and np.array_equal(block, volume[..., planes])
    assert reads == [(0, 4), (4, 8), (8, 10), (0, 1)]   # each plane once, then the far end for 'wrap'


def test_thickness_rule():
    shape = (1024, 1024, 512)   # the 2 GiB volume: 4 MiB planes, two copies -> 64 planes, 16 of them halo
    assert _slabs.thickness(shape, (8, 8), 4, 512 * 2**20, 2) == 48
    assert _slabs.thickness(shape, (8, 8), 4, 2**20, 2) == 1       # the budget first: thin slabs, more work
    assert _slabs.thickness((4, 4, 10), (0, 0), 4, 1, 5) == 1 and _slabs.thickness((4, 4, 10), (1, 1), 4, 2**30, 5) == 10


def test_slabs_refuse_a_corrupt_stream_and_leave_nothing(tmp_path, monkeypatch):
    data = np.random.default_rng(4).random((10, 10, 30)).astype(np.float32)
    src = write(tmp_path / "in.nii.gz", data)
    raw = bytearray(src.read_bytes())
    raw[-6] ^= 0xFF   # the CRC: noticed only at the end of the stream, after every slab was written
    src.write_bytes(bytes(raw))
    monkeypatch.setattr(_slabs, "thickness", lambda *args: 4)
    with pytest.raises(vc.io.NiftiError, match="corrupt or truncated gzip"):
        vc.io.filter_nifti(src, tmp_path / "out.nii.gz", vc.kernels.gaussian(1.0), max_memory=1)
    assert sorted(os.listdir(tmp_path)) == ["in.nii.gz"]


def test_memory_does_not_grow_with_the_volume(tmp_path):
    """A 64 MiB volume filtered with 8 MiB of working memory: the process's peak resident memory grows by far
    less than the output's size (in a fresh process, so that the peak is this filter's)."""
    shape = (256, 256, 256)
    src = tmp_path / "big.nii"
    img = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.eye(4))
    img.header.set_data_shape(shape)
    img.header.set_xyzt_units("mm", "sec")
    with open(src, "wb") as f:   # written plane by plane: this process never holds it either
        img.header.write_to(f)
        f.write(bytes(int(img.header.get_data_offset()) - f.tell()))
        rng = np.random.default_rng(5)
        for _ in range(shape[2]):
            f.write(rng.random(shape[:2], dtype=np.float32).tobytes(order="F"))
    script = textwrap.dedent(f"""
        import resource, volconv as vc
        kernel = vc.kernels.gaussian(2.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        vc.io.filter_nifti({str(src)!r}, {str(tmp_path / 'out.nii')!r}, kernel, max_memory=8 * 2**20,
                           return_volume=False, workers=2)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    grown = int(run.stdout.split()[-1])
    output = 4 * np.prod(shape)
    assert grown < output / 4, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {output / 2**20:.0f} MiB output"
    ref = vc.correlate(np.asarray(nib.load(src).dataobj), vc.kernels.gaussian(2.0))
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out.nii").dataobj), ref)
