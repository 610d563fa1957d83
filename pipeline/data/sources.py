"""Where training batches come from: the in-memory swiss-roll or a WebDataset shard stream.

Training consumes an endless iterator of batches for its own rank. Both sources share the
same position bookkeeping (epoch, batch within epoch) so that a resumed run continues with
exactly the batches the interrupted run would have seen.

Storage outages (shards in S3): the reads retry within train.storage_retry_seconds
(pipeline/data/outages.py), and so do the manifest reads at the start of each epoch; once the
budget is spent the source raises StorageUnavailable, and training checkpoints and exits 75.
With several ranks every rank must stop at the same step, or the others would wait in the
step's all-reduce for a rank that is writing a checkpoint: so after each batch the ranks agree
(`agree`, one all-reduce of one number) whether any of them could not get its batch, and if one
could not, every rank raises, before its position counts a batch it will not train on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pipeline.data import shards, storage, streaming, swissroll
from pipeline.data.settings import DataConfig
from pipeline.errors import ConfigError, DataError

SWISSROLL = "swissroll"  # the 2-D roll (a curve)
SWISSROLL3D = "swissroll3d"  # the authors' 3-D roll (a sheet)
ROLLS = (SWISSROLL, SWISSROLL3D)
SYNTHETIC = "synthetic"  # uniform noise of model.data_shape: throughput checks without any I/O


def swissroll_points(count: int, seed: int, kind: str = SWISSROLL) -> Tensor:
    """`count` points of the roll `kind` (see pipeline.data.swissroll), uniform in the roll parameter."""
    return swissroll.roll_geometry(kind).sample(count, seed)[0]


@dataclass
class StreamPosition:
    """How far the training stream has got; saved in checkpoints for exact resume."""

    epoch: int = 0
    batch_in_epoch: int = 0


class TrainingSource(Protocol):
    """One rank's training data: `InMemoryBatches` or `ShardBatches`."""

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]: ...

    def data_problems(self) -> dict[str, int]: ...  # corrupt samples and failed shards so far


class InMemoryBatches:
    """Shuffled batches of a tensor held in memory, split evenly across ranks.

    Every epoch is a fresh permutation seeded by (seed, epoch); each rank takes its own
    interleaved slice, and all ranks get the same number of full batches.
    """

    def __init__(self, data: Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.data, self.batch_size, self.rank, self.world_size, self.seed = data, batch_size, rank, world_size, seed
        self.batches_per_epoch = len(data) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(data)} samples cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks; lower data.batch_size or use more data")

    def data_problems(self) -> dict[str, int]:
        return {"corrupt_samples": 0, "failed_shards": 0}  # generated in memory: nothing to go wrong

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data), generator=generator)[self.rank::self.world_size]
        for index in range(self.batches_per_epoch):
            yield self.data[order[index * self.batch_size:(index + 1) * self.batch_size]]


def endless_batches(source: TrainingSource, position: StreamPosition) -> Iterator[Tensor]:
    """Yields batches forever from `source.epoch_batches(epoch)`, starting at `position`
    and advancing it in place (skipping batches already consumed before a resume)."""
    while True:
        already_consumed = position.batch_in_epoch
        for index, batch in enumerate(source.epoch_batches(position.epoch)):
            if index < already_consumed:
                continue
            position.batch_in_epoch += 1
            yield batch
        position.epoch += 1
        position.batch_in_epoch = 0


class ShardBatches:
    """Batches streamed from WebDataset shards (local or s3://), one epoch at a time.

    `agree(failed)` (several ranks): True if `failed` is True on any rank; called once per batch
    on every rank (see the module docstring)."""

    def __init__(self, spec: str, config: DataConfig, *, rank: int, world_size: int, seed: int,
                 agree: Callable[[bool], bool] | None = None):
        self.spec, self.config, self.rank, self.world_size, self.seed = spec, config, rank, world_size, seed
        # Only object storage has outages; local shards need no agreement (~0.4 ms a step on gloo).
        self.agree = agree if world_size > 1 and storage.is_s3_url(spec) else None
        self.epoch_stats: list = []  # one StreamStats per epoch streamed

    def _stream(self, epoch: int) -> Iterator[Tensor]:
        stream = storage.with_retries(lambda: streaming.make_batch_stream(
            self.spec, self.config.batch_size, rank=self.rank, world_size=self.world_size,
            num_workers=self.config.num_workers, seed=self.seed,
            shuffle_buffer=self.config.shuffle_buffer, resampled=self.config.resampled, epoch=epoch,
            verify_checksums=self.config.verify_checksums, max_member_bytes=self.config.max_member_bytes),
            f"opening the shards of data.train ({self.spec}, epoch {epoch})", stall_s=storage.STALL_S)
        self.epoch_stats.append(stream.stats)
        yield from stream

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]:
        batches = self._stream(epoch)
        while True:
            unavailable: storage.StorageUnavailable | None = None
            try:
                batch = next(batches)
            except StopIteration:
                batch = None
            except storage.StorageUnavailable as error:
                unavailable = error
            if self.agree is not None and self.agree(unavailable is not None) and unavailable is None:
                raise storage.StorageUnavailable(f"another rank could not read its shards of {self.spec} (see its "
                                                 "messages); every rank stops at this step")
            if unavailable is not None:
                raise unavailable
            if batch is None:
                return
            yield batch

    def data_problems(self) -> dict[str, int]:
        """Corrupt samples skipped and unreadable shards so far (this rank)."""
        return {"corrupt_samples": sum(s.corrupt_samples for s in self.epoch_stats),
                "failed_shards": sum(s.failed_shards for s in self.epoch_stats)}


def manifest_data_shape(manifest: dict) -> list[int] | None:
    """[C, H, W] for image shards, [D] for point shards, from a shard manifest."""
    if manifest.get("image"):
        image = manifest["image"]
        return [int(image["channels"]), int(image["height"]), int(image["width"])]
    if manifest.get("point_dim"):
        return [int(manifest["point_dim"])]
    return None


def check_sources(config: DataConfig, data_shape: list[int]) -> None:
    """Fails before training starts if a data location is unreachable or holds data of
    another shape than the model expects; the message names the config key."""
    for key, spec in (("data.train", config.train), ("data.test", config.test)):
        if spec in ROLLS:
            found = [swissroll.roll_geometry(spec).dimension]
        elif spec == SYNTHETIC:
            found = None
        else:
            # Raises StorageError naming the location; an outage is waited out (storage_retry_seconds).
            storage.with_retries(lambda spec=spec: streaming.resolve_shard_urls(spec), f"checking {key} ({spec})",
                                 stall_s=storage.STALL_S)
            is_directory = "{" not in spec and not spec.endswith(".tar")
            found = manifest_data_shape(storage.with_retries(lambda spec=spec: shards.read_manifest(spec),
                                                             f"reading the manifest of {key} ({spec})",
                                                             stall_s=storage.STALL_S)) if is_directory else None
        if found is not None and found != list(data_shape):
            raise ConfigError(f"config key '{key}' ({spec}) holds data of shape {found} but "
                              f"model.data_shape is {list(data_shape)}; set model.data_shape={found}")


def test_roll(config: DataConfig) -> "swissroll.RollGeometry | None":
    """The roll that `data.test` samples (in memory or as shards), for the coverage metrics."""
    if config.test in ROLLS:
        return swissroll.roll_geometry(config.test)
    if config.test == SYNTHETIC or "{" in config.test or config.test.endswith(".tar"):
        return None
    dataset = shards.read_manifest(config.test).get("dataset")
    return swissroll.roll_geometry(dataset) if dataset in ROLLS else None


def synthetic_data(count: int, data_shape: list[int], seed: int) -> Tensor:
    return torch.rand(count, *data_shape, generator=torch.Generator().manual_seed(seed))


def training_source(config: DataConfig, *, rank: int, world_size: int, seed: int, data_shape: list[int],
                    agree: Callable[[bool], bool] | None = None) -> TrainingSource:
    if config.train == SYNTHETIC:
        data = synthetic_data(config.swissroll_samples, data_shape, seed)
        return InMemoryBatches(data, config.batch_size, rank=rank, world_size=world_size, seed=seed)
    if config.train in ROLLS:
        points = swissroll_points(config.swissroll_samples, seed, config.train)
        return InMemoryBatches(points, config.batch_size, rank=rank, world_size=world_size, seed=seed)
    return ShardBatches(config.train, config, rank=rank, world_size=world_size, seed=seed, agree=agree)


def held_out_data(config: DataConfig, seed: int, limit: int, data_shape: list[int]) -> Tensor:
    """Up to `limit` test samples in data space ([0, 1] images or raw points)."""
    if config.test == SYNTHETIC:
        return synthetic_data(min(limit, config.swissroll_test_samples), data_shape, seed + 1)
    if config.test in ROLLS:
        # A different seed from training: held-out points from the same roll.
        return swissroll_points(config.swissroll_test_samples, seed + 1, config.test)
    batches, total = [], 0
    stream = storage.with_retries(lambda: streaming.make_batch_stream(
        config.test, min(config.batch_size, limit), drop_last=False, shuffle_buffer=0, seed=seed,
        verify_checksums=config.verify_checksums, max_member_bytes=config.max_member_bytes),
        f"opening the shards of data.test ({config.test})", stall_s=storage.STALL_S)
    for batch in stream:
        batches.append(batch)
        total += len(batch)
        if total >= limit:
            break
    return torch.cat(batches)[:limit]

