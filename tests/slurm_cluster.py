"""A real Slurm cluster of two emulated nodes on this host: munged, slurmctld and two slurmd.

Debian's slurm-wlm and munge packages, no systemd: every daemon runs in the foreground as a
child of this process, with its configuration, state, spool, logs and munge socket in one
temporary directory, and is stopped by its PID. Two slurmd (`-N n1`, `-N n2`) listening on
different ports of 127.0.0.1 play two compute nodes, so `sbatch --nodes=2` really runs one
task on each through slurmstepd, with Slurm's own variables and signal delivery.

Nothing outside that directory is touched: clients find the cluster through SLURM_CONF (see
`SlurmCluster.environment`), munged gets its own key and socket (the slurm.conf names it), so
a system munged or Slurm on the same host is left alone.

Used by the `slurm_cluster` fixture (tests/slurm_fixtures.py) and by hand, to try the batch
scripts in launch/slurm/ on one machine (run as root; Ctrl-C stops it):

    python tests/slurm_cluster.py          # prints the `export SLURM_CONF=...` to use
"""

from __future__ import annotations

import os
import pwd
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import free_port  # noqa: E402

NODES = ("n1", "n2")
PACKAGES = ("slurm-wlm", "munge")
# Daemons (in /usr/sbin) and the clients the tests and launch/slurm use.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/sbin")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
APT_TIMEOUT_S = 600.0


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine (not root, not installable); the message says why and
    what would fix it. Tests skip on it."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but a daemon did not come up; the message has its log. Tests fail on it."""


def find_program(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        found = next((str(Path(d) / name) for d in SBIN if (Path(d) / name).is_file()), None)
    return found


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if find_program(name) is None]


def ensure_installed() -> None:
    """Installs Debian's slurm-wlm and munge when a program is missing and we are root with
    apt-get; raises SlurmUnavailable (with the reason) when that is not possible."""
    missing = missing_programs()
    if not missing:
        return
    wanted = " ".join(PACKAGES)
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not root: apt-get install {wanted}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get to install {wanted}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
    if result.returncode != 0:  # a fresh machine's package lists may be empty or stale
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=APT_TIMEOUT_S)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
    if result.returncode != 0 or missing_programs():
        raise SlurmUnavailable(f"apt-get install {wanted} failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")


def check_can_run() -> None:
    """The daemons run as root here (SlurmUser=root, jobs run as the submitter), munged as the
    munge user the package creates."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the emulated Slurm cluster runs its daemons as root; run the tests as root")
    ensure_installed()
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("no 'munge' user: the munge package is not installed properly "
                               "(apt-get install --reinstall munge)") from None


@dataclass
class SlurmCluster:
    """The daemons of one emulated cluster; `start()` brings it up, `stop()` ends every daemon
    it started (by PID). `environment()` is what a client (sbatch, squeue, ...) needs."""

    directory: Path
    nodes: tuple[str, ...] = NODES
    partition: str = "debug"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    @property
    def munge_dir(self) -> Path:
        return self.directory / "munge"

    def log(self, daemon: str) -> Path:
        return self.directory / "log" / f"{daemon}.log"

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        sbin = [d for d in SBIN if d not in env.get("PATH", "").split(":")]
        if sbin:
            env["PATH"] = ":".join([env.get("PATH", ""), *sbin]).strip(":")
        return env

    # ------------------------------------------------------------------ start

    def start(self) -> "SlurmCluster":
        check_can_run()
        for sub in ("state", "spool", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [find_program("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_until_nodes_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        """munged refuses to run as root without --force: run it as the munge user, with a key,
        socket, pid and seed file of its own in a directory only that user may write."""
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        # The slurm daemons (root) reach the socket through the directory; munged checks
        # that no one but its user can write there.
        self.munge_dir.chmod(0o711)
        self.directory.chmod(0o711)
        command = [find_program("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
                   f"--pid-file={self.munge_dir / 'munged.pid'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
                   f"--log-file={self.munge_dir / 'munged.log'}", "--num-threads=2"]
        self._spawn("munged", command, user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.munge_socket.exists():
            self._check_alive("munged")
            if time.monotonic() > deadline:
                raise SlurmStartError(f"munged did not create {self.munge_socket}:\n{self.tail('munged')}")
            time.sleep(0.05)

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        node_lines = [f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} Port={free_port()} CPUs={cpus} "
                      f"State=UNKNOWN" for node in self.nodes]
        d = self.directory
        self.conf.write_text("\n".join([
            "# Written by tests/slurm_cluster.py: two slurmd on 127.0.0.1 emulate two nodes.",
            "ClusterName=gapm-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again
            # (default 120 s): shorter here so that the requeue tests do not idle for minutes.
            f"AuthInfo=socket={self.munge_socket},cred_expire=20",
            # No systemd, no cgroups: processes are tracked by parent PID, tasks not confined.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # start eligible jobs within seconds
            # launch/slurm picks the rendezvous port from the job id: start at a random id so
            # that two test sessions on one host do not pick the same ports.
            f"FirstJobId={random.randint(10_000, 1_000_000)}",
            "InactiveLimit=0",
            "KillWait=10",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the tests
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'state'}/slurmctld.pid",
            f"SlurmdPidFile={d / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",  # = self.log('slurmd-<node>')
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *node_lines,
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, command: list[str], **user: int) -> None:
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                    env=self.environment(), start_new_session=True, **user)

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise SlurmStartError(f"{name} exited with status {process.returncode} while starting:\n{self.tail(name)}")

    def _wait_until_nodes_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name in self.processes:
                self._check_alive(name)
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s.startswith("IDLE") for s in states.values()):
                return
            time.sleep(0.2)
        raise SlurmStartError(f"nodes not idle after {START_TIMEOUT_S:.0f}s: {states}\n{self.tail('slurmctld')}")

    # ------------------------------------------------------------------ use

    def client(self, *command: str, env: dict[str, str] | None = None, cwd: Path | str | None = None,
               check: bool = True, timeout: float = 30) -> str:
        """Runs a Slurm client command (sbatch, scontrol, ...) against this cluster in `env` (by
        default this process's environment; a job submitted with it inherits it); returns stdout."""
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.environment(env), cwd=cwd,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def node_states(self) -> dict[str, str]:
        out = self.client("scontrol", "-o", "show", "node", check=False)
        return dict(re.findall(r"NodeName=(\S+).*?\bState=(\S+)", out))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.client("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def active_jobs(self) -> list[str]:
        return self.client("squeue", "-h", "-o", "%i", check=False).split()

    def tail(self, daemon: str, chars: int = 3000) -> str:
        """The end of a daemon's output and log file (munged, slurmctld, slurmd-n1, ...)."""
        own_log = self.munge_dir / "munged.log" if daemon == "munged" else self.log(daemon)
        paths = [self.directory / "log" / f"{daemon}.out", own_log]
        return "".join(path.read_text(errors="replace") for path in paths if path.is_file())[-chars:]

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Cancels what still runs, then stops the daemons it started, by PID, nodes first."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            jobs = self.active_jobs()
            if jobs:
                self.client("scancel", *jobs, check=False)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while self.active_jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
        for name in [n for n in self.processes if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="gapm-slurm-"))
    try:
        cluster = SlurmCluster(directory).start()
    except (SlurmUnavailable, SlurmStartError) as error:
        print(f"slurm_cluster.py: error: {error}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return 2
    print(f"Slurm cluster up: nodes {', '.join(cluster.nodes)} on 127.0.0.1, files in {directory}\n"
          f"  export SLURM_CONF={cluster.conf} PATH=$PATH:/usr/sbin\n"
          "Ctrl-C stops it.", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
