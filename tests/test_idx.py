"""The IDX parser: exact arrays from valid files, one clear error for broken ones."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from datapipe.errors import FormatError
from datapipe.formats.idx import encode_idx, parse_idx, read_idx


def test_parse_roundtrips_every_idx_type():
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
        parsed = parse_idx(encode_idx(array))
        assert parsed.dtype == np.dtype(dtype)
        assert parsed.dtype.isnative
        np.testing.assert_array_equal(parsed, array)


def test_big_endian_values_are_read_as_numbers():
    data = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (1).to_bytes(4, "big") + (258).to_bytes(4, "big")
    np.testing.assert_array_equal(parse_idx(data), [1, 258])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "too short"),
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "bad IDX magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "unknown IDX type code 0x42"),
        (bytes([0, 0, 8, 0]), "zero dimensions"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "trailing bytes"),
    ],
)
def test_malformed_idx_is_rejected_with_its_reason(data, message):
    with pytest.raises(FormatError, match=message):
        parse_idx(data, name="x.idx")


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    full = gzip.compress(encode_idx(np.zeros((10, 28, 28), np.uint8)))
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(FormatError, match="t10k-images-idx3-ubyte.gz.*gzip"):
        read_idx(path)


def test_gzipped_and_plain_files_read_the_same(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(encode_idx(array))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(encode_idx(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.gz"), array)


def test_real_mnist_test_images_match_torchvision_reader(real_mnist, tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for name, reader in (("t10k-images-idx3-ubyte", read_image_file),
                         ("t10k-labels-idx1-ubyte", read_label_file)):
        raw = tmp_path / name
        raw.write_bytes(gzip.decompress((real_mnist / f"{name}.gz").read_bytes()))
        ours = read_idx(real_mnist / f"{name}.gz")
        theirs = reader(str(raw)).numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


def test_a_header_declaring_gigabytes_is_refused_against_the_bytes_present():
    import tracemalloc

    header = bytes([0, 0, 0x0E, 3]) + np.array([65535, 65535, 65535], ">u4").tobytes()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"IDX file truncated: header says \(65535, 65535, "
                                              r"65535\) x 8 B = \d+ bytes of data, found 16"):
            parse_idx(header + b"\0" * 16, "evil")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_reading_a_gzipped_file_peaks_near_the_array_size(tmp_path):
    import tracemalloc

    array = np.random.default_rng(0).integers(0, 256, (2000, 64, 64), dtype=np.uint8)
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(encode_idx(array), compresslevel=1))
    tracemalloc.start()
    try:
        out = read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, array)
    assert peak <= 1.3 * array.nbytes + (2 << 20), peak  # the array plus a chunk


def test_a_header_claiming_more_than_gzip_can_hold_is_refused(tmp_path):
    # A few dozen bytes that claim 4 GiB of pixels: refused before anything is allocated.
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + (2**16).to_bytes(4, "big") * 2
                                   + bytes(16)))
    with pytest.raises(FormatError, match="more than the file can hold"):
        read_idx(path)
