"""FID through clean-fid's own preprocessing and scores, reference statistics, feature
extractors (Inception staging without network, the domain classifier). Never downloads:
every test uses a small extractor, or a fake TorchScript file in Inception's place."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FASHION_MNIST_DIR
from torch import nn

from pipeline import cli
from pipeline.data import storage, streaming
from pipeline.data.shards import convert_dataset
from pipeline.eval import fid, reference_stats
from pipeline.eval.features import (
    DomainClassifier,
    DomainNetShape,
    labelled_images,
    load_domain_extractor,
    save_domain_extractor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory) -> Path:
    """600 train / 300 test real Fashion-MNIST images as shards (several shards per split)."""
    if not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    out = tmp_path_factory.mktemp("fid-data") / "fm"
    convert_dataset("fashion-mnist", FASHION_MNIST_DIR, str(out), limit=600, samples_per_shard=200)
    # the test split of 600 is cut to 300 by the readers below (limit)
    return out


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    """gapm's cache in a fresh place, no statistics directory from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(reference_stats.STATS_DIR_ENV, raising=False)
    return tmp_path / "cache" / "gapm"


def small_extractor(feature_dim: int = 12, seed: int = 0) -> fid.FeatureExtractor:
    """A fixed random conv net, clean-fid's custom_feat_extractor contract ((B,3,S,S) 0-255)."""
    torch.manual_seed(seed)
    # position-sensitive on purpose (no global pooling): a shifted image has other features
    net = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 7 * 7, 32), nn.Tanh(),
                        nn.Linear(32, feature_dim)).eval()

    def network(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(images / 255.0)

    return fid.FeatureExtractor(id=f"test-random-{seed}", network=network, input_size=(28, 28), location="test")


def batches(spec: str, limit: int, transform=None, batch_size: int = 100):
    seen = 0
    for batch in streaming.make_batch_stream(spec, batch_size, drop_last=False, shuffle_buffer=0):
        batch = batch[: limit - seen]
        seen += len(batch)
        yield transform(batch) if transform else batch
        if seen >= limit:
            return


def distance(a: reference_stats.ReferenceStats, b: reference_stats.ReferenceStats) -> float:
    return fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(fashion_shards):
    extractor = small_extractor()
    train = str(fashion_shards / "train")
    reference = reference_stats.compute_reference_stats(train, extractor, "train", limit=200)
    assert reference.count == 200 and reference.image_shape == [1, 28, 28]
    again = reference_stats.compute_reference_stats(train, extractor, "again", limit=200)
    itself = distance(again, reference)
    assert itself == pytest.approx(0.0, abs=1e-6)
    assert again.id == reference.id
    scores = [distance(reference_stats.compute_reference_stats("shifted", extractor, "s", images=batches(
        train, 200, lambda b, s=s: torch.roll(b, shifts=s, dims=3))), reference) for s in (2, 6)]
    brighter = distance(reference_stats.compute_reference_stats("bright", extractor, "b", images=batches(
        train, 200, lambda b: (b + 0.3).clamp(0, 1))), reference)
    assert max(abs(itself), 1e-9) * 1000 < scores[0] < scores[1]
    assert brighter > 1000 * max(abs(itself), 1e-9)


def test_frechet_distance_is_clean_fids():
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) * 1.2 + 0.3
    stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (first, second, first[:5])]
    for (mu1, sigma1), (mu2, sigma2) in [(stats[0], stats[1]), (stats[2], stats[1]), (stats[0], stats[0])]:
        ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
        try:
            theirs = cleanfid_frechet(mu1, sigma1, mu2, sigma2)
        except TypeError:  # SciPy >= 1.18 (see fid.frechet_distance)
            pytest.skip("clean-fid's own frechet_distance does not run on this SciPy")
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-9)
    with pytest.raises(fid.FidError, match="feature sizes differ"):
        fid.frechet_distance(stats[0][0], stats[0][1], stats[0][0][:4], stats[0][1][:4, :4])


def test_real_image_features_are_clean_fids_folder_features(fashion_shards, tmp_path):
    """The same images written as PNG files and read by clean-fid's folder pipeline give the
    same features: the preprocessing is clean-fid's own (mode clean, grayscale -> RGB)."""
    from cleanfid.fid import get_folder_features
    from PIL import Image

    extractor = small_extractor()
    images = torch.cat(list(batches(str(fashion_shards / "test"), 40)))
    folder = tmp_path / "png"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{index:04d}.png")
    ours = fid.real_image_features(images, extractor)
    theirs = get_folder_features(str(folder), extractor.network, num_workers=0, batch_size=16, device="cpu",
                                 mode="clean", custom_fn_resize=extractor.resizer(), verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_generated_features_have_compute_fid_gen_semantics(fashion_shards, tmp_path):
    """gen(z) returns float images in [0, 255] (B, 3, H, W): our score of such a generator
    equals clean-fid's compute_fid(gen=..., fdir2=...) against the same real images."""
    from cleanfid.fid import compute_fid
    from PIL import Image

    extractor = small_extractor()
    real = torch.cat(list(batches(str(fashion_shards / "train"), 120)))
    folder = tmp_path / "real"
    folder.mkdir()
    for index, image in enumerate(real):
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{index:04d}.png")
    fakes = fid.to_rgb_255(F.avg_pool2d(real, 3, stride=1, padding=1))  # deterministic "generator"
    position = {"next": 0}

    def generate(z: torch.Tensor) -> torch.Tensor:
        start = position["next"] % len(fakes)
        position["next"] += len(z)
        return fakes[start:start + len(z)]

    try:
        theirs = compute_fid(gen=generate, fdir2=str(folder), mode="clean", num_gen=120, batch_size=40, z_dim=4,
                             device=torch.device("cpu"), num_workers=0, custom_feat_extractor=extractor.network,
                             custom_fn_resize=extractor.resizer(), verbose=False)
    except TypeError as error:  # clean-fid 0.1.35 on SciPy >= 1.18: sqrtm(disp=...) is gone
        if "disp" not in str(error):
            raise
        pytest.skip("clean-fid's own frechet_distance does not run on this SciPy")
    position["next"] = 0
    reference = reference_stats.compute_reference_stats("real", extractor, "real", images=iter([real]))
    moments = fid.FeatureMoments()
    moments.add(fid.generated_features(generate, 4, 120, extractor, batch_size=40))
    assert reference_stats.fid_against(reference, moments) == pytest.approx(theirs, rel=1e-4)
    # the same for a random generator with a seed: deterministic
    noise = lambda z: torch.sigmoid(z[:, :1, None, None] * torch.ones(1, 3, 28, 28)) * 255  # noqa: E731
    first = fid.generated_features(noise, 4, 50, extractor, batch_size=20, seed=3)
    np.testing.assert_array_equal(first, fid.generated_features(noise, 4, 50, extractor, batch_size=20, seed=3))


def test_fid_stats_command_writes_into_the_experiments_directory_and_loads_by_name_or_url(
        fashion_shards, tmp_path, isolated_cache, s3_bucket, capsys):
    """Named statistics live with the experiment (OUTPUT_DIR/fid-stats, eval.fid_stats_dir, or
    --out), never in the user's cache; the command shows its progress."""
    extractor_file = tmp_path / "extractor.safetensors"
    torch.manual_seed(0)
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=16)), str(extractor_file))
    common = ["--feature-extractor", str(extractor_file), "--device", "cpu", "--kid-features", "100", "--limit", "250"]
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "fm-train", "--config",
                     "configs/swissroll.yaml", "--set", f"output_dir={tmp_path / 'runs'}", *common]) == 0
    captured = capsys.readouterr()
    written = tmp_path / "runs" / "fid-stats" / "fm-train.npz"
    assert captured.out.splitlines()[0] == f"wrote {written}" and "use with --stats fm-train" in captured.out
    assert "250/250" in captured.err and "img/s" in captured.err  # the progress bar
    assert not isolated_cache.exists()  # nothing in the user-global cache
    by_name = reference_stats.load_reference_stats("fm-train", directory=str(tmp_path / "runs" / "fid-stats"),
                                                   with_kid=True)
    assert by_name.location == str(written)

    # an S3 prefix as the experiment's directory (eval.fid_stats_dir), and --out
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "fm-train", "--set",
                     f"eval.fid_stats_dir=s3://{s3_bucket}/fid", *common]) == 0
    assert f"wrote s3://{s3_bucket}/fid/fm-train.npz" in capsys.readouterr().out
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "fm-train", "--out",
                     str(tmp_path / "elsewhere.npz"), *common]) == 0
    assert f"use with --stats {tmp_path / 'elsewhere.npz'}" in capsys.readouterr().out
    from_s3 = reference_stats.load_reference_stats(f"s3://{s3_bucket}/fid/fm-train.npz")
    assert by_name.id == from_s3.id == reference_stats.load_reference_stats(str(tmp_path / "elsewhere.npz")).id
    assert by_name.count == 250 and by_name.image_shape == [1, 28, 28]
    assert by_name.feature_extractor == str(extractor_file) and by_name.kid_features.shape == (100, 16)
    assert by_name.feature_extractor_id == load_domain_extractor(str(extractor_file)).id
    # computed with clean-fid's own moments: np.mean / np.cov over the features
    extractor = fid.load_extractor(str(extractor_file), device=torch.device("cpu"))
    features = np.concatenate([fid.real_image_features(b, extractor) for b in batches(
        str(fashion_shards / "train"), 250)])
    np.testing.assert_allclose(by_name.mu, features.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(by_name.sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-8)
    # statistics are only used with the extractor they were computed with
    with pytest.raises(fid.FidError, match="computed with feature extractor"):
        reference_stats.check_comparable(by_name, small_extractor(), "fm-train")
    with pytest.raises(fid.FidError, match="gapm fid-stats SHARDS --name nope"):
        reference_stats.load_reference_stats("nope", directory=str(tmp_path / "runs" / "fid-stats"))


def test_named_statistics_resolve_in_the_experiments_directory(tmp_path, monkeypatch, isolated_cache):
    assert reference_stats.stats_directory() == "runs/fid-stats"
    assert reference_stats.stats_directory(None, tmp_path) == str(tmp_path / "fid-stats")
    monkeypatch.setenv(reference_stats.STATS_DIR_ENV, "s3://team/fid-stats/")
    assert reference_stats.stats_directory(None, tmp_path) == "s3://team/fid-stats"
    assert reference_stats.stats_directory("/data/stats", tmp_path) == "/data/stats"  # the config's key wins
    assert reference_stats.stats_location("celeba64-train") == "s3://team/fid-stats/celeba64-train.npz"
    for explicit in ("s3://b/x.npz", "stats/x.npz", "x.npz", "cleanfid:cifar10/train/32"):
        assert reference_stats.stats_location(explicit) == explicit
    # statistics an older gapm kept in the cache are not used, but the error says where they are
    legacy = isolated_cache / "fid-stats" / "old.npz"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    with pytest.raises(fid.FidError, match=f"older gapm kept them in its cache, {legacy}: move that file to "
                                           f"{tmp_path / 'fid-stats' / 'old.npz'}"):
        reference_stats.load_reference_stats("old", directory=str(tmp_path / "fid-stats"))


def test_statistics_in_s3_are_cached_by_etag_and_the_cache_is_only_a_cache(tmp_path, isolated_cache, s3_bucket):
    def stats(shift: float) -> reference_stats.ReferenceStats:
        return reference_stats.ReferenceStats(mu=np.full(4, shift), sigma=np.eye(4), count=10, name="s",
                                              feature_extractor_id="test", feature_extractor="test",
                                              image_shape=[1, 28, 28], data="test")

    url = f"s3://{s3_bucket}/fid-stats/s.npz"
    reference_stats.save_reference_stats(stats(0.0), out=url)
    first = reference_stats.load_reference_stats("s", directory=f"s3://{s3_bucket}/fid-stats")
    assert first.location == url and first.mu[0] == 0.0
    cached = list((isolated_cache / "fid-stats").glob("s-*.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(stats(5.0).to_npz_bytes())  # mark the cached copy
    assert reference_stats.load_reference_stats(url).mu[0] == 5.0  # read from the cache: no download
    reference_stats.save_reference_stats(stats(1.0), out=url)  # recomputed in place: a new ETag
    assert reference_stats.load_reference_stats(url).mu[0] == 1.0  # never a stale copy
    for file in (isolated_cache / "fid-stats").glob("*.npz"):
        file.unlink()
    assert reference_stats.load_reference_stats(url).mu[0] == 1.0  # a lost cache loses nothing
    storage.delete(url)
    with pytest.raises(fid.FidError, match=f"no reference statistics at {url}"):
        reference_stats.load_reference_stats(url)


def test_missing_inception_weights_fail_fast_and_say_how_to_stage_them(tmp_path, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nobody listens on: the download fails at once
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "CLEANFID_INCEPTION_PATH", tmp_path / "not-there" / fid.INCEPTION_FILE)
    monkeypatch.setenv(fid.INCEPTION_URL_ENV, f"http://127.0.0.1:{dead_port}/inception-2015-12-05.pt")
    started = time.monotonic()
    with pytest.raises(fid.FidError) as caught:
        fid.load_extractor("inception", device=torch.device("cpu"))
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert fid.INCEPTION_WEIGHTS_ENV in message and "--inception-weights" in message and "s3://" in message
    assert "downloading" in message and not (tmp_path / "cache" / "gapm" / fid.INCEPTION_FILE).exists()
    monkeypatch.setenv(fid.INCEPTION_DOWNLOAD_ENV, "0")
    with pytest.raises(fid.FidError, match="downloads are off"):
        fid.resolve_inception_weights()
    assert cli.main(["fid-stats", str(tmp_path), "--name", "x", "--inception-weights", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


class _FakeInceptionLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


class _FakeInception(nn.Module):
    """What clean-fid's InceptionV3W needs of the TorchScript file: `.layers`, 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_weights_from_s3_are_staged_once_and_loaded_by_cleanfid(tmp_path, monkeypatch, s3_bucket):
    weights = tmp_path / "my-inception.pt"
    torch.jit.script(_FakeInception()).save(str(weights))
    storage.upload_file(str(weights), f"s3://{s3_bucket}/models/inception-2015-12-05.pt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(fid.INCEPTION_WEIGHTS_ENV, f"s3://{s3_bucket}/models/inception-2015-12-05.pt")
    monkeypatch.setenv(fid.INCEPTION_URL_ENV, "http://127.0.0.1:9/never-used")
    extractor = fid.load_extractor("inception", device=torch.device("cpu"))
    assert extractor.id == fid.INCEPTION_ID and extractor.input_size == (299, 299)
    staged = list((tmp_path / "cache" / "gapm" / "inception").rglob(fid.INCEPTION_FILE))
    assert len(staged) == 1
    features = fid.real_image_features(torch.rand(3, 1, 28, 28), extractor)
    assert features.shape == (3, 2048)
    # a local path of any name works too; a file that is not TorchScript is named in the error
    assert fid.load_extractor("inception", inception_weights=str(weights), device=torch.device("cpu")).id == fid.INCEPTION_ID
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(fid.FidError, match="cannot load Inception weights"):
        fid.load_extractor("inception", inception_weights=str(junk), device=torch.device("cpu"))


def test_domain_feature_extractor_tells_real_from_blurred_and_noise(fashion_shards, tmp_path, capsys):
    """A classifier trained by `gapm train-feature-extractor` on real Fashion-MNIST: FID of
    real test images vs real training images is far below FID of blurred images or noise."""
    out = tmp_path / "fashion-features.safetensors"
    assert cli.main(["train-feature-extractor", str(fashion_shards / "train"), "--out", str(out),
                     "--test-data", str(fashion_shards / "test"), "--test-limit", "300", "--epochs", "2",
                     "--feature-dim", "32", "--batch-size", "32", "--lr", "2e-3"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # progress: reading the shards (600 images), then each epoch with its running loss
    assert "600/600" in captured.err and "epoch 2/2" in captured.err and "loss=" in captured.err
    accuracy = float(printed.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.3  # 10 classes: chance is 0.1; ~0.45 after 2 epochs on 600 images
    extractor = fid.load_extractor(str(out), device=torch.device("cpu"))
    train = reference_stats.compute_reference_stats(str(fashion_shards / "train"), extractor, "train")
    test = reference_stats.compute_reference_stats(str(fashion_shards / "test"), extractor, "test", limit=300)

    def blur(batch: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.avg_pool2d(batch, 7, stride=1, padding=3), 7, stride=1, padding=3)

    blurred = reference_stats.compute_reference_stats("blurred", extractor, "b", images=batches(str(fashion_shards / "test"),
                                                                                    300, blur))
    generator = torch.Generator().manual_seed(0)
    noise = reference_stats.compute_reference_stats("noise", extractor, "n",
                                        images=iter([torch.rand(300, 1, 28, 28, generator=generator)]))
    real_vs_real = distance(test, train)
    assert 5 * real_vs_real < distance(blurred, train)
    assert 50 * real_vs_real < distance(noise, train)
    images, labels = labelled_images(str(fashion_shards / "test"), limit=10)
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (10,)


def test_a_second_feature_space_from_a_resnet_with_another_seed(fashion_shards, tmp_path, capsys):
    """`train-feature-extractor --architecture resnet --seed 1` builds another network than the
    default CNN; its features are its own (another identity, other statistics), it separates real
    from noise too, and files written before the choice existed still load as the CNN."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "resnet.safetensors"
    assert cli.main(["train-feature-extractor", str(fashion_shards / "train"), "--out", str(out), "--architecture",
                     "resnet", "--seed", "1", "--epochs", "1", "--feature-dim", "24", "--limit", "300",
                     "--test-data", str(fashion_shards / "test"), "--test-limit", "100"]) == 0
    assert "resnet, seed 1" in capsys.readouterr().out
    loaded = load_domain_extractor(str(out))
    assert loaded.network.shape.architecture == "resnet" and loaded.network.shape.widths == [32, 64]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.network.modules())
    resnet = fid.load_extractor(str(out), device=torch.device("cpu"))
    images = torch.cat(list(batches(str(fashion_shards / "test"), 200)))
    assert fid.real_image_features(images[:4], resnet).shape == (4, 24)
    train = reference_stats.compute_reference_stats(str(fashion_shards / "train"), resnet, "train")
    test = reference_stats.compute_reference_stats("test", resnet, "test", images=iter([images]))
    noise = reference_stats.compute_reference_stats("noise", resnet, "n", images=iter([
        torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))]))
    assert 10 * distance(test, train) < distance(noise, train)

    torch.manual_seed(0)
    cnn_file = tmp_path / "cnn.safetensors"
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=24)), str(cnn_file))
    cnn = fid.load_extractor(str(cnn_file), device=torch.device("cpu"))
    assert cnn.id != resnet.id and load_domain_extractor(str(cnn_file)).network.shape.architecture == "cnn"
    # a file from before the architecture choice (no "architecture" in its shape) is the CNN
    with safe_open(str(cnn_file), framework="pt") as handle:
        metadata = dict(handle.metadata())
    shape = json.loads(metadata["shape"])
    del shape["architecture"]
    save_file(load_file(str(cnn_file)), str(tmp_path / "old.safetensors"), metadata={**metadata, "shape": json.dumps(shape)})
    old = fid.load_extractor(str(tmp_path / "old.safetensors"), device=torch.device("cpu"))
    np.testing.assert_array_equal(fid.real_image_features(images[:8], old), fid.real_image_features(images[:8], cnn))
    with pytest.raises(SystemExit) as stopped:  # argparse: one usage line naming the choices, exit 2
        cli.main(["train-feature-extractor", str(fashion_shards / "train"), "--out", str(out), "--architecture", "vit"])
    assert stopped.value.code == 2 and "choose from 'cnn', 'resnet'" in capsys.readouterr().err


def test_fid_stats_with_held_out_images_records_the_floor_and_the_training_feature_sample(
        fashion_shards, tmp_path, isolated_cache, capsys):
    """`gapm fid-stats --test-data`: the real-vs-real FID floor, the memorisation reference and
    real-vs-real precision/recall go into the .npz and NAME.json; the floor of the training
    images against their own statistics is 0."""
    import json

    extractor_file = tmp_path / "extractor.safetensors"
    torch.manual_seed(0)
    save_domain_extractor(DomainClassifier(DomainNetShape(widths=[4, 8], feature_dim=16)), str(extractor_file))
    common = ["--feature-extractor", str(extractor_file), "--device", "cpu", "--real-features", "200",
              "--out", str(tmp_path / "stats")]
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "fm", "--test-data",
                     str(fashion_shards / "test"), "--test-limit", "300", *common]) == 0
    printed = capsys.readouterr().out
    stats = reference_stats.load_reference_stats(str(tmp_path / "stats" / "fm.npz"))
    floor = stats.floor
    assert stats.count == 600 and stats.real_features.shape == (200, 16)
    assert floor["samples"] == 300 and floor["data"] == str(fashion_shards / "test") and floor["prdc_samples"] == 200
    assert 0 < floor["fid"] and 0 < floor["test_train_distance"]
    assert 0.3 < floor["precision"] <= 1 and 0.3 < floor["recall"] <= 1 and 0.3 < floor["coverage"] <= 1
    assert f"FID floor {floor['fid']:.4g} (300 images of {fashion_shards / 'test'}" in printed
    described = json.loads((tmp_path / "stats" / "fm.json").read_text())
    assert described["floor"] == pytest.approx(floor) and described["id"] == stats.id
    # the training images against their own statistics, every one in the sample: floor 0, the
    # real-vs-real metrics at 1 (the held-out side is the same 600 images)
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "self", "--test-data",
                     str(fashion_shards / "train"), *common, "--real-features", "1000"]) == 0
    itself = reference_stats.load_reference_stats(str(tmp_path / "stats" / "self.npz")).floor
    assert itself["fid"] == pytest.approx(0.0, abs=1e-6) and itself["test_train_distance"] == pytest.approx(0, abs=1e-5)
    assert (itself["precision"], itself["recall"], itself["coverage"]) == (1.0, 1.0, 1.0)
    assert itself["fid"] < floor["fid"]
    # without held-out images: no floor, and the command says how to get one
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "plain", *common]) == 0
    assert "no floor (pass --test-data" in capsys.readouterr().out
    assert reference_stats.load_reference_stats(str(tmp_path / "stats" / "plain.npz")).floor is None
    # a wrong held-out URL is named before the training statistics are computed
    assert cli.main(["fid-stats", str(fashion_shards / "train"), "--name", "typo", "--test-data",
                     str(tmp_path / "no-such-test"), *common]) == 2
    captured = capsys.readouterr()
    assert "no-such-test" in captured.err and "reference statistics of" not in captured.err
