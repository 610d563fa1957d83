"""The tracking settings of an experiment (`tracking:`), kept apart from the trackers so that
reading a config imports neither MLflow nor the trackers: pipeline.config assembles them, and
pipeline.tracking.tracker builds the run's tracker from them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class TrackingConfig:
    # track in MLflow: the server named by MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    # (the run directory's record is written either way)
    enabled: bool = True
    experiment: str | None = None  # MLflow experiment; null: the config's name. Comparisons share one.
    registered_model_name: str | None = None  # null: "gapm-" + name
    register_model: bool = True  # register the model logged at the end of stage 2 (logged either way)
    log_checkpoints: bool = True  # upload every checkpoint as run artifacts (else: location only)
    system_metrics: bool = True  # CPU/GPU/memory/disk/network every 10 s (needs psutil)

    def validate(self) -> None:
        name = self.registered_model_name
        if name is not None and (not name or any(c in name for c in "/@:")):
            # models:/NAME@ALIAS and models:/NAME/VERSION could not name it.
            raise ConfigError(f"config key 'tracking.registered_model_name' must be a non-empty name "
                              f"without '/', '@' or ':', got {name!r}")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError("config key 'tracking.experiment' is empty; give a name or null")
