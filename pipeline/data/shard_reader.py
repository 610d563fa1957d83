"""What one reader of a shard stream does — one per (rank, DataLoader worker): read its
shards, group tar members into samples (pipeline/data/tar_stream.py), shuffle them through a
buffer, decode them (pipeline/data/sample_decode.py), and batch them. Damaged shards and corrupt samples are skipped, counted
and logged; the counts travel with the batches so that they reach the training process from
worker processes too. So does a fatal problem: it crosses the worker boundary as a message of
its kind and is raised in the training process as one DataError (bad data: exit 2) or one
StorageUnavailable (storage away for the whole retry budget, or a stop while waiting for it:
checkpoint and exit 75). An exception raised inside a DataLoader worker would reach the user
re-wrapped, with the worker's traceback pasted into its message.

Damage and outages are told apart. A shard that is not there, breaks off, holds a bad tar, a
member over ``max_member_bytes``, fails its checksum or holds fewer samples than its manifest
says is damaged: skipped and counted. Storage that is unreachable, slow or throttled is not:
the S3 stream (pipeline/data/s3_stream.py) retries from the byte where it broke, so the reader
sees the same bytes in the same order, or StorageUnavailable, never a shortened shard.

Hostile input costs no memory before it is refused: tar members are capped from their header
(tar_stream), an image's size is read from its header and checked against the manifest's
shape (or PIL's decompression-bomb limit) before its pixels are decoded, and a raw-pixel
member must have exactly the size the manifest's shape gives (sample_decode).

Each shard read to its end is checked against the sha256 its manifest records (when it has
one): the tar reader consumes the whole stream, so hashing it costs one pass over bytes already
in memory. Samples are used as they stream, so a mismatch is found at the end of the shard; it
is then counted and reported like a shard that broke off, and the stream goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import outages, storage
from pipeline.data.sample_decode import SampleDecoder, failure_reason
from pipeline.data.tar_stream import tar_samples
from pipeline.errors import DataError

log = logging.getLogger(__name__)

# A resampled reader never runs out of shards to try; stop it when nothing usable comes back.
GIVE_UP_AFTER = 1000
# Corrupt-sample warnings per reader: the first few in full, then one summary line per power of
# ten, so a shard set of bad images gives a handful of lines, not one per sample.
WARN_IN_FULL = 5
# The kinds of fatal message a reader sends instead of a batch.
DATA_ERROR, STORAGE_UNAVAILABLE = "data", "storage unavailable"


class Counters:
    """Problems seen by one reader since the last batch it emitted."""

    def __init__(self) -> None:
        self.corrupt = 0
        self.failed = 0
        self.corrupt_seen = 0  # never reset: decides which corrupt samples are worth a warning

    def note_corrupt(self, key: Any, url: Any, reason: str) -> None:
        self.corrupt += 1
        self.corrupt_seen += 1
        seen = self.corrupt_seen
        if seen <= WARN_IN_FULL:
            log.warning("skipping corrupt sample %s in %s: %s", key, url, reason)
        elif seen & (seen - 1) == 0 or seen % 1000 == 0:  # powers of two, then every 1000
            log.warning("%d corrupt samples skipped so far by this reader (latest: %s in %s: %s)",
                        seen, key, url, reason)

    def take(self) -> tuple[int, int]:
        counts = (self.corrupt, self.failed)
        self.corrupt = self.failed = 0
        return counts


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The same permutation on every rank (string seeds hash identically in every process)."""
    order = list(urls)
    random.Random(f"gapm-shards:{seed}:{epoch}").shuffle(order)
    return order


class ShardSamples(IterableDataset):
    """Per-reader pipeline: shards -> raw samples -> shuffle buffer -> decode -> batches.

    Yields ``(batch_or_None, corrupt_count, failed_count, error_or_None)`` so that counts from
    DataLoader worker processes reach the parent with the batches; an error ``(kind, message)``
    ends the reader (BatchStream raises it: DATA_ERROR as DataError, STORAGE_UNAVAILABLE as
    StorageUnavailable); image batches are uint8 (B, C, H, W), points float32 (B, D). Holds only
    plain configuration (and, in workers, the stop flag BatchStream gives it), so it pickles
    into workers under any start method.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
        resampled: bool,
        drop_last: bool,
        image_shape: tuple[int, int, int] | None,
        shard_counts: dict[str, int] | None,
        shard_sha256: dict[str, str] | None = None,
        max_member_bytes: int | None = None,
        image_format: str | None = None,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        # drop_last=True is the capped training mode: readers cycle through their shards until the
        # loader's cap; drop_last=False is one exact pass (evaluation).
        self.drop_last = drop_last
        self.image_shape = image_shape
        self.image_format = image_format  # the manifest's: "png", "jpg" or "raw" (pixels as .npy)
        self.shard_counts = shard_counts
        self.shard_sha256 = shard_sha256  # None: do not verify (data.verify_checksums: false)
        self.max_member_bytes = max_member_bytes  # tar members over this are refused unread
        self.stop_flag: Any = None  # set by BatchStream for worker processes: see outages.worker_stop_flag

    def reader_urls(self, worker: int, num_workers: int) -> list[str]:
        """The shards one reader (rank, worker) owns this epoch (all shards when resampled)."""
        if self.resampled:
            return list(self.urls)
        rank_urls = epoch_shard_order(self.urls, self.seed, self.epoch)[self.rank :: self.world_size]
        return rank_urls[worker::num_workers]

    def __iter__(self) -> Iterator[tuple[np.ndarray | None, int, int, tuple[str, str] | None]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and self.stop_flag is not None:
            outages.use_worker_stop_flag(self.stop_flag)
        counters = Counters()
        arrays = self._decoded(self.reader_urls(worker, num_workers), worker, counters)
        batch: list[np.ndarray] = []
        try:
            for array in arrays:
                batch.append(array)
                if len(batch) == self.batch_size:
                    yield (_collate(batch), *counters.take(), None)
                    batch = []
        except storage.StorageUnavailable as exc:
            yield (None, *counters.take(), (STORAGE_UNAVAILABLE, str(exc)))
            return
        except DataError as exc:
            yield (None, *counters.take(), (DATA_ERROR, str(exc)))
            return
        if batch and not self.drop_last:
            yield (_collate(batch), *counters.take(), None)
        corrupt, failed = counters.take()
        if corrupt or failed:
            yield (None, corrupt, failed, None)

    def _decoded(self, urls: list[str], worker: int, counters: Counters) -> Iterator[np.ndarray]:
        reader = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        if self.resampled:
            rng = random.Random(f"gapm-resampled:{reader}")
            raw = _shard_samples(_draw_forever(urls, rng), counters, self.shard_counts, self.shard_sha256,
                                 self.max_member_bytes)
            yield from self._decode_all(self._shuffled(raw, rng), counters)
            return
        for pass_index in itertools.count():
            rng = random.Random(f"gapm-pass:{reader}:{pass_index}")
            order = list(urls)
            if pass_index > 0:
                rng.shuffle(order)  # a different order when a reader cycles through its shards again
            produced = 0
            raw = _shard_samples(order, counters, self.shard_counts, self.shard_sha256, self.max_member_bytes)
            for array in self._decode_all(self._shuffled(raw, rng), counters):
                produced += 1
                yield array
            if not self.drop_last:
                return
            if produced == 0:
                raise DataError(_nothing_readable(urls, self.rank, worker, counters))

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            return samples
        # Shuffle encoded samples (small) and decode only what leaves the buffer.
        return wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)

    def _decode_all(self, samples: Iterator[dict[str, Any]], counters: Counters) -> Iterator[np.ndarray]:
        decode = SampleDecoder(self.image_shape, self.image_format)
        corrupt_in_a_row = 0
        for sample in samples:
            try:
                array = decode(sample)
            except Exception as exc:
                counters.note_corrupt(sample.get("__key__"), sample.get("__url__"), failure_reason(exc, sample))
                corrupt_in_a_row += 1
                # A pass ends by itself; a resampled reader would spin forever on bad data.
                if self.resampled and corrupt_in_a_row > GIVE_UP_AFTER:
                    raise DataError(
                        f"{GIVE_UP_AFTER} corrupt samples in a row (last in {sample.get('__url__')}); check the data"
                    )
                continue
            corrupt_in_a_row = 0
            yield array


def _nothing_readable(urls: list[str], rank: int, worker: int, counters: Counters) -> str:
    shards = urls[0] if len(urls) == 1 else f"{len(urls)} shards ({urls[0]}, ...)"
    seen = f"every one of {counters.corrupt_seen} samples failed to decode" if counters.corrupt_seen \
        else "every shard failed to open or broke off"
    return (f"no readable samples in {shards} (rank {rank}, worker {worker}): {seen}; "
            "see the first warnings for the reason, then re-convert the shards (gapm shards)")


class _HashingStream:
    """Passes reads through and hashes every byte read."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def hexdigest_of_all(self) -> str:
        while self.read(1 << 20):  # a compressed tar may end before the object does
            pass
        return self.sha256.hexdigest()


def _draw_forever(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(urls)


def _shard_samples(
    urls: Iterator[str] | list[str], counters: Counters, expected: dict[str, int] | None,
    sha256: dict[str, str] | None = None, max_member_bytes: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of member bytes) from each shard in turn; damaged shards are skipped.

    A shard that is missing, or that breaks off mid-way (truncated upload, damaged header, a
    member over ``max_member_bytes``), is counted once as failed; the samples read before the
    break are kept. Storage that is away is not damage: StorageUnavailable (raised by the S3
    stream once its retry budget is spent) goes through. The sample count is also checked
    against the manifest (``expected``) when there is one: a shard can be a well-formed tar and
    still hold fewer samples than were written (counted as failed), or more than the manifest
    says (a warning: epochs are sized from the manifest). With ``sha256`` the bytes of each shard
    read to its end are checked against the manifest's digest; a mismatch counts the shard as
    failed (its samples have been used by then).
    """
    barren_in_a_row = 0  # shards that gave nothing; only unbounded for resampled readers
    for url in urls:
        produced = 0
        try:
            stream = storage.open_read_stream(url)
        except storage.StorageUnavailable:
            raise
        except Exception as exc:
            counters.failed += 1
            log.warning("skipping unreadable shard %s: %s", url, exc)
        else:
            want_digest = sha256.get(url) if sha256 else None
            source = _HashingStream(stream) if want_digest else stream
            listed = expected.get(url) if expected else None
            too_many = -1 if listed is None else listed + 1
            try:
                # tar_samples reads the stream to its end: a wrapper around `stream` sees every byte.
                for sample in tar_samples(source, url, max_member_bytes):
                    produced += 1
                    if produced == too_many:
                        _warn_more_than_listed(url, listed)
                    yield sample
                if listed is not None and produced < listed:
                    counters.failed += 1
                    log.warning("shard %s ended after %d of the manifest's %d samples; it is truncated",
                                url, produced, listed)
                elif want_digest and (digest := source.hexdigest_of_all()) != want_digest:
                    counters.failed += 1
                    log.warning("shard %s does not match its manifest (sha256 %s..., manifest %s...): it changed "
                                "after conversion; re-convert or re-upload it (its %d samples were used)",
                                url, digest[:12], want_digest[:12], produced)
            except storage.StorageUnavailable:
                raise
            except Exception as exc:
                counters.failed += 1
                log.warning("shard %s broke off (%s: %s); skipping the rest of it", url, type(exc).__name__, exc)
            finally:
                stream.close()
        barren_in_a_row = 0 if produced else barren_in_a_row + 1
        if barren_in_a_row > GIVE_UP_AFTER:
            raise DataError(
                f"{GIVE_UP_AFTER} shards in a row gave no samples (last: {url}); check the storage and data"
            )


_warned_more_than_listed: set[str] = set()


def _warn_more_than_listed(url: str, listed: int) -> None:
    """Once per shard and process: samples beyond the manifest's count are still used, but
    epochs (and the split over ranks) are sized from the manifest, so they come out short."""
    if url in _warned_more_than_listed:
        return
    _warned_more_than_listed.add(url)
    log.warning("shard %s holds more samples than the %d its manifest lists: the manifest understates the data, "
                "and epochs sized from it are too short; re-run `gapm shards` to write a matching manifest",
                url, listed)


def _collate(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack images into uint8 (B, C, H, W), or points into float32 (B, D).

    A batch leaves a DataLoader worker as a plain uint8 array: pickled through the worker's pipe,
    a quarter of the bytes of float32, and no shared-memory file handed over per batch (a torch
    tensor crosses as a shared-memory file descriptor, fetched by the consumer over a socket from
    the worker). Measured with one worker on 32x32 images (issue 16): CPU per sample 87 us in
    the worker and 12 in the consumer for float32 tensors, 69 and 10 for uint8 arrays; equal
    totals at 64x64. BatchStream scales the images to [0, 1] after the crossing.

    Each image is copied once, channels first, into the batch: ``np.stack`` then a transposed
    copy was two passes, and stacking the strided RGB views of the PNG decoder's RGBX pixels
    was a slow one (22 us of a 64x64 RGB sample against 5, issue 23).
    """
    first = arrays[0]
    if first.dtype != np.uint8:
        return np.stack(arrays)
    height, width, channels = first.shape
    batch = np.empty((len(arrays), channels, height, width), np.uint8)
    for index, array in enumerate(arrays):
        batch[index] = array.transpose(2, 0, 1)
    return batch
