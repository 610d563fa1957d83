"""pipeline.data.tar_stream against the reference it replaced: webdataset's tar_file_iterator +
group_by_keys over tarfile, on archives in every format tarfile writes, and on damaged ones."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data import tar_stream
from pipeline.data.tar_stream import TarFormatError, tar_members, tar_samples

URL = "file:///shards/shard-000000.tar"


def reference_samples(data: bytes) -> list[dict]:
    members = ({**member, "__url__": URL} for member in tar_file_iterator(io.BytesIO(data)))
    return list(group_by_keys(members))


def build_tar(format: int, *, compress: bool = False, global_headers: dict | None = None) -> bytes:
    """Samples with every kind of name and member a shard might hold, and some it should skip."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format, pax_headers=global_headers or {}) as tar:
        def add(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)

        add("__index__", b"{}")  # webdataset's metadata names: skipped
        add("__meta__/info.json", b"{}")
        add("dir", kind=tarfile.DIRTYPE)
        add("00000000.png", b"\x89PNG" + bytes(100))
        add("00000000.cls", b"3")
        add("00000001.PNG", bytes(512))  # upper-case extension, exactly one block
        add("00000001.seg.png", bytes(1024))  # a multi-dot extension
        add("00000002.npy", b"")  # an empty member
        add("no-extension", b"x")  # not part of any sample
        add("link.png", kind=tarfile.SYMTYPE, link="00000000.png")  # links carry no data
        long_dir = "d" * 120  # past ustar's 100-character name field: prefix, pax path or GNU long name
        add(f"{long_dir}/00000003.png", b"long" * 300)
        add(f"{long_dir}/00000003.json", '{"ü": 1}'.encode())
        add("ünïcode/00000004.jpg", b"\xff\xd8" + bytes(700))
        if format != tarfile.USTAR_FORMAT:  # GNU long link / pax linkpath; ustar has no room for them
            add(f"{long_dir}/{'l' * 110}.png", kind=tarfile.SYMTYPE, link="x" * 200)
        add("00000005.txt", bytes(range(256)) * 9)
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_same_samples_as_webdataset(format):
    data = build_tar(format)
    samples = list(tar_samples(io.BytesIO(data), URL))
    assert samples == reference_samples(data)
    assert [s["__key__"] for s in samples] == [
        "00000000", "00000001", "00000002", f"{'d' * 120}/00000003", "ünïcode/00000004", "00000005"]
    assert set(samples[1]) == {"__key__", "__url__", "png", "seg.png"}


def test_compressed_tar_and_pax_global_header():
    plain = build_tar(tarfile.PAX_FORMAT, global_headers={"comment": "made by a test"})
    compressed = build_tar(tarfile.PAX_FORMAT, compress=True, global_headers={"comment": "made by a test"})
    assert list(tar_samples(io.BytesIO(compressed), URL)) == reference_samples(plain)


def test_small_chunks_split_headers_and_members(monkeypatch):
    data = build_tar(tarfile.PAX_FORMAT)
    monkeypatch.setattr(tar_stream, "CHUNK", 700)  # not a multiple of the 512-byte block
    assert list(tar_samples(io.BytesIO(data), URL)) == reference_samples(data)


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.delivered = 0

    def read(self, size: int = -1) -> bytes:
        chunk = super().read(size)
        self.delivered += len(chunk)
        return chunk


def test_reads_the_stream_to_its_end():
    """A wrapper that checks the whole object (e.g. its sha256) must see every byte, also the
    zero blocks after the end-of-archive marker."""
    data = build_tar(tarfile.PAX_FORMAT)
    stream = CountingStream(data)
    list(tar_members(stream))
    assert stream.delivered == len(data)


def _damaged(cut: int | None = None, flip: int | None = None) -> bytes:
    data = bytearray(build_tar(tarfile.USTAR_FORMAT))
    if flip is not None:
        data[flip] ^= 0x41
    return bytes(data[:cut] if cut is not None else data)


def _offsets(data: bytes) -> list[int]:
    """Header offsets of the regular members, from tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [member.offset for member in tar.getmembers() if member.isreg()]


@pytest.mark.parametrize("damage", ["cut-at-header", "cut-in-member", "bad-checksum", "empty"])
def test_damage_raises_after_the_samples_before_it(damage):
    whole = build_tar(tarfile.USTAR_FORMAT)
    # The header of 00000001.seg.png (1024 bytes): 00000000 is complete before it, 00000001 is not.
    third = _offsets(whole)[5]
    data = {"cut-at-header": _damaged(cut=third), "cut-in-member": _damaged(cut=third + 512 + 100),
            "bad-checksum": _damaged(flip=third + 10), "empty": b""}[damage]
    got = []
    with pytest.raises(TarFormatError, match="truncated|checksum"):
        for sample in tar_samples(io.BytesIO(data), URL):
            got.append(sample["__key__"])
    assert got == ([] if damage == "empty" else ["00000000"])


def test_duplicate_member_in_a_sample_is_an_error():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for payload in (b"a", b"b"):
            info = tarfile.TarInfo("00000000.png")
            info.size = 1
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="duplicate"):
        list(tar_samples(io.BytesIO(buffer.getvalue()), URL))


def _tar_with_member(size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("00000000.png", b"small"), ("00000001.png", bytes(size)), ("00000002.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_a_member_over_the_cap_is_refused_before_it_is_read():
    data = _tar_with_member(8 << 20)
    stream = CountingStream(data)
    got = []
    with pytest.raises(TarFormatError, match="'00000001.png'.* claims 8,388,608 bytes, over the 1,048,576-byte limit"):
        for sample in tar_samples(stream, URL, max_member_bytes=1 << 20):
            got.append(sample["__key__"])
    assert got == []  # 00000000 was still open (a sample ends where the next key starts)
    assert stream.delivered < 2 << 20  # the reader's read-ahead, not the member's 8 MiB
    assert [s["__key__"] for s in tar_samples(io.BytesIO(data), URL, max_member_bytes=8 << 20)] == [
        "00000000", "00000001", "00000002"]


def test_decompression_is_capped_by_its_ratio(monkeypatch):
    """A gzip stream of zeros expands about 1000-fold (deflate's limit; bzip2 and xz go far
    beyond): past the bytes allowed freely, a stream over the ratio is refused long before its
    end. (Shown at a ratio of 100 and 4 MiB free, to keep the bomb small.)"""
    import zlib

    monkeypatch.setattr(tar_stream, "RATIO_FREE_BYTES", 4 << 20)
    monkeypatch.setattr(tar_stream, "MAX_DECOMPRESSION_RATIO", 100)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = compressor.compress(bytes(256 << 20)) + compressor.flush()
    with pytest.raises(TarFormatError, match="expands more than 100-fold") as refused:
        list(tar_members(io.BytesIO(bomb)))
    expanded = int(str(refused.value).split("into over ")[1].split(")")[0].replace(",", ""))
    assert expanded < 200 << 20  # stopped well before the end of its 256 MiB
    # A real compressed shard is far from the ratio and reads whole.
    plain = build_tar(tarfile.PAX_FORMAT)
    assert list(tar_members(io.BytesIO(gzip.compress(plain)))) == list(tar_members(io.BytesIO(plain)))


def test_header_byte_sum_is_exact():
    """The checksum's byte sum comes from two Adler-32s (C) instead of a Python loop: exact for
    every block, the all-0xff one (the largest sum) included."""
    import random

    rng = random.Random(5)
    blocks = [bytes(512), b"\xff" * 512, bytes(range(256)) * 2, b"\xff" * 256 + bytes(256)]
    blocks += [bytes(rng.randrange(256) for _ in range(512)) for _ in range(200)]
    for block in blocks:
        assert tar_stream._byte_sum(block) == sum(block)


def test_a_header_with_an_unparsable_checksum_field_is_damage():
    data = bytearray(build_tar(tarfile.USTAR_FORMAT))
    data[148:156] = b"zzzzzz\0 "
    with pytest.raises(TarFormatError, match="bad header checksum at byte 0"):
        list(tar_members(io.BytesIO(bytes(data))))
