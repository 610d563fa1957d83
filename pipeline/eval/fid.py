"""FID with clean-fid: feature extractors, reference statistics, scores of generated samples.

Everything goes through clean-fid's own pieces, so numbers match `cleanfid.fid.compute_fid`:
  * preprocessing: `cleanfid.resize.build_resizer("clean")` (PIL bicubic on float32, one
    channel at a time, to 299x299) on uint8-valued images; grayscale becomes three equal
    channels (as PIL's convert("RGB") does in clean-fid's folder reader);
  * generated images: `cleanfid.fid.get_model_features(gen, ...)` with `gen(z)` returning
    float images in [0, 255], shape (B, 3, H, W), z ~ N(0, I) of the model's prior size;
  * real images: the same resize, then `cleanfid.fid.get_batch_features`;
  * the score: clean-fid's `frechet_distance` (reproduced here: see that function), KID:
    `cleanfid.fid.kernel_distance`.

Feature extractors: clean-fid's Inception (`mode="clean"`, the TorchScript file
inception-2015-12-05.pt), a domain classifier of pipeline.eval.features (its own input
size, resized with the same PIL-bicubic resizer), or any callable (tests). Inception weights
never come from the network behind the user's back with no way out: an explicit path or
s3:// URL (`--inception-weights`, GAPM_INCEPTION_WEIGHTS), clean-fid's own place
/tmp/inception-2015-12-05.pt, the gapm cache, and only then one download attempt with a
short timeout (GAPM_INCEPTION_URL names a mirror; GAPM_INCEPTION_DOWNLOAD=0 forbids it);
failing all of that, one error that says how to stage the file.

Reference statistics are an .npz holding clean-fid's `mu` and `sigma` plus what they are
comparable with: the feature extractor's identity (Inception, or the sha256 of a domain
extractor's file), the image shape, the sample count, the data they came from, and a sample
of the features for KID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.data import storage
from pipeline.errors import GapmError
from pipeline.eval.features import DomainFeatures, load_domain_extractor

log = logging.getLogger(__name__)

MODE = "clean"
INCEPTION = "inception"
INCEPTION_ID = "inception-2015-12-05"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_INPUT = (299, 299)
INCEPTION_WEIGHTS_ENV = "GAPM_INCEPTION_WEIGHTS"
INCEPTION_URL_ENV = "GAPM_INCEPTION_URL"
INCEPTION_DOWNLOAD_ENV = "GAPM_INCEPTION_DOWNLOAD"
# Where clean-fid itself looks for (and downloads) the file: cleanfid.features.feature_extractor.
CLEANFID_INCEPTION_PATH = Path("/tmp") / INCEPTION_FILE
DOWNLOAD_TIMEOUT_S = 15.0
CLEANFID_PREFIX = "cleanfid:"
DEFAULT_KID_FEATURES = 5000


class FidError(GapmError):
    """FID cannot be computed as asked; the message says what to provide."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "gapm"


# --------------------------------------------------------------------------- feature extractors


@dataclass
class FeatureExtractor:
    """What clean-fid calls a feature model, plus what it is and what input it wants."""

    id: str  # identity of the features: statistics are comparable only under the same id
    network: Callable[[Tensor], Tensor]  # (B, 3, S, S) float [0, 255] on `device` -> (B, D)
    input_size: tuple[int, int] = INCEPTION_INPUT  # (width, height) after clean-fid's resize
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    location: str = INCEPTION  # how to get it again: "inception" or a weights file

    def resizer(self) -> Callable[[np.ndarray], np.ndarray]:
        from cleanfid.resize import build_resizer, make_resizer

        if tuple(self.input_size) == INCEPTION_INPUT:
            return build_resizer(MODE)
        return make_resizer("PIL", False, "bicubic", tuple(self.input_size))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_inception_weights(source: str | None = None) -> Path:
    """The local path of inception-2015-12-05.pt; see the module docstring for the order."""
    source = source or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if source:
        if storage.is_s3_url(source):
            staged = cache_dir() / "inception" / hashlib.sha256(source.encode()).hexdigest()[:16] / INCEPTION_FILE
            if not staged.is_file():
                log.info("staging Inception weights %s -> %s", source, staged)
                storage.download_file(source, str(staged))
            return staged
        path = Path(storage.local_path(source))
        if not path.is_file():
            raise FidError(f"Inception weights {source} (--inception-weights / {INCEPTION_WEIGHTS_ENV}): no such "
                           f"file; point it at a copy of {INCEPTION_FILE} (local path or s3:// URL)")
        return path
    for candidate in (CLEANFID_INCEPTION_PATH, cache_dir() / INCEPTION_FILE):
        if candidate.is_file():
            return candidate
    return _download_inception(cache_dir() / INCEPTION_FILE)


def _download_inception(target: Path) -> Path:
    from cleanfid.downloads_helper import inception_url

    url = os.environ.get(INCEPTION_URL_ENV) or inception_url
    how_to_stage = (
        f"stage the file: on a machine with internet `curl -LO {inception_url}`, then either copy it to "
        f"{CLEANFID_INCEPTION_PATH} on this machine or upload it (`aws s3 cp {INCEPTION_FILE} "
        f"s3://BUCKET/models/`) and set {INCEPTION_WEIGHTS_ENV}=s3://BUCKET/models/{INCEPTION_FILE} (or pass "
        "--inception-weights); or use a domain feature extractor (`gapm train-feature-extractor`)")
    if os.environ.get(INCEPTION_DOWNLOAD_ENV, "1").lower() in ("0", "false", "no"):
        raise FidError(f"Inception weights not found ({INCEPTION_WEIGHTS_ENV} unset, no {CLEANFID_INCEPTION_PATH}) "
                       f"and downloads are off ({INCEPTION_DOWNLOAD_ENV}=0); {how_to_stage}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        log.info("downloading Inception weights from %s (timeout %.0fs)", url, DOWNLOAD_TIMEOUT_S)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    except (OSError, urllib.error.URLError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise FidError(f"Inception weights not found ({INCEPTION_WEIGHTS_ENV} unset, no {CLEANFID_INCEPTION_PATH}) "
                       f"and downloading {url} failed ({error}); {how_to_stage}") from None
    return target


def inception_extractor(weights: str | None = None, device: torch.device | None = None) -> FeatureExtractor:
    """clean-fid's Inception (mode "clean": the network gets 299x299 images, no resize inside)."""
    from cleanfid.inception_torchscript import InceptionV3W

    device = device or default_device()
    path = resolve_inception_weights(weights)
    with tempfile.TemporaryDirectory() as folder:
        # InceptionV3W loads <folder>/inception-2015-12-05.pt; download=False: never fetch.
        os.symlink(path.resolve(), os.path.join(folder, INCEPTION_FILE))
        try:
            model = InceptionV3W(folder, download=False, resize_inside=False).to(device).eval()
        except (RuntimeError, OSError, AttributeError, ValueError) as error:
            raise FidError(f"cannot load Inception weights {path} ({str(error).splitlines()[0][:200]}); expected "
                           f"clean-fid's TorchScript {INCEPTION_FILE}") from None

    def network(images: Tensor) -> Tensor:
        with torch.no_grad():
            return model(images)

    return FeatureExtractor(id=INCEPTION_ID, network=network, input_size=INCEPTION_INPUT, device=device,
                            location=INCEPTION)


def domain_extractor(location: str, device: torch.device | None = None) -> FeatureExtractor:
    device = device or default_device()
    loaded = load_domain_extractor(location)
    module = DomainFeatures(loaded.network).to(device)
    size = loaded.network.shape.image_size
    return FeatureExtractor(id=loaded.id, network=module, input_size=(size, size), device=device, location=location)


def load_extractor(name: str | None, *, inception_weights: str | None = None,
                   device: torch.device | None = None) -> FeatureExtractor:
    """'inception' (or None) -> clean-fid's Inception; anything else: a domain extractor file."""
    if name in (None, "", INCEPTION):
        return inception_extractor(inception_weights, device)
    return domain_extractor(name, device)


# --------------------------------------------------------------------------- features


def to_rgb_255(images: Tensor) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 3, H, W) float32 in [0, 255]; grayscale repeated."""
    images = images.float().clamp(0, 1) * 255.0
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise FidError(f"FID needs 1- or 3-channel images, got {images.shape[1]} channels")
    return images


def clean_resize(images_255: Tensor, resize: Callable[[np.ndarray], np.ndarray]) -> Tensor:
    """clean-fid's per-image preprocessing (as in get_model_features and ResizeDataset)."""
    resized = [torch.from_numpy(np.ascontiguousarray(resize(image.numpy().transpose(1, 2, 0)).transpose(2, 0, 1)))
               for image in images_255.detach().cpu()]
    return torch.stack(resized).float()


def real_image_features(images: Tensor, extractor: FeatureExtractor) -> np.ndarray:
    """Features of real images given in [0, 1] (decoded 8-bit data: values k/255)."""
    from cleanfid.fid import get_batch_features

    as_uint8 = to_rgb_255(images).round()  # the exact 8-bit values the files hold
    return get_batch_features(clean_resize(as_uint8, extractor.resizer()), extractor.network, extractor.device)


def generated_features(generate: Callable[[Tensor], Tensor], z_dim: int, count: int,
                       extractor: FeatureExtractor, *, batch_size: int = 250, seed: int = 0) -> np.ndarray:
    """clean-fid's get_model_features: `generate(z)` -> float images (B, 3, H, W) in [0, 255]."""
    return generated_features_in_spaces(generate, z_dim, count, [extractor], batch_size=batch_size, seed=seed)[0]


def generated_features_in_spaces(generate: Callable[[Tensor], Tensor], z_dim: int, count: int,
                                 extractors: list[FeatureExtractor], *, batch_size: int = 250,
                                 seed: int = 0) -> list[np.ndarray]:
    """The features of `count` generated images in each feature space: every batch is generated
    once and handed to clean-fid's `get_model_features` of each extractor (its resize, its
    feature batch), so each space's features are what clean-fid computes for that generator.
    z ~ N(0, I) of `z_dim` comes from a generator seeded here (gapm's models draw their own
    noise and use z only for the batch size); batches are min(batch_size, count) images, the
    last one cut, as clean-fid does."""
    from cleanfid.fid import get_model_features

    if count <= 0:
        return [np.zeros((0, 0), dtype=np.float32) for _ in extractors]
    size = min(batch_size, count)
    noise = torch.Generator().manual_seed(seed)
    found: list[list[np.ndarray]] = [[] for _ in extractors]
    for _ in range(-(-count // size)):
        images = generate(torch.randn(size, z_dim, generator=noise).to(extractors[0].device))
        for index, extractor in enumerate(extractors):
            found[index].append(get_model_features(lambda z, images=images: images, extractor.network, mode=MODE,
                                                   z_dim=z_dim, num_gen=size, batch_size=size,
                                                   device=extractor.device, verbose=False,
                                                   custom_fn_resize=extractor.resizer()))
    return [np.concatenate(features)[:count] for features in found]


@dataclass
class FeatureMoments:
    """Running sums for mean and covariance in float64: ranks add theirs and all-reduce
    them instead of gathering every feature vector."""

    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        if len(features) == 0:
            return
        features = np.asarray(features, dtype=np.float64)
        if self.total is None:
            self.total = np.zeros(features.shape[1])
            self.outer = np.zeros((features.shape[1], features.shape[1]))
        self.count += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise FidError(f"FID needs at least 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)  # = np.cov(rowvar=False)
        return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """clean-fid's `frechet_distance` (D. Sutherland's stable version), line for line. Not
    imported: clean-fid 0.1.35 calls scipy's sqrtm(..., disp=False), which SciPy 1.18 removed
    (TypeError there); tests check both give the same number where both run."""
    import warnings

    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FidError(f"feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}): the statistics were computed "
                       "with another feature extractor")

    def sqrtm(matrix: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # singular products are handled below, as clean-fid does
            return linalg.sqrtm(matrix)

    diff = mu1 - mu2
    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.info("FID: singular product; adding %g to the diagonal of the covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FidError(f"FID: the covariance product has an imaginary square root "
                           f"({np.max(np.abs(covmean.imag)):.3g}); use more samples than feature dimensions")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID (100 subsets of up to 1000), with numpy's global RNG seeded."""
    from cleanfid.fid import kernel_distance

    if min(len(features1), len(features2)) < 2:
        raise FidError("KID needs at least 2 feature vectors on each side")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(np.asarray(features1), np.asarray(features2)))
    finally:
        np.random.set_state(state)
