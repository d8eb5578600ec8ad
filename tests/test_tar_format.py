"""data/tar_format.py: the same members as webdataset's tarfile-based iterator, on every tar layout."""

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from cirlab.data.tar_format import iter_tar_members


def _tar(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, bytes) for regular files, (name, tarfile type, linkname) otherwise."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            if len(entry) == 3:
                info.type, info.linkname = entry[1], entry[2]
                tf.addfile(info)
            else:
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def _webdataset(raw: bytes) -> list[tuple[str, bytes]]:
    return [(f["fname"], f["data"]) for f in tar_file_iterator(io.BytesIO(raw))]


ENTRIES = [
    ("0000000001.json", b'{"id": "a"}'), ("0000000001.txt", "a red circle".encode()),
    ("0000000001.jpg", bytes(range(256)) * 5),     # spans blocks, not a multiple of 512
    ("0000000002.json", b""),                       # empty member
    ("x" * 140 + ".txt", b"long name"),             # > 100 characters: pax path / GNU longname
    ("p" * 120 + "/" + "q" * 90 + ".txt", b"prefix"),
    ("caf\u00e9.txt", "non-ascii name".encode()),
    ("__meta__", b"skipped: webdataset metadata"), ("__index__/0.txt", b"skipped too"),
    ("folder", tarfile.DIRTYPE, ""), ("link", tarfile.SYMTYPE, "t" * 150),
    ("0000000003.json", b'{"id": "c"}'),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_webdataset(fmt):
    entries = ENTRIES if fmt != tarfile.USTAR_FORMAT else [e for e in ENTRIES if len(e[0]) < 100
                                                            and e[0].isascii() and len(e[-1]) < 100]
    raw = _tar(entries, fmt)
    got = list(iter_tar_members(io.BytesIO(raw)))
    assert got == _webdataset(raw)
    # written by hand: the regular files, in order, metadata skipped
    expected = [(e[0], e[1]) for e in entries if len(e) == 2 and not e[0].startswith("__")]
    assert got == expected


def test_gzip_shard_goes_through_tarfile():
    raw = gzip.compress(_tar(ENTRIES[:3]))
    assert list(iter_tar_members(io.BytesIO(raw))) == [(n, d) for n, d in ENTRIES[:3]]


def test_truncated_data_raises_like_tarfile():
    raw = _tar(ENTRIES[:3])
    cut = raw[:512 * 5 + 100]  # 2 x (header + 1 data block), the third header, 100 bytes of its data
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_members(io.BytesIO(cut)))
    with pytest.raises(tarfile.ReadError):
        _webdataset(cut)


def test_members_before_a_bad_later_header_are_kept_then_the_archive_ends():
    raw = bytearray(_tar(ENTRIES[:3]))
    raw[1024 + 10] ^= 0xFF  # a byte of the second header: its checksum no longer matches
    got = list(iter_tar_members(io.BytesIO(bytes(raw))))
    assert got == [ENTRIES[0]] == _webdataset(bytes(raw))


@pytest.mark.parametrize("raw", [b"", b"not a tar at all", b"\x01" * 512])
def test_not_a_tar_raises(raw):
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_members(io.BytesIO(raw)))
    with pytest.raises(tarfile.ReadError):
        _webdataset(raw)


def test_no_end_blocks_is_accepted():
    raw = _tar(ENTRIES[:2])
    body = raw[:512 * 4]  # two headers + two data blocks, no end-of-archive zeros
    assert list(iter_tar_members(io.BytesIO(body))) == list(ENTRIES[:2]) == _webdataset(body)


# ----------------------------------------------------------------------------- writing
def _samples():
    out = [{"__key__": f"{i:010d}", "json": b'{"id": %d}' % i, "txt": "a red circle", "jpg": bytes(range(256)) * i}
           for i in range(12)]   # sizes 0 .. 11 blocks: every padding case
    out += [{"__key__": "k" * 120, "txt": "a name over ustar's 100 bytes"}, {"__key__": "caf\u00e9", "txt": "x"},
            {"__key__": "s", "json": b"{}", "__url__": "not a member"}]
    return out


def test_writer_writes_webdataset_tarwriters_bytes(tmp_path):
    import webdataset as wds

    from cirlab.data.tar_format import ShardTarWriter

    ref = wds.TarWriter(str(tmp_path / "ref.tar"), mtime=0)
    for s in _samples():
        ref.write(s)
    ref.close()
    with ShardTarWriter(str(tmp_path / "ours.tar"), mtime=0) as w:
        for s in _samples():
            w.write(s)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    with open(tmp_path / "ours.tar", "rb") as f:
        names = [n for n, _ in iter_tar_members(f)]
    # each sample's members sorted by extension; "_"-keys are not members
    expected = [f"{i:010d}.{ext}" for i in range(12) for ext in ("jpg", "json", "txt")]
    assert names == expected + ["k" * 120 + ".txt", "caf\u00e9.txt", "s.json"]


def test_writer_refuses_a_sample_without_key_or_with_non_bytes(tmp_path):
    from cirlab.data.tar_format import ShardTarWriter

    with ShardTarWriter(str(tmp_path / "x.tar")) as w:
        with pytest.raises(ValueError, match="__key__"):
            w.write({"txt": "no key"})
        with pytest.raises(ValueError, match="cls"):
            w.write({"__key__": "a", "cls": 3})
