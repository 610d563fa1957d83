"""What every method is to the training loop and to its users: the `Method` protocol, and
`MethodBase`, which implements the user-facing half of it once for GAPM and every baseline.

The training protocol:

    kind: str                  "gapm", "vae", "aae", "wae", "introvae", "age", "alae"
    stages: list[list[str]]    per stage, the names of the submodules trained in it; stage k
                               (counted from 1, as in logs, metrics and checkpoints) trains
                               stages[k - 1]; each name is a direct submodule attribute and
                               gets its own optimizer
    stage_step(stage, trained, data, update) -> dict[str, float]
        One iteration of `stage` (1-based). `trained` maps each name of the stage to the module
        to call for forward passes that produce gradients (possibly a DistributedDataParallel
        wrapper of getattr(self, name)); `self.<name>` is the unwrapped module, used for extra
        forwards whose parameters must not get gradients (inside `frozen`). `update(name, loss)`
        owns backward and the optimizer step (`plain_update` outside the pipeline). `data` is in
        model space: points as given, images in [-1, 1]. Returns the losses as floats.

Within one `update(name, loss)`, every trained network that ran a forward with gradients is
called exactly once, all its parameters receive gradients from that loss, and no other
network's parameters receive any (extra forwards run on the unwrapped module, frozen or under
no_grad). That is what DistributedDataParallel needs without `find_unused_parameters`, and what
`plain_update` needs since it only zeroes the gradients of the network it steps.

The user API (no gradients; eval/train mode is the caller's choice): encode, decode,
reconstruct, prior_sample, sample_latents, sample, interpolate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gapm.shape import ModelShape

Update = Callable[[str, Tensor], None]


@runtime_checkable
class Method(Protocol):
    """A generative autoencoder the pipeline can train, checkpoint, sample and score."""

    kind: ClassVar[str]
    stages: ClassVar[list[list[str]]]
    Hyperparameters: ClassVar[type]
    shape: ModelShape

    @property
    def hyperparameters(self) -> dict[str, Any]: ...

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]: ...

    def encode(self, data: Tensor) -> Tensor: ...
    def decode(self, latent: Tensor) -> Tensor: ...
    def reconstruct(self, data: Tensor) -> Tensor: ...
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor: ...
    def interpolate(self, first: Tensor, second: Tensor, steps: int = 8) -> Tensor: ...

    # The parts of nn.Module the pipeline relies on.
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def modules(self) -> Iterator[nn.Module]: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def plain_update(optimizers: dict[str, torch.optim.Optimizer]) -> Update:
    """The ordinary backward / step / zero_grad, for use outside the pipeline."""

    def update(name: str, loss: Tensor) -> None:
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    return update


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stops gradients into `module`'s parameters (inputs still get gradients)."""
    previous = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), previous):
            p.requires_grad_(flag)


def interpolate_latents(first: Tensor, second: Tensor, mixing_coefficient: Tensor) -> Tensor:
    """μ·first + (1-μ)·second with one μ per sample."""
    weight = mixing_coefficient.view(-1, *([1] * (first.dim() - 1)))
    return weight * first + (1 - weight) * second


def require_positive_steps(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MethodBase(nn.Module):
    """The user API and the protocol checks, shared by every method. A subclass sets `kind`,
    `stages` and `Hyperparameters` (a dataclass of its settings), builds its networks, and
    implements `stage_step` and the hooks `_encode` and `_decode` (and, where its prior is not
    N(0, I) in the latent space itself, `prior_dim`, `_latent_from_prior`, `_prior`, `_mix`)."""

    kind: ClassVar[str]
    stages: ClassVar[list[list[str]]]
    Hyperparameters: ClassVar[type]

    def __init__(self, shape: ModelShape, **hyperparameters: Any):
        super().__init__()
        self.shape = shape
        self.hp = self.Hyperparameters(**hyperparameters)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self.hp)

    @property
    def prior_dim(self) -> int:
        return self.shape.latent_dim

    def check_stage(self, stage: int, trained: Mapping[str, nn.Module]) -> None:
        if not 1 <= stage <= len(self.stages):
            raise ValueError(f"{self.kind} has stages 1..{len(self.stages)}, not {stage}")
        if set(trained) != set(self.stages[stage - 1]):
            raise ValueError(f"{self.kind} stage {stage} trains {self.stages[stage - 1]}, "
                             f"got networks {sorted(trained)}")

    def stage_step(self, stage: int, trained: Mapping[str, nn.Module], data: Tensor,
                   update: Update) -> dict[str, float]:
        raise NotImplementedError

    # Hooks on the unwrapped networks.
    def _encode(self, data: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latent: Tensor) -> Tensor:
        raise NotImplementedError

    def _latent_from_prior(self, prior: Tensor) -> Tensor:
        return prior

    def _mix(self, first: Tensor, second: Tensor, coefficient: Tensor) -> Tensor:
        return interpolate_latents(first, second, coefficient)

    def _prior(self, count: int, device: torch.device) -> Tensor:
        """Prior noise for training steps (the global generator: seeded per iteration)."""
        return torch.randn(count, self.prior_dim, device=device)

    # The user-facing API: no gradients; eval/train mode is the caller's choice.

    @torch.no_grad()
    def encode(self, data: Tensor) -> Tensor:
        return self._encode(data)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        return self._decode(latent)

    @torch.no_grad()
    def reconstruct(self, data: Tensor) -> Tensor:
        return self._decode(self._encode(data))

    def prior_sample(self, count: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        device = device or next(self.parameters()).device
        return torch.randn(count, self.prior_dim, generator=generator, device=device)

    @torch.no_grad()
    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        return self._latent_from_prior(self.prior_sample(count, generator))

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        return self._decode(self.sample_latents(count, generator))

    @torch.no_grad()
    def interpolate(self, first: Tensor, second: Tensor, steps: int = 8) -> Tensor:
        """Decodes `steps` evenly spaced mixes of the embeddings of two batches:
        returns (steps, B, ...) from `first` (μ=1) to `second` (μ=0)."""
        latent_first, latent_second = self._encode(first), self._encode(second)
        frames = []
        for mu in torch.linspace(1.0, 0.0, steps):
            coefficient = torch.full((len(first),), float(mu), device=latent_first.device)
            frames.append(self._decode(self._mix(latent_first, latent_second, coefficient)))
        return torch.stack(frames)
