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

What else they hold (for pipeline.eval.neighbours). A uniform random sample of the training
features (`real_features`, default 10,000, seeded): the real side of precision/recall/density/
coverage and the training set of the memorisation test. With held-out images (`gapm fid-stats
--test-data`), the *floor*: FID of the test images against these statistics (real against
real: what a perfect sampler would score at that sample count), the test images' median
distance to their nearest training sample (the memorisation ratio's denominator), and the
real-vs-real precision/recall/density/coverage at the same counts (what a perfect sampler
gets). The floor is stored in the .npz (`floor`, JSON) and, for people, in NAME.json beside it.
"""

from __future__ import annotations

import hashlib
import json
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
from pipeline.data import storage, streaming
from pipeline.eval import neighbours
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
    real_features: np.ndarray | None = None  # a uniform random sample of the features, random order
    floor: dict | None = None  # real against real (held-out images): see compute_floor

    def description(self) -> dict:
        """Everything but the arrays (NAME.json beside the .npz)."""
        return {"name": self.name, "id": self.id, "count": self.count, "data": self.data, "mode": self.mode,
                "feature_extractor_id": self.feature_extractor_id, "feature_extractor": self.feature_extractor,
                "feature_dim": int(len(self.mu)), "image_shape": list(self.image_shape), "created": self.created,
                "kid_features": 0 if self.kid_features is None else len(self.kid_features),
                "real_features": 0 if self.real_features is None else len(self.real_features),
                "floor": self.floor}

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
        if self.real_features is not None:
            arrays["real_features"] = np.asarray(self.real_features, dtype=np.float32)
        if self.floor is not None:
            arrays["floor"] = np.array(json.dumps(self.floor, sort_keys=True))
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
                           created=float(npz["created"]) if "created" in npz else 0.0,
                           real_features=npz["real_features"] if "real_features" in npz else None,
                           floor=json.loads(text("floor")) if "floor" in npz else None)
        except (OSError, ValueError, KeyError) as error:
            raise FidError(f"{where} is not a reference statistics file ({error}); recompute it with "
                           "`gapm fid-stats`") from None


def compute_reference_stats(data: str, extractor: FeatureExtractor, name: str, *, limit: int | None = None,
                            batch_size: int = 250, kid_features: int = DEFAULT_KID_FEATURES,
                            real_features: int = neighbours.DEFAULT_REAL_FEATURES, sample_seed: int = 0,
                            images: Iterable[Tensor] | None = None) -> ReferenceStats:
    """Statistics of every image of a shard set (or the first `limit`), in shard order; the
    first `kid_features` feature vectors for KID and a random sample of `real_features`."""
    moments, kept, shape, sample = FeatureMoments(), [], None, neighbours.FeatureSample(real_features, sample_seed)
    for features, shape in _image_features(data, extractor, limit, batch_size, images,
                                           f"reference statistics of {data}"):
        moments.add(features)
        sample.add(features)
        room = kid_features - sum(len(k) for k in kept)
        if room > 0:
            kept.append(features[:room].astype(np.float32))
    mu, sigma = moments.mean_and_covariance()
    return ReferenceStats(mu=mu, sigma=sigma, count=moments.count, name=name, feature_extractor_id=extractor.id,
                          feature_extractor=extractor.location, image_shape=shape or [], data=data,
                          kid_features=np.concatenate(kept) if kept else None, created=time.time(),
                          real_features=sample.result())


def compute_floor(stats: ReferenceStats, test_data: str, extractor: FeatureExtractor, *, limit: int | None = None,
                  batch_size: int = 250, nearest_k: int = neighbours.DEFAULT_NEAREST_K, sample_seed: int = 1,
                  images: Iterable[Tensor] | None = None) -> dict:
    """Real against real: held-out images (every one of `test_data`, or the first `limit`)
    scored like generated ones. Sets and returns `stats.floor`."""
    check_comparable(stats, extractor, stats.name)
    moments, shape = FeatureMoments(), None
    sample = neighbours.FeatureSample(len(stats.real_features) if stats.real_features is not None else 0, sample_seed)
    for features, shape in _image_features(test_data, extractor, limit, batch_size, images,
                                           f"FID floor: {test_data}"):
        moments.add(features)
        sample.add(features)
    if stats.image_shape and shape and list(shape) != list(stats.image_shape):
        raise FidError(f"the held-out images {test_data} are {shape}, the statistics' images {stats.image_shape}: "
                       "use the test split of the same dataset")
    floor = {"fid": fid_against(stats, moments), "samples": moments.count, "data": test_data}
    held_out = sample.result()
    if held_out is not None and min(len(held_out), len(stats.real_features)) >= neighbours.minimum_samples(nearest_k):
        count = min(len(held_out), len(stats.real_features))
        floor["test_train_distance"] = float(np.median(neighbours.nearest_distances(held_out, stats.real_features)))
        floor.update(neighbours.precision_recall_density_coverage(stats.real_features[:count], held_out[:count],
                                                                  nearest_k))
        floor.update(prdc_samples=count, nearest_k=nearest_k)
    stats.floor = floor
    return floor


def _image_features(data: str, extractor: FeatureExtractor, limit: int | None, batch_size: int,
                    images: Iterable[Tensor] | None, what: str):
    """(features, image shape) per batch of the shard set `data` (or of `images`)."""
    stream = images
    total = limit
    if stream is None:
        stream = streaming.make_batch_stream(data, batch_size, drop_last=False, shuffle_buffer=0)
        known = stream.samples_per_pass()
        total = known if limit is None else (min(limit, known) if known is not None else limit)
    count = 0
    started = time.perf_counter()
    with console.progress_bar(total, what, unit="img") as progress:
        for batch in stream:
            if batch.dim() != 4:
                raise FidError(f"{data} holds points of shape {tuple(batch.shape[1:])}, not images: "
                               "FID is for image data")
            if limit is not None:
                batch = batch[: max(limit - count, 0)]
            if len(batch) == 0:
                break
            yield real_image_features(batch, extractor), list(batch.shape[1:])
            count += len(batch)
            progress.update(len(batch))
            if limit is not None and count >= limit:
                break
    corrupt = getattr(getattr(stream, "stats", None), "corrupt_samples", 0)
    if corrupt:
        log.warning("%s: %d corrupt samples skipped", data, corrupt)
    log.info("features of %d images of %s in %.1fs", count, data, time.perf_counter() - started)


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
    # for people: what the file is, and its floor (the .npz holds the same)
    storage.write_bytes(target[: -len(".npz")] + ".json", json.dumps(stats.description(), indent=1).encode())
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
