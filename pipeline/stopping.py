"""Stopping safely. SIGTERM (Kubernetes eviction, Slurm time limit) and SIGUSR1 (Slurm
`--signal`) ask training to write a checkpoint and exit with `EXIT_RESUMABLE` (75) at the next
step boundary instead of dying mid-step. Kept free of heavy imports: `gapm train` installs the
handlers before it imports torch, so a stop during start-up is not lost.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The stop request in force in this process (None outside one), and what else must hear of a
# stop at once: code that waits on something slow (a storage read, a retry's back-off) asks
# `stop_requested()` and gives up its wait instead of holding the stop up for minutes.
_active: "StopRequest | None" = None
_listeners: list[Callable[[], None]] = []

# Exit status of a run that checkpointed because it was asked to stop (preemption,
# eviction): "temporary failure, relaunch me" — the next launch with --resume auto goes on.
EXIT_RESUMABLE = 75


class TrainingInterrupted(Exception):
    """Training stopped and can go on: raised after the checkpoint that follows a stop signal
    has been written (or before training started). The CLI exits with EXIT_RESUMABLE."""

    def __init__(self, signal_name: str, checkpoint):
        saved = (f"checkpoint {checkpoint} written" if checkpoint is not None
                 else "before any checkpoint, nothing to save")
        super().__init__(f"stopped by {signal_name}; {saved}; relaunch with --resume auto to continue")
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
        global _active
        if self.previous:  # installed already (gapm train does it before its imports)
            return self
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
            _active = self
        return self

    def wait(self, timeout_s: float) -> bool:
        """Sleeps up to `timeout_s`, waking at once on a stop request; True if one came."""
        return self._event.wait(timeout_s) or self.received is not None

    def __exit__(self, *exc_info) -> None:
        global _active
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if _active is self:
            _active = None

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            log.warning("received %s: will checkpoint and stop after the current step",
                        signal.Signals(signum).name)
        self.received = signum
        self._event.set()
        for listener in list(_listeners):
            listener()

    def agreed(self, accelerator: Any) -> bool:
        """True on every rank once any rank has been signalled (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"


def stop_requested() -> bool:
    """True once the stop request in force in this process has received its signal."""
    active = _active
    return active is not None and active.received is not None


def on_stop_request(listener: Callable[[], None]) -> None:
    """Calls `listener()` from the signal handler whenever a stop request arrives (it must be
    quick and must not block: it runs between two bytecodes of whatever the main thread does)."""
    if listener not in _listeners:
        _listeners.append(listener)
