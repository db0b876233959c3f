"""volconv.io.parallel_gzip.ParallelGzipWriter: the blocks compressed on several threads form one ordinary gzip stream,
byte-identical whatever the thread count, read back exactly by Python's gzip, zlib and nibabel."""
import gzip
import io
import zlib

import numpy as np
import pytest

from volconv.io import parallel_gzip as _gzip
from volconv.io.parallel_gzip import ParallelGzipWriter


def write(chunks, threads, name="x.nii", level=1):
    raw = io.BytesIO()
    with ParallelGzipWriter(raw, name=name, threads=threads, level=level) as w:
        for c in chunks:
            if isinstance(c, int):   # a forward seek of c bytes
                w.seek(c, 1)
            else:
                w.write(c)
    return raw.getvalue()


@pytest.mark.parametrize("level", [1, 6])
@pytest.mark.parametrize("size", [0, 1, 1000, _gzip.BLOCK - 1, _gzip.BLOCK, _gzip.BLOCK + 5, 3 * _gzip.BLOCK + 77])
def test_round_trip_any_size_and_thread_count(size, level):
    rng = np.random.default_rng(size)
    data = rng.integers(0, 5, size, dtype=np.uint8).tobytes()   # compressible, but not trivially
    parts = [data[: size // 3], 10, data[size // 3:]]
    expected = data[: size // 3] + bytes(10) + data[size // 3:]
    outputs = [write(parts, t, level=level) for t in (1, 2, 3)]
    assert outputs[0] == outputs[1] == outputs[2]
    assert gzip.decompress(outputs[0]) == expected
    d = zlib.decompressobj(31)   # one member: nothing is left over after the first stream
    assert d.decompress(outputs[0]) == expected and d.eof and d.unused_data == b""
    assert outputs[0][3] & 0x08 and b"x.nii\0" in outputs[0][:20]   # FNAME flag and the final file's name


def test_blocks_share_the_window():
    """Each block inherits the previous block's last 32 KiB: a repeat across a block boundary still
    compresses (a writer without the dictionary would store the second copy again). Level 6: level 1's
    run-length strategy looks for runs only."""
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    filler = bytes(_gzip.BLOCK - len(motif))
    with_dict = write([filler + motif + motif], threads=2, level=6)   # the second copy starts block 2
    assert len(with_dict) < len(motif) * 1.3


def test_backward_seek_and_tell():
    raw = io.BytesIO()
    w = ParallelGzipWriter(raw, threads=2)
    w.write(b"abc")
    assert w.tell() == 3
    with pytest.raises(OSError, match="forward"):
        w.seek(1)
    w.close()
    assert gzip.decompress(raw.getvalue()) == b"abc"


def test_error_inside_the_block_drops_the_work():
    raw = io.BytesIO()
    with pytest.raises(RuntimeError):
        with ParallelGzipWriter(raw, threads=2) as w:
            w.write(bytes(3 * _gzip.BLOCK))
            raise RuntimeError("boom")
    assert w.closed


def test_nifti_written_in_parallel_loads_with_nibabel(tmp_path):
    import nibabel as nib

    import volconv as vc

    data = np.random.default_rng(1).random((40, 50, 60), dtype=np.float32)
    vc.io.save(vc.Volume(data, np.eye(4)), tmp_path / "a.nii.gz", workers=2)
    vc.io.save(vc.Volume(data, np.eye(4)), tmp_path / "b.nii.gz", workers=1)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj), data)
    a, b = (tmp_path / "a.nii.gz").read_bytes(), (tmp_path / "b.nii.gz").read_bytes()
    assert a[20:] == b[20:]   # the same stream after the header's file name
