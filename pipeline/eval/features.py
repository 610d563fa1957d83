"""A domain feature extractor for FID: a small CNN classifier trained on the dataset itself.

Inception features (clean-fid's default) are the standard for published numbers, but the
Inception network is 100 MB, slow on a CPU and was trained on ImageNet photographs. For
28x28 grayscale Fashion-MNIST a classifier trained on Fashion-MNIST itself gives a
meaningful distance in seconds on a laptop: its penultimate layer (`feature_dim` ReLU units)
stands in for Inception's pool3 features. Numbers from it are comparable only with numbers
from the very same weights file, which is why every FID statistic records the file's hash.

`gapm train-feature-extractor` trains one from labelled shards (the `.cls` member written by
`gapm shards`) and saves it as safetensors with its shape in the file's metadata, so loading
never executes code from the file. Knows nothing of gapm models, MLflow or clean-fid.

Two architectures, so that a second feature space can be built independently of the first
(another network, another seed: `--architecture resnet --seed 1`): "cnn", plain conv blocks
with max-pooling and a flattened 4x4 map, and "resnet", residual blocks with BatchNorm and
strided downsampling ending in global average pooling. A ranking of models that holds in both
spaces is not an artefact of one network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline import console
from pipeline.data import sample_decode, storage, streaming
from pipeline.data.shards import read_manifest
from pipeline.errors import GapmError

log = logging.getLogger(__name__)

KIND = "gapm-domain-feature-extractor"


class FeatureExtractorError(GapmError):
    """A feature extractor file that cannot be used; the message says what to do."""


ARCHITECTURES = ("cnn", "resnet")
DEFAULT_WIDTHS = {"cnn": [16, 32], "resnet": [32, 64]}


@dataclass
class DomainNetShape:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32])
    feature_dim: int = 128
    architecture: str = "cnn"  # files written before the choice existed are "cnn"


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a skip (a strided 1x1 projection when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out))
        self.skip = nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.residual(x) + self.skip(x))


def feature_body(shape: DomainNetShape) -> nn.Sequential:
    """The network up to the `feature_dim` ReLU features, of `shape.architecture`."""
    if shape.architecture not in ARCHITECTURES:
        raise FeatureExtractorError(f"architecture {shape.architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    layers: list[nn.Module] = []
    channels = shape.in_channels
    if shape.architecture == "cnn":
        for width in shape.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, shape.feature_dim), nn.ReLU()]
        return nn.Sequential(*layers)
    layers += [nn.Conv2d(channels, shape.widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(shape.widths[0]),
               nn.ReLU()]
    channels = shape.widths[0]
    for index, width in enumerate(shape.widths):
        layers += [ResidualBlock(channels, width, stride=1 if index == 0 else 2), ResidualBlock(width, width, 1)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, shape.feature_dim), nn.ReLU()]
    return nn.Sequential(*layers)


class DomainClassifier(nn.Module):
    """A feature body (`feature_body`: "cnn" or "resnet"), ending in a `feature_dim` ReLU layer
    (the FID features), and a linear classifier on top of it."""

    def __init__(self, shape: DomainNetShape):
        super().__init__()
        self.shape = shape
        self.body = feature_body(shape)
        self.classifier = nn.Linear(shape.feature_dim, shape.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """images (B, in_channels, S, S) in [0, 1] -> (B, feature_dim)."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


class DomainFeatures(nn.Module):
    """clean-fid's feature-extractor contract: (B, 3, S, S) float in [0, 255] -> (B, D).
    Grayscale networks read the channel mean (clean-fid feeds grayscale as three equal
    channels)."""

    def __init__(self, network: DomainClassifier):
        super().__init__()
        self.network = network.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.float() / 255.0
        if self.network.shape.in_channels == 1 and images.shape[1] != 1:
            images = images.mean(dim=1, keepdim=True)
        return self.network.features(images)


@dataclass
class LoadedDomainExtractor:
    network: DomainClassifier
    sha256: str  # of the weights file: the identity of the features
    metadata: dict[str, str]

    @property
    def id(self) -> str:
        return f"domain-sha256:{self.sha256[:16]}"


# --------------------------------------------------------------------------- labelled data


def labelled_images(spec: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """All (image, label) pairs of a shard set, in shard order: images (N, C, H, W) uint8,
    labels (N,) int64, decoded as the training reader decodes them (PNG, JPEG or raw pixels,
    the shape from the manifest, else from the first image). Samples without a label (`.cls`)
    or with an unreadable image are skipped and counted in a warning."""
    import webdataset as wds

    streaming.register_s3_opener()
    urls = streaming.resolve_shard_urls(spec)
    decode = sample_decode.SampleDecoder(None)
    try:
        image_info = read_manifest(spec).get("image") or {}
        if image_info:
            decode = sample_decode.SampleDecoder(
                (int(image_info["height"]), int(image_info["width"]), int(image_info["channels"])),
                image_info.get("format"))
    except (storage.StorageError, ValueError, KeyError, TypeError):
        pass
    images, labels, skipped = [], [], 0
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    known = _manifest_count(spec)
    total = limit if known is None else (known if limit is None else min(known, limit))
    progress = console.progress_bar(total, f"reading {spec}", unit="img")
    for sample in dataset:
        if limit is not None and len(images) >= limit:
            break
        progress.update(1)
        try:
            label = int(sample["cls"].decode())
            array = decode(sample)
        except Exception:  # noqa: BLE001 - like the training reader: an unreadable sample is skipped, counted
            skipped += 1
            continue
        if label < 0:
            skipped += 1
            continue
        if decode.image_shape is None:  # no manifest shape: the first image sets it for the rest
            decode = sample_decode.SampleDecoder(array.shape)
        images.append(array)
        labels.append(label)
    progress.close()
    if skipped:
        log.warning("%s: skipped %d samples without a label or with an unreadable image", spec, skipped)
    if not images:
        raise FeatureExtractorError(f"{spec}: no labelled images (the classifier needs the .cls labels "
                                    "that `gapm shards` writes for mnist, fashion-mnist and cifar10)")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)


def _manifest_count(spec: str) -> int | None:
    try:
        return int(read_manifest(spec)["num_samples"])
    except (storage.StorageError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- training


@dataclass
class TrainingReport:
    train_samples: int
    test_samples: int
    train_accuracy: float
    test_accuracy: float | None
    seconds: float


@torch.no_grad()
def accuracy(network: DomainClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    network.eval()
    correct = 0
    for chunk, target in zip(images.split(batch_size), labels.split(batch_size)):
        correct += (network(chunk.float() / 255.0).argmax(dim=1) == target).sum().item()
    return correct / max(len(labels), 1)


def train_domain_classifier(images: Tensor, labels: Tensor, *, epochs: int = 5, batch_size: int = 128,
                            lr: float = 1e-3, feature_dim: int = 128, widths: list[int] | None = None,
                            architecture: str = "cnn", seed: int = 0, test: tuple[Tensor, Tensor] | None = None
                            ) -> tuple[DomainClassifier, TrainingReport]:
    """Adam + cross-entropy, light augmentation (random 1-pixel shifts) so that the features
    do not depend on exact pixel positions."""
    if images.shape[-1] != images.shape[-2]:
        raise FeatureExtractorError(f"square images expected, got {tuple(images.shape[1:])}")
    torch.manual_seed(seed)
    shape = DomainNetShape(in_channels=images.shape[1], image_size=images.shape[-1],
                           num_classes=int(labels.max().item()) + 1,
                           widths=list(widths or DEFAULT_WIDTHS.get(architecture, [16, 32])), feature_dim=feature_dim,
                           architecture=architecture)
    network = DomainClassifier(shape)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        with console.progress_bar(len(images), f"epoch {epoch + 1}/{epochs}", unit="img") as progress:
            for index in range(0, len(order), batch_size):
                batch = images[order[index:index + batch_size]].float() / 255.0
                shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
                batch = torch.roll(batch, shifts=shift, dims=(2, 3))
                loss = nn.functional.cross_entropy(network(batch), labels[order[index:index + batch_size]])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
                progress.update(len(batch))
                progress.set_postfix(loss=f"{total_loss / progress.n:.4f}", refresh=False)
        log.info("feature extractor epoch %d/%d: loss %.4f", epoch + 1, epochs, total_loss / len(images))
    report = TrainingReport(train_samples=len(images), test_samples=len(test[1]) if test else 0,
                            train_accuracy=accuracy(network, images, labels),
                            test_accuracy=accuracy(network, *test) if test else None,
                            seconds=time.perf_counter() - start)
    return network.eval(), report


# --------------------------------------------------------------------------- files


def save_domain_extractor(network: DomainClassifier, location: str, extra: dict[str, str] | None = None) -> str:
    """Writes safetensors (local path or s3:// URL); returns the sha256 of the file."""
    metadata = {"kind": KIND, "shape": json.dumps(asdict(network.shape)), **(extra or {})}
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, "extractor.safetensors")
        save_file(weights, local, metadata=metadata)
        digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()
        storage.upload_file(local, location)
    return digest


def load_domain_extractor(location: str) -> LoadedDomainExtractor:
    """Reads a file written by `save_domain_extractor` (local path or s3:// URL)."""
    with tempfile.TemporaryDirectory() as scratch:
        local = storage.local_path(location)
        if storage.is_s3_url(location):
            local = os.path.join(scratch, "extractor.safetensors")
            storage.download_file(location, local)
        elif not os.path.isfile(local):
            raise FeatureExtractorError(
                f"feature extractor {location}: no such file; pass 'inception' or the path/s3:// URL of a "
                "file written by `gapm train-feature-extractor`")
        try:
            with safe_open(local, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            if metadata.get("kind") != KIND:
                raise ValueError(f"metadata kind is {metadata.get('kind')!r}, not {KIND!r}")
            network = DomainClassifier(DomainNetShape(**json.loads(metadata["shape"])))
            network.load_state_dict(load_file(local))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as error:
            raise FeatureExtractorError(
                f"feature extractor {location} is not a gapm domain feature extractor ({error}); write one "
                "with `gapm train-feature-extractor` or use 'inception'") from None
        digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    return LoadedDomainExtractor(network=network.eval(), sha256=digest, metadata=metadata)
