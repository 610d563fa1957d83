"""Every method by name: the registry the pipeline builds models and validates settings from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gapm.baselines.aae import AAE
from gapm.baselines.age import AGE
from gapm.baselines.alae import ALAE
from gapm.baselines.introvae import IntroVAE
from gapm.baselines.vae import VAE
from gapm.baselines.wae import WAE
from gapm.method import MethodBase
from gapm.model import GAPM
from gapm.shape import ModelShape

METHODS: dict[str, type[MethodBase]] = {
    "gapm": GAPM, "vae": VAE, "aae": AAE, "wae": WAE, "introvae": IntroVAE, "age": AGE, "alae": ALAE,
}


def method_class(kind: str) -> type[MethodBase]:
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[kind]


def build_model(kind: str, shape: ModelShape, **hyperparameters: Any) -> MethodBase:
    """The model for `kind` (a key of METHODS) built for `shape`. Unknown hyper-parameters raise
    TypeError naming them; each method's `Hyperparameters` dataclass lists the valid ones."""
    return method_class(kind)(shape, **hyperparameters)


def model_from_meta(meta: Mapping[str, Any], weights: Mapping[str, Tensor]) -> MethodBase:
    """The model a checkpoint's meta.json describes (`model_kind`, `model_shape`,
    `hyperparameters`) with `weights` loaded, in eval mode: how a checkpoint, the registry and
    the served model all rebuild one. ValueError for a meta without a usable shape or kind,
    TypeError for unknown hyper-parameters, RuntimeError for weights of another model."""
    try:
        kind, shape = meta.get("model_kind", "gapm"), ModelShape.from_dict(meta["model_shape"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a gapm checkpoint meta.json ({error})") from None
    model = build_model(kind, shape, **meta.get("hyperparameters", {}))
    model.load_state_dict(weights)
    return model.eval()
