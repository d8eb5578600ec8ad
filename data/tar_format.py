"""Fast reading and writing of the plain tar files every cirlab shard is.

Python's `tarfile` costs ~0.15 ms a member in pure-Python header handling, on both sides: half a
millisecond a sample of three members, more than decoding its 64-pixel JPEG, all of the reading
cost of the tasks that train from cached features, and a third of writing the synthetic world.

Reading (`iter_tar_members`): the 512-byte headers are parsed here (name, prefix, size, type,
checksum), the extended headers a tar writer may emit are handled (POSIX pax `x`/`g` records for
long names or sizes, GNU `L` long names), what is not a regular file is skipped, and (name, bytes)
come in file order: the members `webdataset.tariterators.tar_file_iterator` yields, with its default
metadata filter. A compressed stream (gzip, bz2, xz) goes through `tarfile`. A bad or cut first
header and cut member data raise `tarfile.ReadError`; a bad or cut later header ends the archive —
both as `tarfile` does.

Writing (`ShardTarWriter`): the bytes `webdataset.TarWriter(path, mtime=...)` writes (ustar
headers, user and group "bigdata", mode 0444, end blocks and padding to tarfile's 10240-byte
records), with the headers formatted here; a name that ustar cannot hold (over 100 bytes, not
ASCII) gets its header from `tarfile`, as before.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import BinaryIO, Iterator

_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
# webdataset's default: metadata members ("__index__", "__x__/...") are not sample members
_SKIP_META = re.compile(r"__[^/]*__($|/)")


class _Prepended(io.RawIOBase):
    """A stream whose first bytes were already read (to sniff the format), put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _number(field: bytes) -> int:
    """A header number: octal ASCII, or GNU base-256 (first byte 0x80/0xff) for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    digits = field.rstrip(b" \x00").lstrip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid header: number field {field!r}") from None


def _name(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise tarfile.ReadError("invalid pax header")
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _checksum_ok(header: bytes) -> bool:
    """The header checksum, computed as tarfile does (unsigned bytes, or signed as old tars did)."""
    try:
        stored = _number(header[148:156])
    except tarfile.ReadError:
        return False
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])


def _is_metadata(name: str) -> bool:
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_SKIP_META.match(name))


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(member name, content) of every regular file of the tar `stream`, in order."""
    head = stream.read(_BLOCK)
    if head.startswith(_COMPRESSED_MAGIC):  # not a plain tar: tarfile decompresses it
        for name, data in _tarfile_members(_Prepended(head, stream)):
            yield name, data
        return
    pending: dict[str, str] = {}  # pax / GNU overrides for the next member
    global_pax: dict[str, str] = {}
    header, first = head, True
    while True:
        # as tarfile: a bad or cut first header is an error; a bad or cut later one ends the archive
        if first and len(header) < _BLOCK:
            raise tarfile.ReadError("empty file" if not header else "truncated header")
        if len(header) < _BLOCK or header.count(0) == _BLOCK:  # cut, or the end-of-archive block
            return
        if not _checksum_ok(header):
            if first:
                raise tarfile.ReadError("invalid header: bad checksum")
            return
        first = False
        kind = header[156:157]
        size = _number(header[124:136])
        name = _name(header[:100])
        if header[257:262] == b"ustar" and header[345:346] != b"\x00":
            name = _name(header[345:500]) + "/" + name
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"x", b"g"):  # pax extended header: applies to the next member (or all)
            records = _pax_records(_read_exact(stream, padded)[:size])
            (pending if kind == b"x" else global_pax).update(records)
        elif kind in (b"L", b"K"):  # GNU long name / link name of the next member
            data = _read_exact(stream, padded)[:size]
            if kind == b"L":
                pending["path"] = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        else:
            meta = {**global_pax, **pending}
            pending = {}
            name = meta.get("path", name)
            if "size" in meta:
                size = int(meta["size"])
                padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if kind in (b"0", b"\x00", b"7"):  # regular file (7: contiguous, read as regular)
                data = _read_exact(stream, padded)[:size] if size else b""
                if not _is_metadata(name):
                    yield name, data
            elif padded:  # directories, links, devices: nothing a sample holds
                _read_exact(stream, padded)
        header = stream.read(_BLOCK)


def _tarfile_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if info.isreg() and not _is_metadata(info.name):
            fileobj = tar.extractfile(info)
            yield info.name, fileobj.read() if fileobj is not None else b""
        tar.members = []  # stream mode: do not keep every TarInfo of a large shard


# ----------------------------------------------------------------------------- writing
_RECORD = 20 * _BLOCK  # tarfile pads an archive to whole records


def _octal(value: int, width: int) -> bytes:
    """A ustar number field as tarfile writes it: zero-padded octal digits, then NUL."""
    return b"%0*o\x00" % (width - 1, value)


class ShardTarWriter:
    """Writes samples ({"__key__": key, ext: bytes | str, ...}) as members `key.ext`, sorted by ext."""

    def __init__(self, path: str, mtime: int = 0, user: str = "bigdata", group: str = "bigdata",
                 mode: int = 0o444) -> None:
        self._file = open(path, "wb")
        self._written = 0
        self._fixed = (_octal(mode, 8) + _octal(0, 8) + _octal(0, 8), _octal(int(mtime), 12),
                       user.encode().ljust(32, b"\x00") + group.encode().ljust(32, b"\x00")
                       + b"\x00" * 16)  # device numbers: empty for a regular file, as tarfile
        self._mtime = mtime
        self._meta = (user, group, mode)

    def write(self, sample: dict) -> int:
        """Write one sample; returns its payload bytes. Keys starting with "_" are not members."""
        if "__key__" not in sample:
            raise ValueError("object must contain a __key__")
        key = sample["__key__"]
        total = 0
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{ext} doesn't map to bytes ({type(data).__name__})")
            self._member(f"{key}.{ext}", bytes(data))
            total += len(data)
        return total

    def _member(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) < 100 and name.isascii():
            modes, mtime, owners = self._fixed
            head = (raw.ljust(100, b"\x00") + modes + _octal(len(data), 12) + mtime + b"        " + b"0"
                    + b"\x00" * 100 + b"ustar\x0000" + owners + b"\x00" * 155)
            head = head.ljust(_BLOCK, b"\x00")
            check = b"%06o\x00 " % (sum(head),)  # checksum counted with its own field as spaces
            head = head[:148] + check + head[156:]
        else:  # long or non-ASCII name: tarfile's pax header
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), self._mtime
            info.uname, info.gname, info.mode = self._meta
            head = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        pad = -len(data) % _BLOCK
        self._file.write(head)
        self._file.write(data)
        if pad:
            self._file.write(b"\x00" * pad)
        self._written += len(head) + len(data) + pad

    def close(self) -> None:
        if self._file.closed:
            return
        end = 2 * _BLOCK
        self._written += end
        self._file.write(b"\x00" * (end + (-self._written % _RECORD)))
        self._file.close()

    def __enter__(self) -> "ShardTarWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
