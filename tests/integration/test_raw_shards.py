"""Raw-pixel shards (`gapm shards --image-format raw`, issue 23 item 2): the same split as PNG
and as raw gives the same uint8 batches, bit for bit, through the training reader (local and
S3, with and without workers) and through every evaluation path; the manifest records the
format; members that do not match the manifest are corrupt samples."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from helpers import FASHION_MNIST_DIR, rewrite_tar

from pipeline import cli
from pipeline.data.sample_decode import npy_header
from pipeline.data.shards import convert_dataset
from pipeline.data.sources import DataConfig, held_out_data
from pipeline.data.streaming import make_batch_stream

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def as_uint8(batches: list[torch.Tensor]) -> np.ndarray:
    """The batches back as uint8 (x * 255 is exact for values decoded from uint8)."""
    return (torch.cat(batches) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """400 training and 400 test images of real Fashion-MNIST, as PNG and as raw shards (4 + 4)."""
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    out = tmp_path_factory.mktemp("raw-shards")
    for image_format in ("png", "raw"):
        convert_dataset("fashion-mnist", FASHION_MNIST_DIR, str(out / image_format), limit=400, samples_per_shard=100,
                        image_format=image_format)
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(16 + 400 * 784), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return out, images


@pytest.mark.parametrize("settings", [dict(drop_last=False, seed=3), dict(num_workers=2, seed=5, epoch=1),
                                      dict(rank=1, world_size=2, shuffle_buffer=0, drop_last=False)],
                         ids=["one-pass", "two-workers", "rank1-unshuffled"])
def test_png_and_raw_shards_give_identical_batches(fashion, settings):
    out, images = fashion
    png = list(make_batch_stream(str(out / "png" / "train"), 32, **settings))
    raw = list(make_batch_stream(str(out / "raw" / "train"), 32, **settings))
    assert len(png) == len(raw) > 0 and all(p.shape == r.shape for p, r in zip(png, raw))
    assert np.array_equal(as_uint8(png), as_uint8(raw))  # same images, same order
    assert all(torch.equal(p, r) for p, r in zip(png, raw))  # and the same float32 batches
    if settings.get("drop_last") is False and "rank" not in settings:
        got = sorted(image.tobytes() for image in as_uint8(raw).transpose(0, 2, 3, 1))
        assert got == sorted(image.tobytes() for image in images)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rgb_raw_shards_round_trip(where, cifar10_source, tmp_path, request):
    src, expected = cifar10_source
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/cifar"
    convert_dataset("cifar10", src, f"{root}/png", split="train", samples_per_shard=50)
    convert_dataset("cifar10", src, f"{root}/raw", split="train", samples_per_shard=50, image_format="raw")
    png = list(make_batch_stream(f"{root}/png/train", 16, drop_last=False, seed=1))
    raw = list(make_batch_stream(f"{root}/raw/train", 16, drop_last=False, seed=1))
    assert raw[0].shape == (16, 3, 32, 32) and np.array_equal(as_uint8(png), as_uint8(raw))
    got = sorted(image.tobytes() for image in as_uint8(raw).transpose(0, 2, 3, 1))
    assert got == sorted(np.ascontiguousarray(image).tobytes() for image in expected["train"][0])


def test_the_command_writes_raw_members_and_records_the_format(fashion_mnist_dir, tmp_path, capsys):
    for flag, image_format in (("--image-format", "raw"), ("--format", "raw"), ("--format", "png")):
        out = tmp_path / f"{flag}-{image_format}"
        assert cli.main(["shards", "fashion-mnist", fashion_mnist_dir, str(out), "--split", "test", "--limit", "20",
                         flag, image_format]) == 0
        manifest = json.loads((out / "test" / "manifest.json").read_text())
        assert manifest["image"] == {"height": 28, "width": 28, "channels": 1, "format": image_format}
    with tarfile.open(tmp_path / "--image-format-raw" / "test" / "shard-000000.tar") as tar:
        names = tar.getnames()
        member = tar.extractfile("00000000.npy").read()
    assert names[:3] == ["00000000.npy", "00000000.cls", "00000000.json"]
    with gzip.open(os.path.join(fashion_mnist_dir, "t10k-images-idx3-ubyte.gz")) as f:
        first = np.frombuffer(f.read(16 + 784), np.uint8, offset=16).reshape(28, 28, 1)
    pixels = np.load(io.BytesIO(member))  # any tool reads a member: it is np.save's format
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, first)
    with pytest.raises(SystemExit) as refused:  # argparse: one line, exit 2
        cli.main(["shards", "fashion-mnist", fashion_mnist_dir, str(tmp_path / "x"), "--image-format", "bmp"])
    assert refused.value.code == 2
    assert "invalid choice: 'bmp'" in capsys.readouterr().err


def test_every_evaluation_path_reads_raw_shards(fashion, tmp_path, capsys):
    """held_out_data (end-of-run metrics), fid-stats, `gapm eval`'s test reconstructions and
    train-feature-extractor give the same results from raw shards as from PNG ones."""
    from pipeline.eval import fid, reference_stats
    from pipeline.eval.features import (
        DomainClassifier,
        DomainNetShape,
        labelled_images,
        load_domain_extractor,
        save_domain_extractor,
    )
    from pipeline.eval.scoring import Ranks, split_reconstruction_mse

    out, _ = fashion
    spec = {image_format: str(out / image_format / "test") for image_format in ("png", "raw")}
    held_out = {k: held_out_data(DataConfig(test=v, batch_size=64), seed=0, limit=250, data_shape=[1, 28, 28])
                for k, v in spec.items()}
    assert held_out["raw"].shape == (250, 1, 28, 28) and torch.equal(held_out["png"], held_out["raw"])

    images = {k: labelled_images(v) for k, v in spec.items()}
    assert torch.equal(images["png"][0], images["raw"][0]) and torch.equal(images["png"][1], images["raw"][1])
    assert images["raw"][0].shape == (400, 1, 28, 28)

    extractor_file = tmp_path / "extractor.safetensors"
    torch.manual_seed(0)
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=8)), str(extractor_file))
    extractor = fid.load_extractor(str(extractor_file), device=torch.device("cpu"))
    stats = {k: reference_stats.compute_reference_stats(v, extractor, k) for k, v in spec.items()}
    assert stats["raw"].count == 400
    assert np.array_equal(stats["png"].mu, stats["raw"].mu) and np.array_equal(stats["png"].sigma, stats["raw"].sigma)

    from gapm import GAPM, ModelShape

    torch.manual_seed(0)
    model = GAPM(ModelShape(data_shape=[1, 28, 28], latent_dim=8, prior_dim=8, width=8,
                            latent_generator_widths=[16], latent_discriminator_widths=[16])).eval()
    mse = {k: split_reconstruction_mse(model, v, Ranks(), 100) for k, v in spec.items()}
    assert mse["raw"][1] == 400 and mse["png"] == mse["raw"]

    weights = {}
    for image_format in ("png", "raw"):
        trained = tmp_path / f"classifier-{image_format}.safetensors"
        assert cli.main(["train-feature-extractor", str(out / image_format / "train"), "--out", str(trained),
                         "--epochs", "1", "--feature-dim", "8", "--batch-size", "50"]) == 0
        weights[image_format] = load_domain_extractor(str(trained)).network.state_dict()
    # the same images in the same order: the same network (the files differ in the data URL they name)
    assert weights["png"].keys() == weights["raw"].keys()
    assert all(torch.equal(weights["png"][name], weights["raw"][name]) for name in weights["png"])


def test_raw_members_that_do_not_match_the_manifest_are_corrupt_samples(fashion_mnist_dir, tmp_path, caplog):
    spec = tmp_path / "raw"
    convert_dataset("fashion-mnist", fashion_mnist_dir, str(spec), split="train", limit=200, samples_per_shard=100,
                    image_format="raw")
    # Sample 3: cut short by 10 bytes. Sample 150: the header of a 28x27 image with as many bytes.
    rewrite_tar(str(spec / "train" / "shard-000000.tar"),
                lambda name, data: data[:-10] if name == "00000003.npy" else data)
    rewrite_tar(str(spec / "train" / "shard-000001.tar"),
                lambda name, data: npy_header((28, 27, 1)) + bytes(28 * 27) if name == "00000150.npy" else data)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    stream = make_batch_stream(str(spec / "train"), 10, drop_last=False, verify_checksums=False)
    assert sum(len(batch) for batch in stream) == 198
    assert stream.stats.corrupt_samples == 2 and stream.stats.failed_shards == 0
    warnings = " ".join(record.message for record in caplog.records)
    assert "00000003" in warnings and "holds 774 bytes of data, its header promises 784" in warnings
    assert "00000150" in warnings and "raw image of uint8 (28, 27, 1), the manifest's is uint8 (28, 28, 1)" in warnings
