"""The checkpoint component's own settings. Kept free of torch so that reading a config stays
cheap: pipeline.config assembles a `CheckpointConfig` from the experiment's YAML keys
(`train.checkpoint_dir`, `train.checkpoint_every`, `train.keep_last_checkpoints`, the run
directory), and the training loop, the registry and the evaluation jobs build a
`Checkpointer` from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# In the run directory: rank 0's complete checkpoints waiting to go to an s3:// checkpoint
# directory (see pipeline.checkpoints.uploads).
STAGING = ".checkpoint-uploads"


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run's checkpoints live and how many are kept."""

    directory: Path | str  # a local directory (Path) or an s3://bucket/prefix URL (str)
    every: int = 1000  # steps between checkpoints; one is also written at the end of each stage
    keep_last: int = 3  # older complete checkpoints are deleted
    # A local directory for checkpoints on their way to an s3:// directory; None: uploads happen
    # in the foreground (reading-only users such as eval-watch never write).
    staging: Path | None = None

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError(f"checkpoint every ({self.every}) and keep_last ({self.keep_last}) must be at least 1")
