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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.data import storage
from pipeline.errors import GapmError

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
STATS_DIR_ENV = "GAPM_FID_STATS_DIR"
CLEANFID_PREFIX = "cleanfid:"
DEFAULT_KID_FEATURES = 5000


class FidError(GapmError):
    """FID cannot be computed as asked; the message says what to provide."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "gapm"


def stats_dir() -> Path:
    """Where `gapm fid-stats --name NAME` keeps NAME.npz (GAPM_FID_STATS_DIR overrides)."""
    return Path(os.environ.get(STATS_DIR_ENV) or cache_dir() / "fid-stats")


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
    from pipeline.eval.features import DomainFeatures, load_domain_extractor

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
                       extractor: FeatureExtractor, *, batch_size: int = 250, seed: int = 0,
                       verbose: bool = False) -> np.ndarray:
    """clean-fid's get_model_features: `generate(z)` -> float images (B, 3, H, W) in [0, 255].
    z ~ N(0, I) comes from torch's global generator, seeded here."""
    from cleanfid.fid import get_model_features

    if count <= 0:
        return np.zeros((0, 0), dtype=np.float32)
    torch.manual_seed(seed)
    return get_model_features(generate, extractor.network, mode=MODE, z_dim=z_dim, num_gen=count,
                              batch_size=min(batch_size, count), device=extractor.device, verbose=verbose,
                              custom_fn_resize=extractor.resizer(), desc="FID samples: ")


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


# --------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    name: str
    feature_extractor_id: str
    feature_extractor: str  # "inception" or the location of the domain extractor file
    image_shape: list[int]  # [C, H, W] of the real images
    data: str  # where the images came from
    mode: str = MODE
    kid_features: np.ndarray | None = None  # a sample of the features, for KID
    created: float = 0.0

    @property
    def id(self) -> str:
        """Identity for 'comparable with': same numbers and same features."""
        digest = hashlib.sha256(self.feature_extractor_id.encode())
        digest.update(np.ascontiguousarray(self.mu, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.sigma, dtype=np.float64).tobytes())
        return digest.hexdigest()[:12]

    def to_npz_bytes(self) -> bytes:
        import io

        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.array(self.count), "name": np.array(self.name),
                  "feature_extractor_id": np.array(self.feature_extractor_id),
                  "feature_extractor": np.array(self.feature_extractor),
                  "image_shape": np.array(self.image_shape, dtype=np.int64), "data": np.array(self.data),
                  "mode": np.array(self.mode), "created": np.array(self.created)}
        if self.kid_features is not None:
            arrays["kid_features"] = np.asarray(self.kid_features, dtype=np.float32)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes, where: str) -> "ReferenceStats":
        import io

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                def text(key: str, default: str = "") -> str:
                    return str(npz[key]) if key in npz else default

                return cls(mu=npz["mu"], sigma=npz["sigma"], count=int(npz["count"]) if "count" in npz else 0,
                           name=text("name", Path(where).stem), feature_extractor_id=text("feature_extractor_id",
                                                                                         INCEPTION_ID),
                           feature_extractor=text("feature_extractor", INCEPTION),
                           image_shape=[int(v) for v in npz["image_shape"]] if "image_shape" in npz else [],
                           data=text("data"), mode=text("mode", MODE),
                           kid_features=npz["kid_features"] if "kid_features" in npz else None,
                           created=float(npz["created"]) if "created" in npz else 0.0)
        except (OSError, ValueError, KeyError) as error:
            raise FidError(f"{where} is not a reference statistics file ({error}); recompute it with "
                           "`gapm fid-stats`") from None


def compute_reference_stats(data: str, extractor: FeatureExtractor, name: str, *, limit: int | None = None,
                            batch_size: int = 250, kid_features: int = DEFAULT_KID_FEATURES,
                            images: Iterable[Tensor] | None = None) -> ReferenceStats:
    """Statistics of every image of a shard set (or the first `limit`), in shard order."""
    stream = images
    if stream is None:
        from pipeline.data import streaming

        stream = streaming.make_batch_stream(data, batch_size, drop_last=False, shuffle_buffer=0)
    moments, kept, shape = FeatureMoments(), [], None
    started = time.perf_counter()
    for batch in stream:
        if batch.dim() != 4:
            raise FidError(f"{data} holds points of shape {tuple(batch.shape[1:])}, not images: FID is for image data")
        if limit is not None:
            batch = batch[: max(limit - moments.count, 0)]
        if len(batch) == 0:
            break
        shape = list(batch.shape[1:])
        features = real_image_features(batch, extractor)
        moments.add(features)
        room = kid_features - sum(len(k) for k in kept)
        if room > 0:
            kept.append(features[:room].astype(np.float32))
        if limit is not None and moments.count >= limit:
            break
    corrupt = getattr(getattr(stream, "stats", None), "corrupt_samples", 0)
    if corrupt:
        log.warning("%s: %d corrupt samples skipped", data, corrupt)
    mu, sigma = moments.mean_and_covariance()
    log.info("reference statistics of %d images of %s in %.1fs", moments.count, data, time.perf_counter() - started)
    return ReferenceStats(mu=mu, sigma=sigma, count=moments.count, name=name, feature_extractor_id=extractor.id,
                          feature_extractor=extractor.location, image_shape=shape or [], data=data,
                          kid_features=np.concatenate(kept) if kept else None, created=time.time())


def stats_location(name_or_url: str) -> str:
    """A name (no '/', no '.npz') -> <stats dir>/NAME.npz; anything else is a path or URL."""
    if "/" in name_or_url or name_or_url.endswith(".npz") or "://" in name_or_url:
        return name_or_url
    return str(stats_dir() / f"{name_or_url}.npz")


def save_reference_stats(stats: ReferenceStats, out: str | None = None) -> list[str]:
    """Writes NAME.npz into the local stats directory and, with `out`, also there (a .npz
    URL, or a directory / s3:// prefix that gets NAME.npz). Returns the locations."""
    data = stats.to_npz_bytes()
    written = [str(stats_dir() / f"{stats.name}.npz")]
    storage.write_bytes(written[0], data)
    if out:
        target = out if out.endswith(".npz") else storage.join_url(out, f"{stats.name}.npz")
        storage.write_bytes(target, data)
        written.append(target)
    return written


def load_reference_stats(name_or_url: str, *, with_kid: bool = False) -> ReferenceStats:
    if name_or_url.startswith(CLEANFID_PREFIX):
        return cleanfid_published_stats(name_or_url, with_kid=with_kid)
    location = stats_location(name_or_url)
    if not storage.is_s3_url(location) and not os.path.isfile(storage.local_path(location)):
        hint = (f"compute them with `gapm fid-stats SHARDS --name {name_or_url}`" if location != name_or_url
                else "check the path, or compute them with `gapm fid-stats SHARDS --name NAME --out URL`")
        raise FidError(f"no reference statistics at {location}; {hint}")
    stats = ReferenceStats.from_npz_bytes(storage.read_bytes(location), location)
    if with_kid and stats.kid_features is None:
        raise FidError(f"{location} holds no features for KID; recompute it with `gapm fid-stats` (--kid-features)")
    return stats


def cleanfid_published_stats(spec: str, *, with_kid: bool = False) -> ReferenceStats:
    """`cleanfid:DATASET/SPLIT/RES`, e.g. cleanfid:cifar10/train/32: the statistics clean-fid
    publishes (Inception, mode clean). They are downloaded on first use, so this needs network
    once (or the .npz placed in cleanfid/stats/ by hand)."""
    import cleanfid

    try:
        dataset, split, resolution = spec[len(CLEANFID_PREFIX):].split("/")
        int(resolution)
    except ValueError:
        raise FidError(f"{spec}: expected cleanfid:DATASET/SPLIT/RESOLUTION, e.g. cleanfid:cifar10/train/32") from None
    base = f"{dataset}_{MODE}_{split}_{resolution}".lower()
    folders = [Path(cleanfid.__file__).parent / "stats", cache_dir() / "cleanfid-stats"]

    def fetch(file_name: str) -> Path:
        for folder in folders:
            if (folder / file_name).is_file():
                return folder / file_name
        url = f"https://www.cs.cmu.edu/~clean-fid/stats/{file_name}"
        target = folders[1] / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, urllib.error.URLError) as error:
            raise FidError(f"{spec}: clean-fid's published statistics {file_name} are not here and downloading "
                           f"{url} failed ({error}); they need network once (or put the file into {folders[1]}), "
                           "or compute your own with `gapm fid-stats`") from None
        storage.write_bytes(str(target), data)
        return target

    with np.load(fetch(f"{base}.npz")) as npz:
        mu, sigma = npz["mu"], npz["sigma"]
    kid = None
    if with_kid:
        with np.load(fetch(f"{base}_kid.npz")) as npz:
            kid = npz["feats"]
    channels = 3
    size = int(resolution)
    return ReferenceStats(mu=mu, sigma=sigma, count=0, name=spec, feature_extractor_id=INCEPTION_ID,
                          feature_extractor=INCEPTION, image_shape=[channels, size, size], data=spec,
                          kid_features=kid)


def check_comparable(stats: ReferenceStats, extractor: FeatureExtractor, where: str) -> None:
    if stats.feature_extractor_id != extractor.id:
        raise FidError(f"reference statistics {where} were computed with feature extractor "
                       f"{stats.feature_extractor_id} ({stats.feature_extractor}), not {extractor.id} "
                       f"({extractor.location}); use that extractor or recompute the statistics with this one")


def fid_against(stats: ReferenceStats, moments: FeatureMoments) -> float:
    mu, sigma = moments.mean_and_covariance()
    return frechet_distance(mu, sigma, stats.mu, stats.sigma)
