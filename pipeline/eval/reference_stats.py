"""FID reference statistics: the mean and covariance of the features of a set of real images
(plus a sample of the features, for KID), computed from a shard set with `gapm fid-stats`, saved
as an `.npz` (clean-fid's `mu` / `sigma` plus the feature extractor's identity, the image shape,
the count and the source data), and compared against.

Where they live. Statistics belong to the experiment, like its runs and checkpoints: a name
(`--stats NAME`) means NAME.npz in the experiment's statistics directory, which is
  `eval.fid_stats_dir` of the experiment config (a directory or an s3:// prefix), else
  $GAPM_FID_STATS_DIR, else `<output_dir>/fid-stats` next to the run directories (output_dir of
  the config; of a checkpoint's run: the run directory's parent; with neither: `runs`).
An explicit path or s3:// URL works anywhere a name does. Every score records the location and
the identity of the statistics it was computed against (the result tag on the MLflow run).
Statistics in S3 are cached locally (~/.cache/gapm/fid-stats/, keyed on the URL and the
object's ETag): deleting the cache loses nothing.
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

from pipeline import console
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
    location: str = ""  # where they were read from (not stored in the file)

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
    total = limit
    if stream is None:
        from pipeline.data import streaming

        stream = streaming.make_batch_stream(data, batch_size, drop_last=False, shuffle_buffer=0)
        known = stream.samples_per_pass()
        total = known if limit is None else (min(limit, known) if known is not None else limit)
    moments, kept, shape = FeatureMoments(), [], None
    started = time.perf_counter()
    with console.progress_bar(total, f"reference statistics of {data}", unit="img") as progress:
        for batch in stream:
            if batch.dim() != 4:
                raise FidError(f"{data} holds points of shape {tuple(batch.shape[1:])}, not images: "
                               "FID is for image data")
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
            progress.update(len(batch))
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


STATS_DIR_ENV = "GAPM_FID_STATS_DIR"
STATS_SUBDIR = "fid-stats"  # under output_dir, next to the run directories
DEFAULT_OUTPUT_DIR = "runs"  # ExperimentConfig.output_dir's default


def stats_directory(fid_stats_dir: str | None = None, output_dir: str | Path | None = None) -> str:
    """The experiment's statistics directory (see the module doc): `fid_stats_dir` (the config's
    eval.fid_stats_dir), else $GAPM_FID_STATS_DIR, else <output_dir>/fid-stats."""
    chosen = fid_stats_dir or os.environ.get(STATS_DIR_ENV)
    if chosen:
        return chosen.rstrip("/") if storage.is_s3_url(chosen) else chosen
    return str(Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR) / STATS_SUBDIR)


def is_plain_name(name_or_url: str) -> bool:
    return not ("/" in name_or_url or "\\" in name_or_url or ":" in name_or_url or name_or_url.endswith(".npz"))


def stats_location(name_or_url: str, directory: str | None = None) -> str:
    """A plain name -> <directory>/NAME.npz (directory: `stats_directory()`); a path or URL as it is."""
    if not is_plain_name(name_or_url):
        return name_or_url
    return storage.join_url(directory or stats_directory(), f"{name_or_url}.npz")


def save_reference_stats(stats: ReferenceStats, directory: str | None = None, out: str | None = None) -> str:
    """Writes NAME.npz into the statistics `directory` (default: `stats_directory()`), or to
    `out` instead (an .npz path/URL, or a directory / s3:// prefix that gets NAME.npz).
    Returns the location."""
    if out:
        target = out if out.endswith(".npz") else storage.join_url(out, f"{stats.name}.npz")
    else:
        target = stats_location(stats.name, directory)
    storage.write_bytes(target, stats.to_npz_bytes())
    return target


def _read_through_cache(location: str) -> bytes:
    """Local files are read; S3 objects come from the local cache when their ETag is unchanged."""
    if not storage.is_s3_url(location):
        return storage.read_bytes(location)
    version = storage.version(location)
    if version is None:
        raise FidError(f"no reference statistics at {location}; check the URL, or compute them with "
                       "`gapm fid-stats SHARDS --name NAME` (eval.fid_stats_dir / --out)")
    digest = hashlib.sha256(f"{location}\n{version}".encode()).hexdigest()[:24]
    cached = cache_dir() / STATS_SUBDIR / f"{Path(location).stem}-{digest}.npz"
    if cached.is_file():
        return cached.read_bytes()
    data = storage.read_bytes(location)
    try:
        storage.write_bytes(str(cached), data)
    except storage.StorageError as error:  # a read-only home directory: no cache, no harm
        log.debug("not caching %s at %s: %s", location, cached, error)
    return data


def load_reference_stats(name_or_url: str, *, directory: str | None = None, with_kid: bool = False
                         ) -> ReferenceStats:
    """The statistics named `name_or_url` (a name in `directory`, default `stats_directory()`;
    a path; an s3:// URL; or cleanfid:DATASET/SPLIT/RES)."""
    if name_or_url.startswith(CLEANFID_PREFIX):
        return cleanfid_published_stats(name_or_url, with_kid=with_kid)
    location = stats_location(name_or_url, directory)
    if not storage.is_s3_url(location) and not os.path.isfile(storage.local_path(location)):
        if is_plain_name(name_or_url):
            hint = (f"compute them with `gapm fid-stats SHARDS --name {name_or_url}` (with the experiment's "
                    f"--config), or set eval.fid_stats_dir / {STATS_DIR_ENV} to where they are")
            legacy = cache_dir() / STATS_SUBDIR / f"{name_or_url}.npz"
            if legacy.is_file():
                hint = (f"an older gapm kept them in its cache, {legacy}: move that file to {location} (statistics "
                        "now live with the experiment)")
        else:
            hint = "check the path, or compute them with `gapm fid-stats SHARDS --name NAME --out URL`"
        raise FidError(f"no reference statistics at {location}; {hint}")
    stats = ReferenceStats.from_npz_bytes(_read_through_cache(location), location)
    stats.location = location
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
                          kid_features=kid, location=spec)


def check_comparable(stats: ReferenceStats, extractor: FeatureExtractor, where: str) -> None:
    if stats.feature_extractor_id != extractor.id:
        raise FidError(f"reference statistics {where} were computed with feature extractor "
                       f"{stats.feature_extractor_id} ({stats.feature_extractor}), not {extractor.id} "
                       f"({extractor.location}); use that extractor or recompute the statistics with this one")


def fid_against(stats: ReferenceStats, moments: FeatureMoments) -> float:
    mu, sigma = moments.mean_and_covariance()
    return frechet_distance(mu, sigma, stats.mu, stats.sigma)
