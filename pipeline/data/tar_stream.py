"""The samples of one tar shard, read from a forward-only stream (a local file or an S3 body).

Why not ``tarfile`` (through webdataset's ``tar_file_iterator``): it parses every 512-byte
header in Python field by field (two checksums, a dozen string and number decodes) and wraps
every member in a new file object. Profiled on 32x32 PNG shards (issue 16) that was the largest
single cost of the streaming reader: about 52 us of its 110 us per sample, against 12 us here.
This reads the stream in 256 KiB chunks and takes from each header only what a shard needs.

What it reads: POSIX ustar and pax archives (what Python's ``tarfile`` and webdataset's
``TarWriter`` write), GNU long names, and gzip / bzip2 / xz compressed tars (as tarfile's
``r|*`` did). Members that are not regular files (directories, links) are skipped, as are
webdataset's ``__meta__`` files and names without an extension.

Members are grouped into samples exactly as webdataset's ``group_by_keys`` groups them: a
sample is the run of consecutive members with the same key (``dir/000123`` in
``dir/000123.png``), the extensions (lower case) are its fields.

A damaged tar is an error, never a quiet end: a bad header checksum, a header or member cut
short, or a stream that stops without the end-of-archive marker raise :class:`TarFormatError`
after the samples before the damage were yielded. So does hostile input, before it costs
memory: a member larger than ``max_member_bytes`` is refused from its header, before a byte of
it is read, and a compressed shard is decompressed in 256 KiB pieces and refused once its output
passes `MAX_DECOMPRESSION_RATIO` times the compressed bytes read (past the first
`RATIO_FREE_BYTES`): a gzip bomb stops there, not at the end of gigabytes. (``tarfile`` takes a bad header, or a cut
at a header boundary, for the end of the archive.) After the end-of-archive marker the rest of
the stream is read to its end, so that a wrapper around the stream sees every byte of the shard
(a checksum over the whole object, for instance).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
from collections.abc import Iterator
from typing import IO, Any
from zlib import adler32

__all__ = ["TarFormatError", "tar_members", "tar_samples"]

BLOCK = 512
# 256 KiB: glibc hands blocks this size back from its heap; 1 MiB ones came fresh from the kernel,
# page-faulted in (0.6 faults and 1.5 us a 32x32 sample, issue 23).
CHUNK = 1 << 18
_ZERO_BLOCK = bytes(BLOCK)
# Type flags, as the header's byte 156: regular file, old-style regular file, contiguous file;
# the extended headers that describe the member after them.
_REGULAR = (ord("0"), 0, ord("7"))
_PAX_HEADER, _PAX_GLOBAL_HEADER, _GNU_LONG_NAME, _GNU_LONG_LINK = ord("x"), ord("g"), ord("L"), ord("K")
_EXTENSIONS = (_PAX_HEADER, _PAX_GLOBAL_HEADER, _GNU_LONG_NAME, _GNU_LONG_LINK)
_COMPRESSED = ((b"\x1f\x8b", lambda stream: gzip.GzipFile(fileobj=stream, mode="rb")),
               (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))
# Real shards (images; small points with their tar headers and padding) stay far below this.
# bzip2 and xz bombs (millions to one) stop within megabytes; deflate tops out near 1030:1, so
# a gzip bomb stops after a few hundred MiB (its memory is bounded all along: 256 KiB pieces).
MAX_DECOMPRESSION_RATIO = 1000
RATIO_FREE_BYTES = 64 << 20
# webdataset's rules (tariterators.base_plus_ext and skip_meta): the key is the name up to the
# first dot of its last path component; names starting with a __meta__ component are skipped.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


class TarFormatError(ValueError):
    """The stream is not a well-formed tar, or it ends before the end-of-archive marker."""


class _Prefixed:
    """``prefix``, then the rest of ``raw``: a stream whose first bytes were read to look at them."""

    def __init__(self, prefix: bytes, raw: Any) -> None:
        self._prefix, self._raw = prefix, raw

    def read(self, size: int = -1) -> bytes:
        if not self._prefix:
            return self._raw.read(size)
        if size < 0:
            data, self._prefix = self._prefix + self._raw.read(), b""
        else:
            data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data


class _Counting:
    """Passes reads through and counts the bytes: what a decompressor has consumed."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        return data


class _CappedDecompression:
    """A decompressor's output, refused once it outgrows its input (see the module docstring)."""

    def __init__(self, decompressed: Any, compressed: _Counting) -> None:
        self._decompressed, self._compressed = decompressed, compressed
        self._produced = 0

    def read(self, size: int = -1) -> bytes:
        data = self._decompressed.read(CHUNK if size < 0 else min(size, CHUNK))
        self._produced += len(data)
        if self._produced > RATIO_FREE_BYTES and self._produced > MAX_DECOMPRESSION_RATIO * self._compressed.count:
            raise TarFormatError(f"the compressed shard expands more than {MAX_DECOMPRESSION_RATIO}-fold "
                                 f"({self._compressed.count:,} bytes into over {self._produced:,}): a decompression "
                                 "bomb, or not a shard")
        return data


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 for large values."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _usual_number(field: bytes, digits: int) -> int:
    """`_number`, faster where the field is `digits` octal digits and a NUL or a space (as
    nearly every writer has it): one int() of a slice."""
    if field[digits] in (0, 32):
        try:
            return int(field[:digits], 8)
        except ValueError:
            pass
    return _number(field)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _byte_sum(block: bytes) -> int:
    """The sum of the bytes of a block of at most 512, exactly, in two C calls: the low half of
    an Adler-32 is 1 + the byte sum modulo 65521, which 256 bytes (at most 65,280) never reach.
    Python's ``sum`` over 512 numbers was the largest single cost of reading a header."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces (some old
    writers summed signed bytes, which tarfile also accepts)."""
    field = header[148:156]
    try:
        stored = _usual_number(field, 6)  # tarfile and GNU tar: six octal digits, a NUL and a space
    except ValueError:
        return False
    if stored == _byte_sum(header) - sum(field) + 256:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
    return stored == signed


def _pax_records(payload: bytes) -> dict[str, str]:
    """The ``"LEN key=value\\n"`` records of a pax extended header."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload) and payload[position:position + 1] not in (b"", b"\0"):
        space = payload.index(b" ", position)
        length = int(payload[position:space])
        key, _, value = payload[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _uncompressed(raw: IO[bytes] | Any) -> tuple[bytes, Any]:
    """(the first bytes of the tar, a reader of the rest): the stream itself, or its
    decompression when it starts with the magic of gzip, bzip2 or xz."""
    first = b""
    while len(first) < 8:
        chunk = raw.read(CHUNK)
        if not chunk:
            break
        first += chunk
    for magic, opener in _COMPRESSED:
        if first.startswith(magic):
            compressed = _Counting(_Prefixed(first, raw))
            return b"", _CappedDecompression(opener(compressed), compressed)
    return first, raw


def _refilled(read: Any, buffer: bytes, start: int, need: int) -> bytes:
    """``buffer[start:]`` followed by what ``read`` gives, until it holds ``need`` bytes or the
    stream ends: one read (one system call, one HTTP read of an S3 body) per chunk."""
    parts = [buffer[start:]]
    have = len(parts[0])
    while have < need:
        chunk = read(max(CHUNK, need - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _drain(read: Any) -> None:
    while read(CHUNK):
        pass


def tar_members(raw: IO[bytes] | Any, max_member_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:
    """``(name, payload)`` of every regular file in the tar stream ``raw``, in order.

    Reads ``raw`` to its end; the caller opens and closes it. Raises TarFormatError on damage,
    and on a member (or extended header) over ``max_member_bytes`` before reading it. One loop
    over a buffer of whole chunks with the member's offsets in local variables: this runs once
    per member, three times per sample of a shard.
    """
    buffer, source = _uncompressed(raw)
    read = source.read
    start = 0  # where the next header starts in `buffer`
    base = 0  # the archive offset of buffer[0]
    global_pax: dict[str, str] = {}
    pending: dict[str, str] = {}  # pax / GNU long-name fields for the next member
    while True:
        if start + BLOCK > len(buffer):
            base += start
            buffer, start = _refilled(read, buffer, start, BLOCK), 0
        header = buffer[start:start + BLOCK]
        if header == _ZERO_BLOCK:
            _drain(read)
            return
        offset = base + start
        if len(header) < BLOCK:
            where = "where a member header should be" if not header else "inside a member header"
            raise TarFormatError(f"the tar ends at byte {offset + len(header)}, {where} "
                                 "(no end-of-archive marker): it is truncated")
        if not _checksum_ok(header):
            raise TarFormatError(f"bad header checksum at byte {offset}: the tar is damaged or not a tar")
        kind = header[156]
        size = _usual_number(header[124:136], 11)
        if pending and kind in _REGULAR and "size" in pending:
            size = int(pending["size"])
        if max_member_bytes is not None and size > max_member_bytes:
            raise TarFormatError(f"the member at byte {offset} ({_text(header[0:100])!r}) claims {size:,} bytes, "
                                 f"over the {max_member_bytes:,}-byte limit (data.max_member_bytes); not read: the "
                                 "shard is damaged or hostile")
        end = start + BLOCK + size
        padded_end = end + (-size % BLOCK)
        if padded_end > len(buffer):
            base += start
            buffer = _refilled(read, buffer, start, padded_end - start)
            end, padded_end, start = end - start, padded_end - start, 0
            if len(buffer) < end:
                raise TarFormatError(f"the tar ends inside the member at byte {offset} "
                                     f"({len(buffer) - BLOCK} of {size} bytes): it is truncated")
            if len(buffer) < padded_end:
                raise TarFormatError(f"the tar ends inside the padding of the member at byte {offset}: "
                                     "it is truncated")
        payload = buffer[start + BLOCK:end]
        start = padded_end

        if kind in _EXTENSIONS:
            if kind == _PAX_HEADER:
                pending.update(_pax_records(payload))
            elif kind == _PAX_GLOBAL_HEADER:
                global_pax.update(_pax_records(payload))
            elif kind == _GNU_LONG_NAME:
                pending["path"] = _text(payload)
            continue  # a GNU long link name: links carry no data
        fields = None
        if pending or global_pax:
            fields, pending = {**global_pax, **pending}, {}
        if kind not in _REGULAR:
            continue  # directories, links, devices: no sample data
        if fields and "path" in fields:
            name = fields["path"]
        else:
            name_end = header.find(b"\0", 0, 100)
            name = header[0:name_end if name_end >= 0 else 100].decode("utf-8", "surrogateescape")
            if header[345] != 0 and header[257:263] == b"ustar\0":  # POSIX: long names split in two
                name = _text(header[345:500]) + "/" + name
        if kind == 0 and name.endswith("/"):
            continue  # an old-style directory
        yield name, payload


def _key_and_extension(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name (``dir/000123.seg.png`` -> ``dir/000123``, ``seg.png``):
    string searches for the usual names, its regular expression for the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1:]
    match = _KEY_AND_EXTENSION.match(name)
    return None if match is None else (match.group(1), match.group(2))


def tar_samples(raw: IO[bytes] | Any, url: str, max_member_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as webdataset builds them: ``{"__key__": key, "__url__": url,
    ext: payload, ...}``; a repeated extension within one key raises ValueError."""
    sample: dict[str, Any] | None = None
    current = None
    for name, payload in tar_members(raw, max_member_bytes):
        if name[:2] == "__" and (_META.match(name) or ("/" not in name and name.endswith("__"))):
            continue
        split = _key_and_extension(name)
        if split is None:
            continue
        key, extension = split
        extension = extension.lower()
        if key != current:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
            current = key
        elif extension in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {url}")
        sample[extension] = payload
    if sample is not None:
        yield sample
