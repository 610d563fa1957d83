"""What multi-process training needs beyond Accelerate: agreeing to stop on a signal,
averaging BatchNorm statistics across ranks, and checking that ranks hold the same model."""

from __future__ import annotations

import logging
import signal
import threading

import torch
from accelerate import Accelerator
from torch import nn

log = logging.getLogger(__name__)

# Exit status of a run that checkpointed because it was asked to stop (preemption,
# eviction): "temporary failure, relaunch me" — the next launch with --resume auto goes on.
EXIT_RESUMABLE = 75


class TrainingInterrupted(Exception):
    """Raised after the checkpoint that follows a stop signal has been written."""

    def __init__(self, signal_name: str, checkpoint):
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint} written, "
                         "relaunch with --resume auto to continue")
        self.checkpoint = checkpoint


class StopRequest:
    """A request to stop at the next safe point instead of dying mid-work. For training,
    SIGTERM (Kubernetes eviction, Slurm time limit) and SIGUSR1 (Slurm `--signal`) make the
    loop checkpoint and exit at the next step boundary; a long-running job (eval-watch) passes
    its own signals and sleeps with `wait`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signals = self.SIGNALS if signals is None else signals
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self._event = threading.Event()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def wait(self, timeout_s: float) -> bool:
        """Sleeps up to `timeout_s`, waking at once on a stop request; True if one came."""
        return self._event.wait(timeout_s) or self.received is not None

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            log.warning("received %s: will checkpoint and stop after the current step",
                        signal.Signals(signum).name)
        self.received = signum
        self._event.set()

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank has been signalled (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"


def average_batchnorm_statistics(model: nn.Module, accelerator: Accelerator) -> None:
    """Replaces every BatchNorm running mean/var by its average over ranks.

    DDP runs with broadcast_buffers=False (see train.py), so each rank's running statistics
    come from its own data. Averaging them before stage 2 and before each checkpoint gives
    every rank, and the saved model, one shared latent normalisation.
    """
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


@torch.no_grad()
def parameter_fingerprint(model: nn.Module) -> torch.Tensor:
    """Three float64 numbers per tensor (sum, sum of squares, ramp-weighted sum) of every
    parameter and buffer: equal fingerprints mean equal models, for all practical purposes."""
    parts = []
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        flat = tensor.detach().double().flatten()
        ramp = torch.linspace(-1, 1, len(flat), dtype=torch.float64, device=flat.device)
        parts.append(torch.stack([flat.sum(), flat.pow(2).sum(), (flat * ramp).sum()]))
    return torch.cat(parts)


def max_parameter_divergence(model: nn.Module, accelerator: Accelerator) -> float:
    """Largest difference between any rank's fingerprint and rank 0's (0.0 when in sync)."""
    if accelerator.num_processes == 1:
        return 0.0
    fingerprints = accelerator.gather(parameter_fingerprint(model).unsqueeze(0))
    return (fingerprints - fingerprints[0]).abs().max().item()
