"""Stream WebDataset shards (plain path, file:// or s3://) into batches for one rank.

Why this is not just ``webdataset.WebDataset(url)``:

* DDP needs every rank to run the same number of steps, or the ranks deadlock in an all-reduce.
  Each rank therefore reads its own slice of the shards, cycles through that slice if it runs
  dry, and stops after exactly ``batches_per_epoch`` batches (``with_epoch`` on the loader).
* Fewer shards than ranks x workers would leave some reader with no data (a hang, or silently
  repeated samples); that is refused up front with the fix in the message.
* A corrupt sample or a damaged shard must not kill a long run: it is skipped, counted in
  :class:`StreamStats` and logged with its shard URL and key. An outage is not damage: it is
  waited out at the same byte (pipeline/data/s3_stream.py), or ends the stream with
  StorageUnavailable once the retry budget is spent.
* ``s3://`` is read through boto3 (streaming ``get_object()["Body"]``), so no ``aws`` CLI is needed.
* Loader workers die with the process that started them (a parent-death signal): a training
  process killed with SIGKILL leaves no orphaned workers holding memory.
* A tar member larger than ``max_member_bytes`` is refused unread; the default is
  `MEMBER_CAP_FACTOR` times the largest member the manifest records (``max_member_bytes``,
  written by ``gapm shards``), at least `MEMBER_CAP_FLOOR`, or `MEMBER_CAP_WITHOUT_MANIFEST`
  for shards whose manifest does not record it.

The result is a plain iterable of tensors. Do not pass it through ``accelerator.prepare`` (that
would dispatch every batch from rank 0); move batches to the device in the training loop.

Shuffling is deterministic given (seed, epoch): the shard order of an epoch is the same
permutation on every rank (so the rank slices are disjoint), then each reader shuffles samples
through a buffer of ``shuffle_buffer`` samples.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import braceexpand
import numpy as np
import torch
import webdataset as wds

from pipeline.data import outages, storage
from pipeline.data.shard_reader import STORAGE_UNAVAILABLE, ShardSamples
from pipeline.data.shards import MANIFEST_NAME, read_manifest
from pipeline.errors import DataError

__all__ = ["StreamStats", "BatchStream", "resolve_shard_urls", "register_s3_opener", "make_batch_stream"]

log = logging.getLogger(__name__)

MEMBER_CAP_FACTOR = 16
MEMBER_CAP_FLOOR = 1 << 20
MEMBER_CAP_WITHOUT_MANIFEST = 64 << 20


@dataclass
class StreamStats:
    """Counters of one BatchStream, summed over all epochs it has streamed.

    Counts from DataLoader workers travel with the batches, so they are exact for
    ``num_workers=0`` and for finite passes (``drop_last=False``); with workers in the usual
    capped mode, problems a worker hit after its last delivered batch are not counted.
    """

    corrupt_samples: int = 0
    failed_shards: int = 0
    samples: int = 0
    batches: int = 0


# --------------------------------------------------------------------------- shard URLs


def resolve_shard_urls(spec: str) -> list[str]:
    """Turn a shard spec into the list of shard URLs.

    ``spec`` is one of: a directory/prefix holding ``manifest.json`` (its shard list is used, so a
    half-written conversion without a manifest is never read), a brace pattern such as
    ``s3://b/cifar10/train/shard-{000000..000009}.tar``, or a single ``.tar``.
    """
    return _resolve(spec)[0]


def _resolve(spec: str) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """Shard URLs plus, when a manifest describes them, their sample counts and the manifest."""
    spec = spec.strip()
    if not spec:
        raise DataError("empty shard spec; expected a shard directory, a brace pattern or a .tar URL")
    if "{" in spec or spec.endswith(".tar"):
        urls = list(braceexpand.braceexpand(spec))
        if not urls:
            raise DataError(f"{spec}: the pattern expands to no shard names")
        if not storage.is_s3_url(spec):
            missing = [url for url in urls if not os.path.isfile(storage.local_path(url))]
            if missing:
                raise storage.StorageError(
                    f"{spec}: {len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]}; "
                    "check the pattern or convert the dataset first"
                )
        counts, manifest = _counts_from_neighbour_manifest(urls)
        return urls, counts, manifest

    manifest_url = storage.join_url(spec, MANIFEST_NAME)
    if not storage.exists(manifest_url):
        storage.check_readable(spec)  # a missing bucket/prefix or bad credentials says so first
        found = storage.list_urls(spec, suffix=".tar")
        hint = (
            f"it holds {len(found)} .tar file(s) but no manifest, so the conversion did not finish; "
            "re-run it, or name the shards with a brace pattern"
            if found
            else "no shards there; convert the dataset to this location first"
        )
        raise storage.StorageError(f"{spec}: no {MANIFEST_NAME}; {hint}")
    manifest = read_manifest(spec)
    try:
        urls = [storage.join_url(spec, shard["name"]) for shard in manifest["shards"]]
        counts = [int(shard["num_samples"]) for shard in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_url}: malformed shard entry ({exc}); re-run the conversion") from exc
    if not urls:
        raise DataError(f"{manifest_url}: lists no shards; re-run the conversion")
    _check_manifest_counts(manifest_url, manifest, counts)
    return urls, counts, manifest


def _check_manifest_counts(manifest_url: str, manifest: dict[str, Any], counts: list[int]) -> None:
    """A manifest that contradicts itself cannot size epochs: refused in one line (exit 2). A
    manifest that merely disagrees with the shards is found while they stream (shard_reader)."""
    if any(count < 0 for count in counts):
        raise DataError(f"{manifest_url}: a shard lists a negative num_samples; re-run `gapm shards`")
    total = manifest.get("num_samples")
    if total is not None and (not isinstance(total, int) or total != sum(counts)):
        raise DataError(f"{manifest_url}: num_samples is {total!r} but its shards list {sum(counts)} samples; the "
                        "manifest was edited or is damaged: re-run `gapm shards` to write a matching one")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _counts_from_neighbour_manifest(urls: list[str]) -> tuple[list[int] | None, dict[str, Any] | None]:
    """Sample counts for explicitly named shards, from the manifest next to them if there is one."""
    directory = _parent(urls[0])
    if any(_parent(url) != directory for url in urls):
        return None, None
    try:
        if not storage.exists(storage.join_url(directory, MANIFEST_NAME)):
            return None, None
        manifest = read_manifest(directory)
    except (storage.StorageError, ValueError):
        return None, None
    by_name = {shard.get("name"): shard.get("num_samples") for shard in manifest["shards"]}
    names = [url.rsplit("/", 1)[-1] for url in urls]
    if not all(isinstance(by_name.get(name), int) for name in names):
        return None, None
    return [by_name[name] for name in names], manifest


# --------------------------------------------------------------------------- s3 opener for webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads; write shards with pipeline.data.shards")
    return storage.open_read_stream(url)


def register_s3_opener() -> None:
    """Let any webdataset pipeline open ``s3://`` URLs by streaming boto3's ``get_object`` body.

    webdataset 1.0 has no s3 scheme of its own; the usual ``pipe:aws s3 cp`` needs the AWS CLI on
    every node. Idempotent.
    """
    wds.gopen_schemes["s3"] = _gopen_s3


# --------------------------------------------------------------------------- the stream


class BatchStream:
    """One rank's batches: iterate it once per epoch; call :meth:`set_epoch` between epochs.

    ``len()`` is the number of batches per epoch: exact whenever batches are capped (the default,
    identical on every rank), an upper bound for ``drop_last=False`` passes.
    """

    def __init__(self, samples: ShardSamples, *, num_workers: int, batches_per_epoch: int | None) -> None:
        self._samples = samples
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.shard_urls = list(samples.urls)
        self.stats = StreamStats()

    @property
    def epoch(self) -> int:
        return self._samples.epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``: the shard order and sample shuffles derive from (seed, epoch)."""
        self._samples.epoch = int(epoch)

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        counts = self._samples.shard_counts
        if counts is None:
            raise TypeError("batch count unknown: the shards have no manifest with sample counts")
        readers = max(1, self.num_workers)
        total = 0
        for worker in range(readers):
            samples = sum(counts[url] for url in self._samples.reader_urls(worker, readers))
            total += math.ceil(samples / self._samples.batch_size)
        return total

    def samples_per_pass(self) -> int | None:
        """Samples in one pass over this rank's shards (what a ``drop_last=False`` pass yields when
        nothing is corrupt), from the manifest; None when the counts are unknown. For progress."""
        counts = self._samples.shard_counts
        if counts is None or self._samples.resampled:
            return None
        readers = max(1, self.num_workers)
        return sum(counts[url] for worker in range(readers) for url in self._samples.reader_urls(worker, readers))

    def __iter__(self) -> Iterator[torch.Tensor]:
        samples = self._samples
        # The loader draws its workers' base seed from this generator, never from torch's global
        # one: a stream created at a resume step must not shift that step's random draws.
        loader_seed = torch.Generator().manual_seed(
            hash((samples.seed, samples.epoch, samples.rank)) % 2**63)
        # Workers hear of a stop request through this flag (the signal reaches this process only).
        samples.stop_flag = outages.worker_stop_flag() if self.num_workers else None
        loader = wds.WebLoader(
            samples,
            batch_size=None,  # batching happens in the pipeline, before crossing the worker boundary
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=loader_seed,
            collate_fn=_as_is,  # numpy batches cross from the workers as they are (see shard_reader._collate)
            worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if self.num_workers else None,
        )
        if self.batches_per_epoch is not None:
            loader = loader.with_epoch(self.batches_per_epoch)
        for batch, corrupt, failed, error in loader:
            self.stats.corrupt_samples += int(corrupt)
            self.stats.failed_shards += int(failed)
            if error is not None:
                kind, message = error
                raise (storage.StorageUnavailable if kind == STORAGE_UNAVAILABLE else DataError)(message)
            if batch is None:
                continue
            batch = _unit_range(batch) if batch.dtype == np.uint8 else torch.from_numpy(batch)
            self.stats.batches += 1
            self.stats.samples += int(batch.shape[0])
            yield batch


def _as_is(batch: Any) -> Any:
    return batch


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """A loader worker's first act: ask the kernel for SIGKILL when the process that started it
    dies (its DataLoader's own check only runs between batches, and a worker whose batches fill
    the pipe to a dead parent hangs at exit), and go at once if that has already happened.
    Linux sends the signal when the *thread* that forked the worker ends: BatchStream is
    iterated by the training loop's main thread, which outlives its workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the DataLoader's own check remains
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (x / 255). In numpy, single-threaded: torch's parallel
    kernels leave OpenMP threads spinning, which on a busy machine steal the core that decodes."""
    scaled = np.empty(images.shape, np.float32)
    np.divide(images, np.float32(255.0), out=scaled, dtype=np.float32)  # one pass; the same floats as astype + /=
    return torch.from_numpy(scaled)


def make_batch_stream(
    shard_spec: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
    epoch: int = 0,
    drop_last: bool = True,
    verify_checksums: bool = True,
    max_member_bytes: int | None = None,
) -> BatchStream:
    """Build the batch stream of one rank.

    Yields float32 tensors: images (B, C, H, W) in [0, 1] (grayscale has C = 1), or swiss-roll
    points (B, 2) as stored. Every rank gets exactly ``batches_per_epoch`` full batches; when it is
    not given it is floor(total samples / (world_size * batch_size)) from the manifest, so an epoch
    is about one pass over the data and DDP never waits on a rank that ran dry. Readers that finish
    their shards early cycle through them again (reshuffled) until the cap.

    ``resampled=True`` draws shards with replacement per reader (no shard-count requirement; the
    usual choice when shards are few or unevenly sized). ``drop_last=False`` is for evaluation: one
    exact pass over this rank's shards, the last batch of each reader may be short, and batch
    counts may differ between ranks - never use it for DDP training.

    ``verify_checksums`` checks each shard read to its end against the sha256 in its manifest
    (when the shards have one); a mismatch is counted in ``stats.failed_shards`` and logged.
    ``max_member_bytes`` refuses larger tar members unread (the shard counts as failed); None:
    the default from the manifest (see the module docstring).

    Raises DataError up front when non-resampled reading has fewer shards than
    ``world_size * max(1, num_workers)`` readers, and StorageError when the location is unreadable.
    """
    _check_arguments(batch_size, rank, world_size, num_workers, batches_per_epoch, drop_last, resampled)
    register_s3_opener()
    if storage.is_s3_url(shard_spec):
        prefix = shard_spec.split("{", 1)[0]
        storage.check_readable(prefix if "{" in shard_spec else shard_spec)
    urls, counts, manifest = _resolve(shard_spec)
    if not resampled:
        _check_enough_shards(shard_spec, urls, counts, readers=world_size * max(1, num_workers),
                             world_size=world_size, num_workers=num_workers)
    if drop_last and batches_per_epoch is None:
        batches_per_epoch = _full_batches_per_rank(shard_spec, counts, world_size, batch_size)
    samples = ShardSamples(
        urls, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
        shuffle_buffer=shuffle_buffer, resampled=resampled, drop_last=drop_last,
        image_shape=_manifest_image_shape(manifest), image_format=_manifest_image_format(manifest),
        shard_counts=dict(zip(urls, counts)) if counts else None,
        shard_sha256=_manifest_digests(urls, manifest) if verify_checksums else None,
        max_member_bytes=max_member_bytes or default_member_cap(manifest))
    return BatchStream(samples, num_workers=num_workers, batches_per_epoch=batches_per_epoch)


def default_member_cap(manifest: dict[str, Any] | None) -> int:
    """The largest tar member a reader takes when data.max_member_bytes is not set."""
    largest = manifest.get("max_member_bytes") if manifest else None
    if isinstance(largest, int) and not isinstance(largest, bool) and largest > 0:
        return max(MEMBER_CAP_FLOOR, MEMBER_CAP_FACTOR * largest)
    return MEMBER_CAP_WITHOUT_MANIFEST


def _check_arguments(batch_size: int, rank: int, world_size: int, num_workers: int,
                     batches_per_epoch: int | None, drop_last: bool, resampled: bool) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size}: expected a positive number")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    if num_workers < 0:
        raise DataError(f"num_workers {num_workers}: expected 0 or more")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise DataError(f"batches_per_epoch {batches_per_epoch}: expected a positive number or None")
    if not drop_last and (resampled or batches_per_epoch is not None):
        raise DataError(
            "drop_last=False means one exact pass over the shards; it cannot be combined with "
            "resampled=True or batches_per_epoch (those give capped, full batches)"
        )


def _check_enough_shards(shard_spec: str, urls: list[str], counts: list[int] | None, *, readers: int,
                         world_size: int, num_workers: int) -> None:
    """Fewer shards than readers would leave a reader without data: a DDP hang, or silently
    repeated samples. Refused up front, with the fix."""
    if len(urls) >= readers:
        return
    total_hint = f" (of {sum(counts)} samples)" if counts else ""
    per_shard = f" <= {sum(counts) // readers}" if counts and sum(counts) >= readers else ""
    raise DataError(
        f"{shard_spec}: {len(urls)} shard(s){total_hint} but world_size {world_size} x "
        f"num_workers {max(1, num_workers)} = {readers} readers each need at least one shard; "
        f"reshard with samples_per_shard{per_shard} to get {readers}+ shards, lower num_workers, "
        "or set resampled: true"
    )


def _full_batches_per_rank(shard_spec: str, counts: list[int] | None, world_size: int, batch_size: int) -> int:
    if counts is None:
        raise DataError(
            f"{shard_spec}: sample counts unknown (no manifest.json next to the shards); point "
            "data at the shard directory holding manifest.json or set batches_per_epoch"
        )
    batches = sum(counts) // (world_size * batch_size)
    if batches == 0:
        raise DataError(
            f"{shard_spec}: {sum(counts)} samples are fewer than world_size {world_size} x "
            f"batch_size {batch_size}; lower the batch size or add data"
        )
    return batches


def _manifest_digests(urls: list[str], manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """URL -> sha256 for the shards whose manifest entry records one."""
    if not manifest:
        return None
    by_name = {shard.get("name"): shard.get("sha256") for shard in manifest["shards"] if isinstance(shard, dict)}
    digests = {url: by_name[name] for url in urls
               if isinstance(by_name.get(name := url.rsplit("/", 1)[-1]), str)}
    return digests or None


def _manifest_image_format(manifest: dict[str, Any] | None) -> str | None:
    """How the images are stored ("png", "jpg", "raw"), from the manifest's ``image.format``."""
    image = manifest.get("image") if manifest else None
    return str(image.get("format")) if isinstance(image, dict) and image.get("format") else None


def _manifest_image_shape(manifest: dict[str, Any] | None) -> tuple[int, int, int] | None:
    if not manifest or not manifest.get("image"):
        return None
    image = manifest["image"]
    return int(image["height"]), int(image["width"]), int(image["channels"])
