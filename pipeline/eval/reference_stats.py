"""FID reference statistics: the mean and covariance of the features of a set of real images
(plus a sample of the features, for KID), computed from a shard set with `gapm fid-stats`, saved
as an `.npz` (clean-fid's `mu` / `sigma` plus the feature extractor's identity, the image shape,
the count and the source data) by name or at any path / s3:// URL, and compared against.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from pipeline.data import storage
from pipeline.eval.fid import (
    CLEANFID_PREFIX,
    DEFAULT_KID_FEATURES,
    DOWNLOAD_TIMEOUT_S,
    INCEPTION,
    INCEPTION_ID,
    MODE,
    FeatureExtractor,
    FeatureMoments,
    FidError,
    cache_dir,
    frechet_distance,
    real_image_features,
    stats_dir,
)

log = logging.getLogger(__name__)


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
