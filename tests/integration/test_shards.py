"""pipeline.data.shards: each converter writes shards stock webdataset can read, with exact pixels."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from helpers import ROOT
from PIL import Image

from pipeline.data import storage
from pipeline.data.shards import convert_dataset, crop_celeba, read_idx, read_manifest
from pipeline.errors import DataError


def read_split_with_stock_webdataset(directory: str) -> list[dict]:
    """Read a split with webdataset alone (no project code) in shard order."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    urls = [os.path.join(directory, shard["name"]) for shard in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture)


def check_manifest_against_files(directory: str, manifest: dict) -> None:
    assert sorted(n for n in os.listdir(directory) if n.endswith(".tar")) == [s["name"] for s in manifest["shards"]]
    for shard in manifest["shards"]:
        with open(os.path.join(directory, shard["name"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]
    assert not [n for n in os.listdir(directory) if n.endswith((".partial", ".tmp"))]


def test_cifar10_local(cifar10_source, tmp_path):
    src, expected = cifar10_source
    out = tmp_path / "shards"
    manifests = convert_dataset("cifar10", src, str(out), samples_per_shard=64)
    assert set(manifests) == {"train", "test"}
    train = manifests["train"]
    assert train["num_samples"] == 200 and [s["num_samples"] for s in train["shards"]] == [64, 64, 64, 8]
    assert train["image"] == {"height": 32, "width": 32, "channels": 3, "format": "png"}
    assert train["dataset"] == "cifar10" and train["split"] == "train"
    assert read_manifest(str(out / "train")) == train

    for split in ("train", "test"):
        check_manifest_against_files(str(out / split), manifests[split])
        samples = read_split_with_stock_webdataset(str(out / split))
        images, labels = expected[split]
        assert len(samples) == len(images)
        for i, sample in enumerate(samples):
            assert sample["__key__"] == f"{i:08d}"
            np.testing.assert_array_equal(png_pixels(sample["png"]), images[i])
            assert int(sample["cls"]) == labels[i]
            assert json.loads(sample["json"]) == {"label": labels[i], "index": i}


def test_conversion_is_deterministic(cifar10_source, tmp_path):
    src, _ = cifar10_source
    first = convert_dataset("cifar10", src, str(tmp_path / "a"), split="test", samples_per_shard=16)
    second = convert_dataset("cifar10", src, str(tmp_path / "b"), split="test", samples_per_shard=16)
    assert set(first) == {"test"}
    assert [s["sha256"] for s in first["test"]["shards"]] == [s["sha256"] for s in second["test"]["shards"]]


def test_cifar10_to_s3(cifar10_source, s3_bucket, tmp_path):
    src, expected = cifar10_source
    out = f"s3://{s3_bucket}/datasets/cifar10"
    manifests = convert_dataset("cifar10", src, out, samples_per_shard=100, limit=150)
    assert manifests["train"]["num_samples"] == 150 and manifests["test"]["num_samples"] == 30
    listed = storage.list_urls(out)
    assert listed == sorted(
        [f"{out}/test/manifest.json", f"{out}/test/shard-000000.tar", f"{out}/train/manifest.json",
         f"{out}/train/shard-000000.tar", f"{out}/train/shard-000001.tar"]
    )
    assert read_manifest(f"{out}/train") == manifests["train"]
    for shard in manifests["train"]["shards"]:
        data = storage.read_bytes(f"{out}/train/{shard['name']}")
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    # The downloaded shard is an ordinary webdataset tar.
    storage.download_file(f"{out}/train/shard-000001.tar", str(tmp_path / "s1.tar"))
    samples = list(wds.WebDataset(str(tmp_path / "s1.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(100, 150)]
    np.testing.assert_array_equal(png_pixels(samples[0]["png"]), expected["train"][0][100])


def test_cifar10_jpeg_option(cifar10_source, tmp_path):
    src, expected = cifar10_source
    manifest = convert_dataset("cifar10", src, str(tmp_path), split="test", image_format="jpg", jpeg_quality=90)["test"]
    assert manifest["image"]["format"] == "jpg" and manifest["image"]["jpeg_quality"] == 90
    samples = read_split_with_stock_webdataset(str(tmp_path / "test"))
    assert "jpg" in samples[0] and "png" not in samples[0]
    # Lossy, so compare with the same image JPEG-encoded at the same quality by PIL directly.
    reference = io.BytesIO()
    Image.fromarray(expected["test"][0][0]).save(reference, format="JPEG", quality=90)
    assert samples[0]["jpg"] == reference.getvalue()


@pytest.mark.parametrize("crop", ["center178", "authors"])
def test_celeba_local(celeba_source, tmp_path, crop):
    src, names = celeba_source
    manifests = convert_dataset("celeba", src, str(tmp_path / "out"), celeba_crop=crop, samples_per_shard=4)
    assert {split: m["num_samples"] for split, m in manifests.items()} == {"train": 10, "valid": 3, "test": 3}
    assert manifests["train"]["preprocessing"]["celeba_crop"] == crop
    assert manifests["train"]["image"] == {"height": 64, "width": 64, "channels": 3, "format": "png"}
    for split, files in names.items():
        check_manifest_against_files(str(tmp_path / "out" / split), manifests[split])
        samples = read_split_with_stock_webdataset(str(tmp_path / "out" / split))
        assert [json.loads(s["json"])["file"] for s in samples] == files
        for sample, name in zip(samples, files):
            with Image.open(os.path.join(src, "img_align_celeba", name)) as original:
                original = original.convert("RGB")
                if crop == "center178":
                    # The reference pipeline, independently: torchvision's transforms on PIL.
                    from torchvision import transforms

                    reference = transforms.Compose([transforms.CenterCrop(178), transforms.Resize(64)])(original)
                else:
                    reference = original.resize((64, 78), Image.BILINEAR).crop((0, 7, 64, 71))
            np.testing.assert_array_equal(png_pixels(sample["png"]), np.asarray(reference))
            assert int(sample["cls"]) == -1  # unlabelled


def test_crop_celeba_geometry():
    image = Image.new("RGB", (178, 218))
    assert crop_celeba(image, "center178").size == (64, 64)
    assert crop_celeba(image, "authors").size == (64, 64)
    with pytest.raises(DataError, match="smaller than the 178x178"):
        crop_celeba(Image.new("RGB", (100, 100)), "center178")


def _independent_idx_images(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    count, rows, cols = struct.unpack(">III", raw[4:16])
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)


def test_fashion_mnist_real(fashion_mnist_dir, tmp_path):
    manifests = convert_dataset("fashion-mnist", fashion_mnist_dir, str(tmp_path), limit=250, samples_per_shard=100)
    assert manifests["train"]["image"] == {"height": 28, "width": 28, "channels": 1, "format": "png"}
    assert [s["num_samples"] for s in manifests["train"]["shards"]] == [100, 100, 50]
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = _independent_idx_images(os.path.join(fashion_mnist_dir, f"{stem}-images-idx3-ubyte.gz"))
        with gzip.open(os.path.join(fashion_mnist_dir, f"{stem}-labels-idx1-ubyte.gz")) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        samples = read_split_with_stock_webdataset(str(tmp_path / split))
        assert len(samples) == 250
        for i, sample in enumerate(samples):
            np.testing.assert_array_equal(png_pixels(sample["png"]), images[i])
            assert int(sample["cls"]) == labels[i]


@pytest.mark.skipif(not os.environ.get("GAPM_FULL_DATA"), reason="full 70k-image conversion; set GAPM_FULL_DATA=1")
def test_fashion_mnist_full(fashion_mnist_dir, tmp_path):
    manifests = convert_dataset("fashion-mnist", fashion_mnist_dir, str(tmp_path))
    assert manifests["train"]["num_samples"] == 60000 and manifests["test"]["num_samples"] == 10000
    assert len(manifests["train"]["shards"]) == 6


def _write_idx(path: str, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def test_mnist_uncompressed_idx(tmp_path):
    rng = np.random.default_rng(5)
    images = {s: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("t10k", 5))}
    for stem, array in images.items():
        _write_idx(str(tmp_path / f"{stem}-images-idx3-ubyte"), array, compress=False)
        _write_idx(str(tmp_path / f"{stem}-labels-idx1-ubyte"), np.arange(len(array)) % 10, compress=stem == "t10k")
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte")), images["train"])
    manifests = convert_dataset("mnist", str(tmp_path), str(tmp_path / "out"))
    assert manifests["train"]["num_samples"] == 12 and manifests["test"]["num_samples"] == 5
    samples = read_split_with_stock_webdataset(str(tmp_path / "out" / "test"))
    np.testing.assert_array_equal(png_pixels(samples[4]["png"]), images["t10k"][4])


def test_bad_idx_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # e.g. a zip file saved under the IDX name
    with pytest.raises(DataError, match="bad IDX magic number 0x504b0304.*expected 0x00000801"):
        read_idx(str(path))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="train-images-idx3-ubyte: bad IDX magic"):
        convert_dataset("mnist", str(tmp_path), str(tmp_path / "out"))
    truncated = tmp_path / "short"
    _write_idx(str(truncated), np.zeros((10, 28, 28)), compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(str(truncated))


def test_swissroll(tmp_path):
    from sklearn.datasets import make_swiss_roll

    manifests = convert_dataset("swissroll", "-", str(tmp_path), swissroll_samples=300, seed=3, samples_per_shard=128)
    assert manifests["train"]["num_samples"] == 300 and manifests["test"]["num_samples"] == 1000
    assert manifests["train"]["image"] is None and manifests["train"]["point_dim"] == 2
    points, _ = make_swiss_roll(300, noise=0.0, random_state=3)
    expected = (points[:, [0, 2]] / 10.0).astype(np.float32)
    samples = read_split_with_stock_webdataset(str(tmp_path / "train"))
    got = np.stack([np.load(io.BytesIO(s["npy"])) for s in samples])
    assert got.dtype == np.float32 and got.shape == (300, 2)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got).max() < 2.0  # scaled by 1/10


def test_swissroll3d_shards_train_a_3d_model(tmp_path):
    from pipeline.config import load_config
    from pipeline.data import sources

    manifests = convert_dataset("swissroll3d", "-", str(tmp_path), swissroll_samples=256, samples_per_shard=64)
    assert manifests["train"]["point_dim"] == 3 and manifests["train"]["dataset"] == "swissroll3d"
    samples = read_split_with_stock_webdataset(str(tmp_path / "train"))
    assert np.load(io.BytesIO(samples[0]["npy"])).shape == (3,)
    config = load_config("configs/swissroll3d.yaml", [f"data.test={tmp_path / 'test'}"])
    assert sources.test_roll(config.data).kind == "swissroll3d"  # coverage metrics on shards too
    sources.check_sources(config.data, [3])


def test_bad_sources(tmp_path, cifar10_source, celeba_source):
    with pytest.raises(FileNotFoundError, match="no such directory.*data_batch_1"):
        convert_dataset("cifar10", str(tmp_path / "nope"), str(tmp_path / "out"))
    src, _ = cifar10_source
    os.remove(os.path.join(src, "test_batch"))
    with pytest.raises(FileNotFoundError, match="test_batch: missing"):
        convert_dataset("cifar10", src, str(tmp_path / "out"))
    with open(os.path.join(src, "test_batch"), "wb") as f:
        f.write(b"this is not a pickle")
    with open(os.path.join(src, "data_batch_1"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_1: cannot unpickle"):
        convert_dataset("cifar10", src, str(tmp_path / "out"))

    celeba, _ = celeba_source
    os.remove(os.path.join(celeba, "img_align_celeba", "000002.jpg"))
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) listed .* are missing, e.g. 000002.jpg"):
        convert_dataset("celeba", celeba, str(tmp_path / "out"))
    os.remove(os.path.join(celeba, "list_eval_partition.txt"))
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt: missing partition file"):
        convert_dataset("celeba", celeba, str(tmp_path / "out"))

    with pytest.raises(FileNotFoundError, match="t.*-ubyte\\[.gz\\]: missing"):
        convert_dataset("mnist", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        convert_dataset("imagenet", "-", str(tmp_path / "out"))
    with pytest.raises(DataError, match="has no split 'valid'"):
        convert_dataset("swissroll", "-", str(tmp_path / "out"), split="valid")
    assert not os.path.exists(tmp_path / "out")  # nothing written for any bad source


def test_s3_output_missing_bucket(cifar10_source, s3_endpoint, tmp_path):
    src, _ = cifar10_source
    with pytest.raises(storage.StorageError, match="NoSuchBucket"):
        convert_dataset("cifar10", src, "s3://no-such-bucket/cifar")


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    import os
    import pickle

    from pipeline.data import shards

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "cifar").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "cifar" / name).write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        shards.convert_dataset("cifar10", str(tmp_path / "cifar"), str(tmp_path / "out"))
    assert not (tmp_path / "pwned").exists()


def test_shards_command_to_s3_shows_progress_and_no_library_chatter(s3_bucket, tmp_path):
    """`gapm shards` as a user runs it: a progress bar per split with counts, the summary on
    stdout, and none of botocore's INFO lines ("Found credentials ...") unless asked for."""
    command = [sys.executable, "-m", "pipeline.cli", "shards", "swissroll", "-", f"s3://{s3_bucket}/roll",
               "--swissroll-samples", "300", "--samples-per-shard", "100"]
    environment = {**os.environ, "TQDM_DISABLE": ""}
    environment.pop("GAPM_LOG_LEVEL", None)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"train: 300 samples in 3 shards -> s3://{s3_bucket}/roll/train/ (manifest.json)",
                                        f"test: 1000 samples in 10 shards -> s3://{s3_bucket}/roll/test/ (manifest.json)"]
    assert "swissroll train" in done.stderr and "300/300" in done.stderr and "1000/1000" in done.stderr
    assert "point/s" in done.stderr  # a rate
    assert "botocore" not in done.stderr and "Found credentials" not in done.stderr, done.stderr

    debug = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**environment, "GAPM_LOG_LEVEL": "DEBUG"})
    assert debug.returncode == 0 and "Found credentials in environment variables" in debug.stderr


def test_shards_help_shows_the_defaults():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for default in ("(default: png)", "(default: 95)", "(default: 10000)", "(default: center178)",
                    "(default: 0)", "(default: 5000)", "(default: all splits)", "(default: every sample)"):
        assert default in text, default
