"""The settings of evaluation: `eval:` in the experiment config (`EvalConfig`, where every
default lives), and the settings of one scoring job (`EvalSettings`), built from it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError


@dataclass
class EvalConfig:
    samples: int = 5000  # generated samples for the end-of-training metrics
    # reference statistics of the checkpoint evaluation jobs (gapm eval / eval-watch): a name,
    # path or s3:// URL (gapm fid-stats)
    fid_stats: str | None = None
    # where named statistics live: a directory or s3:// prefix; null: $GAPM_FID_STATS_DIR, else
    # <output_dir>/fid-stats (pipeline.eval.reference_stats)
    fid_stats_dir: str | None = None
    fid_samples: int = 50000  # generated samples per FID (the paper: 50,000)
    feature_extractor: str | None = None  # null: the one the statistics were computed with
    inception_weights: str | None = None  # path or s3:// URL of inception-2015-12-05.pt
    kid: bool = False  # also KID (needs statistics with features, the default of fid-stats)
    # Further feature spaces, each its own statistics (made with its own extractor): "LABEL=NAME"
    # or "NAME" (label: the statistics' name); metrics go to eval/LABEL/fid, ... (pipeline.eval.scoring)
    extra_fid_stats: list[str] = field(default_factory=list)
    fid_seeds: int = 3  # sets of fid_samples generated samples, seeds seed..seed+k-1: eval/fid is their mean
    # generated and real features for precision/recall/density/coverage and memorisation (k-NN)
    prdc_samples: int = 10000
    prdc_nearest_k: int = 5  # k of those k-NN metrics (Kynkäänniemi et al.: 3-5)
    champion_alias: str = "champion"  # registry alias moved to the best-scoring checkpoint

    def validate(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"config key 'eval.samples' must be at least 2, got {self.samples}")
        if self.fid_samples < 2:
            raise ConfigError(f"config key 'eval.fid_samples' must be at least 2, got {self.fid_samples}")
        for key in ("fid_seeds", "prdc_nearest_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'eval.{key}' must be at least 1, got {getattr(self, key)}")
        if self.prdc_samples < self.prdc_nearest_k + 2:
            raise ConfigError(f"config key 'eval.prdc_samples' must be at least eval.prdc_nearest_k + 2 "
                              f"({self.prdc_nearest_k + 2}), got {self.prdc_samples}")
        for spec in self.extra_fid_stats:
            try:
                split_space_spec(spec)
            except ValueError as error:
                raise ConfigError(f"config key 'eval.extra_fid_stats': {error}") from None
        if self.fid_stats_dir is not None and not self.fid_stats_dir.strip():
            raise ConfigError("config key 'eval.fid_stats_dir' is empty; name a directory or s3:// prefix, or null")
        if not self.champion_alias or any(c in self.champion_alias for c in "/@:"):
            raise ConfigError(f"config key 'eval.champion_alias' must be a plain name, got {self.champion_alias!r}")


@dataclass
class EvalSettings:
    """What one `gapm eval` / `eval-watch` scores against and how."""

    stats: str | None  # name, path, s3:// URL or cleanfid:DATASET/SPLIT/RES
    samples: int  # generated samples per FID
    kid: bool
    feature_extractor: str | None  # None: the one the statistics were made with
    inception_weights: str | None
    test_data: str | None = None  # None: the run's data.test
    seed: int = 0
    batch_size: int = 250
    device: str | None = None
    stats_dir: str | None = None  # where a plain `stats` name is looked up; None: reference_stats' default
    extra_stats: list[str] = field(default_factory=list)  # further feature spaces: [LABEL=]NAME_OR_URL
    fid_seeds: int = 3
    prdc_samples: int = 10000
    prdc_nearest_k: int = 5  # k of those k-NN metrics (Kynkäänniemi et al.: 3-5)

    @classmethod
    def from_config(cls, config: EvalConfig | None = None, **overrides: Any) -> "EvalSettings":
        """The settings of `config` (defaults: EvalConfig()), with the non-None `overrides`
        (command-line flags) taking precedence."""
        config = config or EvalConfig()
        values = {"stats": config.fid_stats, "samples": config.fid_samples, "kid": config.kid,
                  "feature_extractor": config.feature_extractor, "inception_weights": config.inception_weights,
                  "extra_stats": list(config.extra_fid_stats), "fid_seeds": config.fid_seeds,
                  "prdc_samples": config.prdc_samples, "prdc_nearest_k": config.prdc_nearest_k}
        values.update({key: value for key, value in overrides.items() if value is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


SPACE_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")  # MLflow metric keys allow these (eval/LABEL/fid)


def split_space_spec(spec: str) -> tuple[str | None, str]:
    """"LABEL=NAME_OR_URL" -> (LABEL, NAME_OR_URL); a plain "NAME_OR_URL" -> (None, it)."""
    label, equals, rest = spec.partition("=")
    if not equals or "/" in label or ":" in label:
        if not spec.strip():
            raise ValueError("an empty feature space; expected [LABEL=]NAME_OR_URL")
        return None, spec
    if not SPACE_LABEL.match(label) or not rest:
        raise ValueError(f"{spec!r}: expected LABEL=NAME_OR_URL with a label of letters, digits, '_', '.', '-'")
    return label, rest
