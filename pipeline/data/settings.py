"""The data settings of an experiment (`data:`), kept apart from the readers so that reading a
config imports neither torch nor the storage clients: pipeline.config assembles them, and
pipeline.data.sources builds the training and held-out data from them.

The swiss-roll sizes are defined here once: the config's defaults, `gapm shards swissroll`'s
and the converter's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

SWISSROLL_SAMPLES = 5000  # training points of a generated roll (in memory or as shards)
SWISSROLL_TEST_SAMPLES = 1000  # its held-out points


@dataclass
class DataConfig:
    # "swissroll" / "swissroll3d" generate the paper's toy rolls in memory (pipeline/data/swissroll.py);
    # "synthetic" uniform noise of model.data_shape (throughput checks); anything else is a shard
    # set (local directory, file:// or s3:// prefix holding manifest.json, or a brace pattern).
    train: str = "swissroll"
    test: str = "swissroll"  # held-out data, as `train`: the end-of-run metrics and evaluation jobs score on it
    batch_size: int = 32  # per process
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each reader
    resampled: bool = False  # infinite stream with replacement: for many ranks, few shards
    verify_checksums: bool = True  # check each shard read to its end against its manifest's sha256
    swissroll_samples: int = SWISSROLL_SAMPLES  # also the size of the "synthetic" set
    swissroll_test_samples: int = SWISSROLL_TEST_SAMPLES  # held-out points of the roll
    # Tar members larger than this are refused unread (the shard counts as damaged); null: 16x the
    # largest member the manifest records (at least 1 MiB), or 64 MiB where it records none.
    max_member_bytes: int | None = None

    def validate(self) -> None:
        for key in ("batch_size", "swissroll_samples", "swissroll_test_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'data.{key}' must be at least 1, got {getattr(self, key)}")
        for key in ("num_workers", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'data.{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("train", "test"):
            if not getattr(self, key).strip():
                raise ConfigError(f"config key 'data.{key}' is empty; name a shard set or 'swissroll'")
        if self.max_member_bytes is not None and self.max_member_bytes < 1:
            raise ConfigError(f"config key 'data.max_member_bytes' must be at least 1 or null, got {self.max_member_bytes}")
