"""pipeline.data.streaming: shards (local or S3) -> batches, rank splits, bad data and bad locations."""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import rewrite_tar

from pipeline.data import storage
from pipeline.data.shards import convert_dataset
from pipeline.data.streaming import (
    make_batch_stream,
    register_s3_opener,
    resolve_shard_urls,
)
from pipeline.errors import DataError


def image_rows(batches: list[torch.Tensor]) -> Counter:
    """Multiset of images as raw uint8 bytes (x * 255 is exact for values decoded from uint8)."""
    rows = Counter()
    for batch in batches:
        assert batch.dtype == torch.float32 and 0.0 <= batch.min() and batch.max() <= 1.0
        pixels = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # back to NHWC
        rows.update(image.tobytes() for image in pixels)
    return rows


def expected_rows(images: np.ndarray) -> Counter:
    return Counter(np.ascontiguousarray(image).tobytes() for image in images)


@pytest.fixture(params=["local", "s3"])
def shard_root(request, tmp_path):
    """A place to write shards: a local directory or a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "shards")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/shards"


# --------------------------------------------------------------------------- every format, both places


def test_cifar10_roundtrip(shard_root, cifar10_source):
    src, expected = cifar10_source
    convert_dataset("cifar10", src, shard_root, samples_per_shard=64)
    for split in ("train", "test"):
        stream = make_batch_stream(f"{shard_root}/{split}", batch_size=16, drop_last=False, seed=1)
        batches = list(stream)
        assert batches[0].shape == (16, 3, 32, 32) and batches[0].is_contiguous()
        assert image_rows(batches) == expected_rows(expected[split][0])
        assert stream.stats.samples == len(expected[split][0]) and stream.stats.corrupt_samples == 0


def test_celeba_roundtrip(shard_root, celeba_source):
    from PIL import Image
    from torchvision import transforms

    src, names = celeba_source
    convert_dataset("celeba", src, shard_root, samples_per_shard=4)
    reference = transforms.Compose([transforms.CenterCrop(178), transforms.Resize(64)])
    for split, files in names.items():
        images = []
        for name in files:
            with Image.open(os.path.join(src, "img_align_celeba", name)) as original:
                images.append(np.asarray(reference(original.convert("RGB"))))
        batches = list(make_batch_stream(f"{shard_root}/{split}", batch_size=2, drop_last=False))
        assert batches[0].shape == (2, 3, 64, 64)
        assert image_rows(batches) == expected_rows(np.stack(images))


def test_fashion_mnist_roundtrip(shard_root, fashion_mnist_dir):
    import gzip

    convert_dataset("fashion-mnist", fashion_mnist_dir, shard_root, split="train", limit=300, samples_per_shard=100)
    with gzip.open(os.path.join(fashion_mnist_dir, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:300]
    stream = make_batch_stream(f"{shard_root}/train", batch_size=32)
    batches = list(stream)
    assert len(batches) == len(stream) == 300 // 32 and all(b.shape == (32, 1, 28, 28) for b in batches)
    assert not image_rows(batches) - expected_rows(images)  # drop_last: 288 of the 300, no strangers
    everything = list(make_batch_stream(f"{shard_root}/train", batch_size=32, drop_last=False))
    assert image_rows(everything) == expected_rows(images)


def test_swissroll_roundtrip(shard_root):
    from sklearn.datasets import make_swiss_roll

    convert_dataset("swissroll", "-", shard_root, split="train", swissroll_samples=300, samples_per_shard=100)
    batches = list(make_batch_stream(f"{shard_root}/train", batch_size=50, drop_last=False))
    assert all(b.shape == (50, 2) and b.dtype == torch.float32 for b in batches)
    got = torch.cat(batches).numpy()
    expected = (make_swiss_roll(300, noise=0.0, random_state=0)[0][:, [0, 2]] / 10.0).astype(np.float32)
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))


# --------------------------------------------------------------------------- ranks, workers, epochs


@pytest.fixture()
def cifar_shards(cifar10_source, tmp_path):
    """200 train images in 4 shards of 50."""
    src, expected = cifar10_source
    out = str(tmp_path / "cifar")
    convert_dataset("cifar10", src, out, split="train", samples_per_shard=50)
    return f"{out}/train", expected["train"][0]


def test_two_ranks_get_disjoint_samples_and_equal_batches(cifar_shards):
    spec, images = cifar_shards
    per_rank = []
    for rank in (0, 1):
        stream = make_batch_stream(spec, batch_size=16, rank=rank, world_size=2, seed=7)
        batches = list(stream)
        assert len(batches) == len(stream) == 200 // (2 * 16)
        per_rank.append(image_rows(batches))
    assert sum(per_rank[0].values()) == sum(per_rank[1].values()) == 6 * 16
    assert not set(per_rank[0]) & set(per_rank[1]), "ranks must not share samples"
    assert max(per_rank[0].values()) == 1 and max(per_rank[1].values()) == 1
    assert not (per_rank[0] + per_rank[1]) - expected_rows(images)


def test_uneven_shards_still_give_equal_batch_counts(cifar10_source, tmp_path):
    """3 shards (70, 70, 60) over 2 ranks: rank 1 has 60 samples but must still run 6 batches."""
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path), split="train", samples_per_shard=70)
    counts = []
    for rank in (0, 1):
        for workers in (0, 1):
            stream = make_batch_stream(str(tmp_path / "train"), batch_size=16, rank=rank, world_size=2,
                                       num_workers=workers)
            counts.append(sum(1 for _ in stream))
    assert counts == [6, 6, 6, 6]
    explicit = make_batch_stream(str(tmp_path / "train"), batch_size=16, rank=1, world_size=2, batches_per_epoch=11)
    assert sum(1 for _ in explicit) == 11


def test_workers_and_epochs(cifar_shards):
    spec, images = cifar_shards
    stream = make_batch_stream(spec, batch_size=20, num_workers=2, seed=3)
    first = list(stream)
    assert len(first) == 10 and image_rows(first) == expected_rows(images)  # 200 = one exact pass
    again = list(make_batch_stream(spec, batch_size=20, num_workers=2, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "same seed and epoch, same order"
    stream.set_epoch(1)
    second = list(stream)
    assert image_rows(second) == expected_rows(images)
    assert not all(torch.equal(a, b) for a, b in zip(first, second)), "a new epoch reshuffles"
    assert stream.stats.batches == 20 and stream.stats.samples == 400


# Digests of the batches the reader gave before issue 16 replaced tarfile with its own tar
# reader and moved the float conversion after the worker boundary (recorded with that code):
# the same (seed, epoch, rank, worker) must keep giving the same batches, bit for bit.
BATCHES_BEFORE_ISSUE_16 = [
    (dict(seed=3), "3ad8f3b9ac0bbb2f"),
    (dict(seed=3, epoch=1, rank=1, world_size=2, num_workers=2), "5255da8fb9852e96"),
    (dict(num_workers=1, shuffle_buffer=0, drop_last=False), "f393d75a25917a90"),
    (dict(seed=5, rank=0, world_size=2, num_workers=2, resampled=True, batches_per_epoch=7), "f71f7342414dd95e"),
    (dict(seed=2, num_workers=2, batches_per_epoch=15, shuffle_buffer=30), "45f09773c0d9dc4c"),  # cycles
]


@pytest.mark.parametrize(("settings", "digest"), BATCHES_BEFORE_ISSUE_16,
                         ids=["capped", "rank1-workers2-epoch1", "one-pass", "resampled", "cycling"])
def test_same_batches_as_before_the_fast_reader(cifar_shards, settings, digest):
    import hashlib

    spec, _ = cifar_shards
    batches = hashlib.sha256()
    for batch in make_batch_stream(spec, batch_size=20, **settings):
        assert batch.dtype == torch.float32 and batch.is_contiguous()
        batches.update(batch.numpy().tobytes())
    assert batches.hexdigest()[:16] == digest


def test_too_few_shards_is_refused_up_front(cifar10_source, tmp_path):
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path), split="train", samples_per_shard=100)  # 2 shards
    with pytest.raises(DataError) as error:
        make_batch_stream(str(tmp_path / "train"), batch_size=8, world_size=2, num_workers=2)
    message = str(error.value)
    assert "2 shard(s)" in message and "= 4 readers" in message
    assert "samples_per_shard <= 50" in message and "resampled: true" in message
    # The suggested fix works: resampled shards need no minimum count, and counts stay equal.
    for rank in (0, 1):
        stream = make_batch_stream(str(tmp_path / "train"), batch_size=8, rank=rank, world_size=2, num_workers=2,
                                   resampled=True, batches_per_epoch=5)
        assert sum(1 for _ in stream) == 5


def test_brace_pattern_and_single_tar(cifar_shards):
    spec, images = cifar_shards
    pattern = f"{spec}/shard-{{000000..000003}}.tar"
    assert resolve_shard_urls(pattern) == resolve_shard_urls(spec) == [f"{spec}/shard-{i:06d}.tar" for i in range(4)]
    assert len(make_batch_stream(pattern, batch_size=10)) == 20  # counts from the manifest next to the shards
    single = list(make_batch_stream(f"{spec}/shard-000002.tar", batch_size=10, drop_last=False))
    assert image_rows(single) == expected_rows(images[100:150])
    with pytest.raises(storage.StorageError, match="2 of 6 shard\\(s\\) do not exist"):
        resolve_shard_urls(f"{spec}/shard-{{000000..000005}}.tar")


# --------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_sample_and_broken_shard_are_skipped_and_counted(cifar_shards, caplog, workers):
    spec, images = cifar_shards
    # Sample 7 (shard 0): a truncated PNG. Shard 3: cut off half-way, as by an interrupted copy.
    rewrite_tar(f"{spec}/shard-000000.tar", lambda name, data: data[:60] if name == "00000007.png" else data)
    broken = f"{spec}/shard-000003.tar"
    with open(broken, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2 + 100])

    caplog.set_level(logging.WARNING, logger="pipeline.data")
    # Checksums off: shard 0 was rewritten, which the manifest's sha256 would flag too (below).
    stream = make_batch_stream(spec, batch_size=10, num_workers=workers, drop_last=False, verify_checksums=False)
    rows = image_rows(list(stream))
    assert stream.stats.corrupt_samples == 1 and stream.stats.failed_shards == 1
    lost_in_shard_3 = 50 - sum(rows[image.tobytes()] for image in images[150:200])
    assert 0 < lost_in_shard_3 < 50  # the samples before the break were kept
    assert sum(rows.values()) == 200 - 1 - lost_in_shard_3 == stream.stats.samples
    assert images[7].tobytes() not in rows
    if workers == 0:  # worker processes log to their own stderr
        warning = next(r.message for r in caplog.records if "00000007" in r.message)
        assert "shard-000000.tar" in warning and "60-byte .png member" in warning and "truncated" in warning
        assert any("shard-000003.tar" in r.message for r in caplog.records)

    verified = make_batch_stream(spec, batch_size=10, num_workers=workers, drop_last=False)
    assert image_rows(list(verified)) == rows
    assert verified.stats.failed_shards == 2  # shard 3 broke off; shard 0 no longer matches its sha256

    # Capped training mode keeps going past the bad data and still delivers every batch.
    training = make_batch_stream(spec, batch_size=10, num_workers=workers)
    assert sum(1 for _ in training) == len(training) == 20


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_changed_after_conversion_fails_its_checksum(cifar_shards, caplog, workers):
    spec, images = cifar_shards
    # A well-formed tar with the same samples but different bytes (member times changed), as a
    # shard re-packed or bit-flipped in a header would be: only the sha256 can tell.
    rewrite_tar(f"{spec}/shard-000002.tar", shift_times=1)

    caplog.set_level(logging.WARNING, logger="pipeline.data")
    stream = make_batch_stream(spec, batch_size=10, num_workers=workers, drop_last=False)
    assert image_rows(list(stream)) == expected_rows(images)  # nothing dropped: the samples decode
    assert stream.stats.failed_shards == 1 and stream.stats.corrupt_samples == 0
    if workers == 0:
        assert any("shard-000002.tar does not match its manifest" in r.message for r in caplog.records)

    unchecked = make_batch_stream(spec, batch_size=10, num_workers=workers, drop_last=False, verify_checksums=False)
    assert sum(b.shape[0] for b in unchecked) == 200 and unchecked.stats.failed_shards == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_set_where_nothing_decodes_is_one_error_and_few_warnings(cifar_shards, caplog, workers):
    spec, _ = cifar_shards
    for shard in range(4):
        rewrite_tar(f"{spec}/shard-{shard:06d}.tar", lambda name, data: b"garbage" if name.endswith(".png") else data)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    with pytest.raises(DataError) as error:
        list(make_batch_stream(spec, batch_size=10, num_workers=workers))
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message  # not re-wrapped by a DataLoader worker
    assert "no readable samples" in message and "failed to decode" in message and "gapm shards" in message
    if workers == 0:
        corrupt_lines = [r for r in caplog.records if "corrupt" in r.message]
        assert 5 <= len(corrupt_lines) <= 12, len(corrupt_lines)  # 200 bad samples, a handful of lines
        assert "the 7-byte .png member is not a readable image" in corrupt_lines[0].message
        assert not any("BytesIO" in r.message for r in corrupt_lines)


def test_unreadable_shard_is_skipped(cifar_shards):
    spec, _ = cifar_shards
    os.remove(f"{spec}/shard-000001.tar")  # listed in the manifest, gone from storage
    stream = make_batch_stream(spec, batch_size=10, drop_last=False)
    assert sum(b.shape[0] for b in stream) == 150 and stream.stats.failed_shards == 1


# --------------------------------------------------------------------------- bad locations


def test_bad_locations(s3_bucket, tmp_path, cifar10_source):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist \\(NoSuchBucket\\)"):
        make_batch_stream("s3://no-such-bucket/cifar/train", batch_size=4)
    with pytest.raises(storage.StorageError, match="nothing stored under key prefix 'cifar/train'"):
        make_batch_stream(f"s3://{s3_bucket}/cifar/train", batch_size=4)
    with pytest.raises(storage.StorageError, match="no such file or directory"):
        make_batch_stream(str(tmp_path / "nowhere"), batch_size=4)
    # Shards without a manifest: an unfinished conversion is not silently trained on.
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path / "c"), split="test")
    os.remove(tmp_path / "c" / "test" / "manifest.json")
    with pytest.raises(storage.StorageError, match="no manifest.json; it holds 1 .tar file"):
        make_batch_stream(str(tmp_path / "c" / "test"), batch_size=4)


def test_unreachable_endpoint_fails_before_streaming(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:1"):
        make_batch_stream(f"s3://{s3_bucket}/cifar/train", batch_size=4)


def test_stock_webdataset_reads_s3_after_register(s3_bucket, cifar10_source):
    src, expected = cifar10_source
    out = f"s3://{s3_bucket}/cifar"
    convert_dataset("cifar10", src, out, split="test")
    register_s3_opener()
    samples = list(wds.WebDataset(f"{out}/test/shard-000000.tar", shardshuffle=False).decode("rgb8"))
    assert len(samples) == 30
    np.testing.assert_array_equal(samples[3]["png"], expected["test"][0][3])


def test_s3_stream_with_workers(s3_bucket, cifar10_source):
    src, expected = cifar10_source
    out = f"s3://{s3_bucket}/cifar"
    convert_dataset("cifar10", src, out, split="train", samples_per_shard=50)
    stream = make_batch_stream(f"{out}/train", batch_size=25, num_workers=2)
    assert image_rows(list(stream)) == expected_rows(expected["train"][0])
