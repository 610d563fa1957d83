"""Hostile shards (issue 24, items 5 and 13): a gzip bomb, an image whose header promises
13000x13000 pixels, a manifest that disagrees with its shards. What must hold: memory stays
within 1.5x of a normal run (the peak RSS of the reading process), the hostile parts are
skipped, counted and named, and a manifest that contradicts itself is one line (exit 2)."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from helpers import ROOT, rewrite_tar

from pipeline.data.shards import convert_dataset
from pipeline.data.streaming import make_batch_stream
from pipeline.errors import DataError

MIB = 1 << 20


def repeated_deflate(megabytes: int, level: int) -> bytes:
    """Raw deflate data of `megabytes` MiB of zeros, built from one compressed MiB repeated (a
    full flush makes each block independent): gigabytes of bomb in milliseconds."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * megabytes


def crc32_of_zeros(megabytes: int, start: int = 0) -> int:
    crc, zeros = start, bytes(MIB)
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return crc


def gzip_bomb_tar(path: Path, megabytes: int) -> None:
    """A .tar.gz whose one member claims `megabytes` MiB of zeros, and holds them: about 5 KB
    of gzip per MiB."""
    header = tarfile.TarInfo("00000100.png")
    header.size = megabytes * MIB
    header_bytes = header.tobuf(format=tarfile.USTAR_FORMAT)
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    head = compressor.compress(header_bytes) + compressor.flush(zlib.Z_FULL_FLUSH)
    final_block = zlib.compressobj(1, zlib.DEFLATED, -15).flush()
    crc = crc32_of_zeros(megabytes, zlib.crc32(header_bytes))
    size = len(header_bytes) + megabytes * MIB
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head)
        out.write(repeated_deflate(megabytes, 1))
        out.write(final_block + struct.pack("<II", crc, size & 0xFFFFFFFF))


def huge_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height black pixels, compressed as far as deflate goes (about
    1 KB per MiB of pixels): small as a member, 3 x width x height bytes once decoded."""
    raw_size = height * (1 + 3 * width)  # each row: filter byte, then RGB
    whole, rest = divmod(raw_size, MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    adler = ((raw_size % 65521) << 16) | 1  # adler32 of raw_size zero bytes
    idat = b"\x78\xda" + repeated_deflate(whole, 9) + tail + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_bombs_are_what_they_claim(tmp_path):
    """The generators above make what a hostile user would: a gzip stream that really expands,
    and a PNG that PIL really decodes to 13000x13000 (checked small here)."""
    import gzip
    import io

    from PIL import Image

    gzip_bomb_tar(tmp_path / "bomb.tar.gz", 3)
    expanded = gzip.decompress((tmp_path / "bomb.tar.gz").read_bytes())
    assert len(expanded) == 512 + 3 * MIB and not any(expanded[512:])
    with Image.open(io.BytesIO(huge_png(700, 600))) as picture:
        assert picture.size == (700, 600)
        assert picture.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))


READ_ALL = """
import json, resource, sys
from pipeline.data.streaming import make_batch_stream
stream = make_batch_stream(sys.argv[1], batch_size=10, drop_last=False, shuffle_buffer=0)
samples = sum(batch.shape[0] for batch in stream)
print(json.dumps({"samples": samples, "corrupt": stream.stats.corrupt_samples, "failed": stream.stats.failed_shards,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def read_in_subprocess(spec: str) -> dict:
    """Streams every sample of `spec` in a fresh process; its counts and peak RSS."""
    result = subprocess.run([sys.executable, "-c", READ_ALL, spec], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.stderr}


def test_hostile_shards_are_skipped_within_one_and_a_half_times_normal_memory(cifar10_source, tmp_path):
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path / "normal"), split="train", samples_per_shard=50)
    shutil.copytree(tmp_path / "normal", tmp_path / "hostile")
    shards = tmp_path / "hostile" / "train"
    # Sample 3: a PNG of 13000 x 13000 RGB pixels (507 MB decoded, under 1 MiB as a member).
    bomb_png = huge_png(13000, 13000)
    assert len(bomb_png) < MIB
    rewrite_tar(shards / "shard-000000.tar", lambda name, data: bomb_png if name == "00000003.png" else data)
    # Shard 2: a gzip bomb, 1.5 GiB of zeros in one tar member, 7 MB on disk.
    gzip_bomb_tar(shards / "shard-000002.tar", 1536)

    normal = read_in_subprocess(str(tmp_path / "normal" / "train"))
    hostile = read_in_subprocess(str(shards))
    assert normal["samples"] == 200 and normal["corrupt"] == normal["failed"] == 0
    assert hostile["corrupt"] == 1  # the huge image, refused from its header
    assert hostile["failed"] == 2  # the bomb, refused at its member header; shard 0 fails its sha256 (rewritten)
    assert hostile["samples"] == 200 - 1 - 50
    assert hostile["peak_rss_kib"] <= 1.5 * normal["peak_rss_kib"], (hostile["peak_rss_kib"], normal["peak_rss_kib"])
    assert "13000x13000" in hostile["log"] and "not decoded" in hostile["log"]
    assert "data.max_member_bytes" in hostile["log"] and "shard-000002.tar" in hostile["log"]


# --------------------------------------------------------------------------- manifests that disagree


@pytest.fixture()
def cifar_train_directory(cifar10_source, tmp_path):
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path), split="train", samples_per_shard=50)
    return tmp_path / "train"


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_that_understates_its_shards_is_named_with_the_fix(cifar_train_directory, caplog):
    """The issue's case: shards listed with fewer samples than they hold. Training can go on
    (epochs are sized from the manifest, so they are short), and the line says so, with the fix."""

    def understate(manifest):
        for shard in manifest["shards"]:
            shard["num_samples"] = 10
        manifest["num_samples"] = 40

    edit_manifest(cifar_train_directory, understate)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    stream = make_batch_stream(str(cifar_train_directory), batch_size=10, verify_checksums=False)
    assert len(stream) == 4 and sum(1 for _ in stream) == 4  # what the manifest allows
    lines = [r.getMessage() for r in caplog.records if "holds more samples than" in r.getMessage()]
    assert lines and "shard-00000" in lines[0] and "the 10 its manifest lists" in lines[0]
    assert "gapm shards" in lines[0]
    assert len(lines) == len(set(lines))  # once per shard


def test_a_manifest_that_overstates_its_shards_counts_them_as_truncated(cifar_train_directory, caplog):
    edit_manifest(cifar_train_directory, lambda m: (m["shards"][1].update(num_samples=80), m.update(num_samples=230)))
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    stream = make_batch_stream(str(cifar_train_directory), batch_size=10, drop_last=False, verify_checksums=False)
    assert sum(batch.shape[0] for batch in stream) == 200 and stream.stats.failed_shards == 1
    assert any("shard-000001.tar ended after 50 of the manifest's 80 samples" in r.getMessage() for r in caplog.records)


def test_a_manifest_that_contradicts_itself_is_one_line(cifar_train_directory, tmp_path, capsys):
    edit_manifest(cifar_train_directory, lambda m: m.update(num_samples=5000))
    with pytest.raises(DataError, match="num_samples is 5000 but its shards list 200 samples"):
        make_batch_stream(str(cifar_train_directory), batch_size=10)
    from pipeline import cli

    status = cli.main(["train", "--config", str(ROOT / "configs/swissroll.yaml"), "--set", f"output_dir={tmp_path}",
                       "--set", f"data.train={cifar_train_directory}", "--set", "model.data_shape=[3, 32, 32]",
                       "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "re-run `gapm shards`" in err, err


def test_shards_record_their_largest_member_and_readers_cap_from_it(cifar_train_directory):
    from pipeline.data.streaming import (
        MEMBER_CAP_FLOOR,
        MEMBER_CAP_WITHOUT_MANIFEST,
        default_member_cap,
    )

    manifest = json.loads((cifar_train_directory / "manifest.json").read_text())
    largest = max(member.size for shard in sorted(cifar_train_directory.glob("*.tar"))
                  for member in tarfile.open(shard).getmembers())
    assert manifest["max_member_bytes"] == largest
    assert default_member_cap(manifest) == max(MEMBER_CAP_FLOOR, 16 * largest)
    assert default_member_cap({"shards": []}) == MEMBER_CAP_WITHOUT_MANIFEST
    # An explicit data.max_member_bytes below a real member: that shard is refused, the rest read.
    stream = make_batch_stream(str(cifar_train_directory), batch_size=10, drop_last=False, max_member_bytes=largest - 1)
    assert stream.stats.failed_shards == 0
    assert sum(batch.shape[0] for batch in stream) < 200 and stream.stats.failed_shards >= 1
