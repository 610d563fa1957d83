"""`gapm launch`: `accelerate launch` (same arguments) that keeps gapm's exit codes.

    gapm launch --config_file launch/accelerate/multi_gpu.yaml --num_processes 8 \\
        -m pipeline.cli train --config configs/swissroll.yaml

`accelerate launch` runs torch.distributed's elastic agent, which turns a worker's exit 2
("bad input") or 75 ("resumable") into 1 and prints a ChildFailedError traceback of ~30 lines.
Here the agent runs in this process as accelerate would run it, its ChildFailedError (or, for
one process, the failed subprocess) is caught, and the launcher exits by the contract of
pipeline/exit_codes.py: 2 if a worker exited 2, else 75 if one exited 75, else the first
failure's code (128 + N for a worker killed by signal N). Instead of the traceback there is one
line naming the deciding rank, its code and its reason: the line that worker printed, which it
also left in this launcher's GAPM_EXIT_REASONS_DIR.

Stopping: SIGTERM and SIGUSR1 are passed on to the training processes, which checkpoint and
exit 75; the launcher waits for them (torch's agent would give them 30 s, accelerate's
one-process launcher 5 s, before SIGKILL). A stop before any training process started ends the
launch at once with 75. SIGINT (Ctrl-C) keeps torch's meaning: stop the workers now.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence

from pipeline import exit_codes

PROG = "gapm launch"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What torch's agent still handles itself (its default without SIGTERM, which is ours).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
WATCH_INTERVAL_S = 0.2


def child_pids() -> list[int]:
    """This process's children: the training processes (torch's agent starts them directly)."""
    import psutil  # accelerate's dependency

    try:
        return [child.pid for child in psutil.Process().children()]
    except psutil.Error:
        return []


def _do_nothing(signum: int, frame) -> None:
    """The main thread's handler: StopForwarding's thread acts (see there)."""


class StopForwarding:
    """SIGTERM/SIGUSR1 -> the training processes, installed before the imports of accelerate
    and torch. The main thread may sit in torch's C++ for minutes (the rendezvous retries its
    connection, the exit barrier) where no Python signal handler runs, so a thread does the
    work, woken through the signal wakeup fd. Before any training process has started, a stop
    ends the launch at once with 75 (nothing to save); once they ran and are gone (the agent is
    finishing), it changes nothing: their own exit codes stand."""

    def __init__(self, on_exit=lambda: None) -> None:
        self.received: int | None = None
        self.workers_started = False
        self._on_exit = on_exit
        self._signals: set[int] = set()
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StopForwarding":
        for sig in STOP_SIGNALS:
            # Inherited "ignore" stays (start_node.sh ignores SIGUSR1): the training processes
            # inherit it too, and so cannot die of a SIGUSR1 before they install their handler.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, _do_nothing)
                self._signals.add(int(sig))
        self._pipe = os.pipe()
        for fd in self._pipe:
            os.set_blocking(fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="gapm-launch-stop")
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._thread is not None:
            self._thread.join(timeout=2 * WATCH_INTERVAL_S + 1)
        for fd in self._pipe or ():
            os.close(fd)

    def _serve(self) -> None:
        import select

        read_fd = self._pipe[0]
        while not self._done.is_set():
            ready, _, _ = select.select([read_fd], [], [], WATCH_INTERVAL_S)
            if not self.workers_started and child_pids():
                self.workers_started = True
            if not ready:
                continue
            try:
                received = os.read(read_fd, 256)
            except BlockingIOError:
                continue
            for signum in received:  # one byte per signal, its number
                if signum in self._signals:
                    self._stop(signum)

    def _stop(self, signum: int) -> None:
        self.received = signum
        workers = child_pids()
        if workers:
            self.workers_started = True
            for pid in workers:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        elif not self.workers_started:
            print(f"{PROG}: stopped by {signal.Signals(signum).name} before the training processes started, "
                  f"nothing to save; exiting {exit_codes.EXIT_RESUMABLE}: "
                  f"{exit_codes.meaning(exit_codes.EXIT_RESUMABLE)}", file=sys.stderr, flush=True)
            self._on_exit()
            os._exit(exit_codes.EXIT_RESUMABLE)  # the main thread may be deep in torch's C++


def _one_process_launcher(args) -> None:
    """accelerate's simple_launcher without its SIGTERM handler (5 s, then SIGKILL): the one
    training process gets the signal from StopForwarding and all the time it needs."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    command, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(command, env=env)
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, command)


def _quiet_intended_exits() -> None:
    """torch's agent logs 'failed (exitcode: 2) local_rank: ...' for every failure; for 2 and
    75 the launcher's own line says it better."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        intended = (exit_codes.EXIT_BAD_INPUT, exit_codes.EXIT_RESUMABLE)
        return not (str(record.msg).startswith("failed (exitcode:") and record.args
                    and record.args[0] in intended)

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(drop)


def launch(args) -> list[tuple[int, int]]:
    """Runs accelerate's launch of `args`; returns (global rank, exit code) of the processes
    that failed, first failure first (empty when all succeeded)."""
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args.quiet = False  # --quiet would turn the ChildFailedError into a bare exit 1
    args.signals_to_handle = AGENT_SIGNALS  # torch >= 2.6 (older: it also handles SIGTERM)
    _quiet_intended_exits()
    simple_launcher = accelerate_launch.simple_launcher
    accelerate_launch.simple_launcher = _one_process_launcher
    try:
        accelerate_launch.launch_command(args)
        return []
    except ChildFailedError as error:
        # In the order torch saw them fail (a stable sort keeps it within a second): the ones
        # its agent then stopped, with SIGTERM, come after the one that failed first.
        failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
        return [(rank, failure.exitcode) for rank, failure in failures]
    except subprocess.CalledProcessError as error:  # one process, or DeepSpeed's pdsh launcher
        return [(0, error.returncode)]
    finally:
        accelerate_launch.simple_launcher = simple_launcher


def summary(failures: Sequence[tuple[int, int]], reasons: Mapping[int, str]) -> tuple[int, str]:
    """The launcher's exit code for its failed ranks (first failure first) and the one line
    that says why: the deciding rank, its code and its reason, then the other ranks' codes."""
    codes = [(rank, exit_codes.normalized(code)) for rank, code in failures]
    code = exit_codes.combined(code for _, code in codes)
    deciding = [rank for rank, rank_code in codes if rank_code == code]
    # A crash: the first to fail is the cause. 2 or 75: every rank says the same; rank 0's
    # line names the checkpoint.
    decisive = min(deciding) if code in (exit_codes.EXIT_BAD_INPUT, exit_codes.EXIT_RESUMABLE) else deciding[0]
    reason = reasons.get(decisive) or (exit_codes.meaning(code) if code > 128 else "see its output above")
    others = [f"rank {rank} exited {rank_code}" for rank, rank_code in codes if rank != decisive]
    line = (f"{PROG}: rank {decisive} exited {code}: {reason}" + (f" ({'; '.join(others)})" if others else "")
            + f"; exiting {code}: {exit_codes.meaning(code)}")
    return code, line


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reasons_dir = tempfile.mkdtemp(prefix="gapm-launch-")
    with StopForwarding(on_exit=lambda: shutil.rmtree(reasons_dir, ignore_errors=True)):
        try:
            from accelerate.commands.launch import launch_command_parser

            parser = launch_command_parser()
            parser.prog = PROG
            args = parser.parse_args(argv)
            os.environ[exit_codes.REASONS_DIR_ENV] = reasons_dir  # inherited by the workers
            failures = launch(args)
        except SystemExit as stopped:  # accelerate: SIGINT/SIGHUP/SIGQUIT reached the agent; argparse
            if not isinstance(stopped.code, int) or stopped.code in (0, exit_codes.EXIT_BAD_INPUT):
                raise
            print(f"{PROG}: interrupted; exiting {stopped.code}: {exit_codes.meaning(stopped.code)}",
                  file=sys.stderr)
            return stopped.code
        finally:
            os.environ.pop(exit_codes.REASONS_DIR_ENV, None)
            reasons = exit_codes.exit_reasons(reasons_dir)
            shutil.rmtree(reasons_dir, ignore_errors=True)
    # The outcome is decided: a stop from now on (a scheduler ending the job step because another
    # node exited first) must not turn the workers' codes into a death by SIGTERM while this
    # process prints its line and shuts down (torch's interpreter shutdown takes seconds).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not failures:
        return exit_codes.EXIT_OK
    code, line = summary(failures, reasons)
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
