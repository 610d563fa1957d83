"""gapm's exit codes through every launcher (pipeline/exit_codes.py): 2 bad input, 75
resumable, anything else a failure — a fault matrix of real launches on CPU over gloo.

Faults: a config typo (`--set stage1.stepz=1`, every rank exits 2); a worker's own 75 (SIGTERM
to one training process only: the ranks agree, checkpoint and exit 75; no launcher is
signalled); a crash (SIGKILL to one training process). Layers: `gapm launch` with one and with
two processes, two "nodes" on this host through launch/start_node.sh, and launch/k8s/
entrypoint.sh with the variables of an Indexed Job and of a PyTorchJob, whose exit codes then
go through the manifests' own rules (podFailurePolicy; the training operator's ExitCode
policy). Each cell asserts every launcher's code and, for 2 and 75, that torch's
ChildFailedError traceback is gone and one line says why. Slurm: test_launch_slurm.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import ROOT, clean_environment, free_port, tiny_overrides

from pipeline import checkpoints

LAUNCH = ROOT / "launch"
K8S = LAUNCH / "k8s"
GAPM = str(Path(sys.executable).parent / "gapm")
TYPO = "stage1.stepz=1"
# A stage 1 long enough to be signalled while it trains, with no checkpoint before the stop's.
LONG = tiny_overrides(stage1_steps=400, stage2_steps=4, batch_size=32, samples=256, test_samples=64, width=16,
                      checkpoint_every=1000, log_every=5, eval_samples=64, discriminator_steps=1)
TRACEBACKS = ("Traceback", "ChildFailedError", "CalledProcessError", "torch.distributed.elastic.multiprocessing.errors")
LAUNCH_TIMEOUT_S = 240.0


def train_arguments(output_dir: Path, *extra: str) -> list[str]:
    overrides = [f"output_dir={output_dir}", *LONG, *extra]
    return ["--config", "configs/swissroll.yaml", *[arg for o in overrides for arg in ("--set", o)]]


@dataclass
class Launch:
    """Launchers started here (one per node), each in its own session, logging to a file."""

    processes: list[subprocess.Popen]
    logs: list[Path]
    run_dir: Path

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for process, log in zip(self.processes, self.logs):
                left = max(deadline - time.monotonic(), 0.1)
                try:
                    process.wait(left)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{log.name} still running after {timeout:.0f}s:\n{self.output()[-4000:]}")
        finally:
            self.stop()
        return [process.returncode for process in self.processes]

    def training_processes(self) -> list[psutil.Process]:
        """The `gapm train` workers (torch starts them in sessions of their own)."""
        found = []
        for process in self.processes:
            try:
                found += [child for child in psutil.Process(process.pid).children(recursive=True)
                          if "pipeline.cli" in child.cmdline() and "train" in child.cmdline()]
            except psutil.Error:
                continue
        return found

    def wait_until_training(self, timeout: float = LAUNCH_TIMEOUT_S) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while not (metrics.exists() and metrics.read_text().strip()):
            codes = [process.poll() for process in self.processes]
            assert None in codes, f"launchers ended ({codes}) before training:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no training after {timeout:.0f}s:\n{self.output()[-4000:]}"
            time.sleep(0.2)

    def signal_one_worker(self, signum: int) -> None:
        workers = sorted(self.training_processes(), key=lambda process: process.pid)
        assert workers, f"no training process found:\n{self.output()[-4000:]}"
        workers[-1].send_signal(signum)

    def stop(self) -> None:
        """Ends whatever is left, workers included (their sessions are not the launchers')."""
        for process in self.processes:
            try:
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.Error:
                continue
            for member in tree:
                try:
                    member.kill()
                except psutil.Error:
                    pass
            process.wait()

    def output(self, index: int | None = None) -> str:
        logs = self.logs if index is None else [self.logs[index]]
        return "\n".join(f"== {log.name}\n{log.read_text(errors='replace')}" for log in logs if log.exists())


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def gapm_launch(tmp_path: Path, processes: int, *extra: str) -> Launch:
    """`gapm launch` as the README shows it, on CPU: one process (accelerate's one-process path)
    or two over gloo (torch's elastic agent)."""
    if processes == 1:
        options = ["--cpu", "--num_processes", "1"]
        env = clean_environment()
    else:
        options = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
        env = clean_environment(ACCELERATE_USE_CPU="1")
    command = [GAPM, "launch", *options, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pipeline.cli", "train", *train_arguments(tmp_path, *extra)]
    log = tmp_path / "launch.log"
    return Launch([start(command, env, log)], [log], tmp_path / "swissroll")


NODE_LAYERS = ("start_node", "indexed-job", "pytorchjob")


def node_environment(layer: str, rank: int, port: int) -> dict[str, str]:
    """What each layer gives a node: start_node.sh's own variables, or what the Job controller
    or the training operator injects (+ the manifests' GAPM_* values, CPU instead of GPUs)."""
    if layer == "start_node":
        return dict(GAPM_NNODES="2", GAPM_NODE_RANK=str(rank), GAPM_MASTER_ADDR="127.0.0.1",
                    GAPM_MASTER_PORT=str(port), GAPM_CPU="1")
    if layer == "indexed-job":
        return dict(JOB_COMPLETION_INDEX=str(rank), GAPM_NNODES="2", GAPM_MASTER_ADDR="127.0.0.1",
                    GAPM_MASTER_PORT=str(port), GAPM_CPU="1")
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", GAPM_CPU="1",
                GAPM_EXIT_RESUMABLE=pytorchjob_env()["GAPM_EXIT_RESUMABLE"])


def two_nodes(tmp_path: Path, layer: str, *extra: str, name: str = "node", **env: str) -> Launch:
    """Node 1, then node 0 (node 1 waits for it); logs `<name>1.log`, `<name>0.log`."""
    script = LAUNCH / "start_node.sh" if layer == "start_node" else K8S / "entrypoint.sh"
    port = free_port()
    processes, logs = [], []
    for rank in (1, 0):
        logs.append(tmp_path / f"{name}{rank}.log")
        processes.append(start([str(script), *train_arguments(tmp_path, *extra)],
                               clean_environment(**node_environment(layer, rank, port), **env), logs[-1]))
    return Launch(processes, logs, tmp_path / "swissroll")


# --------------------------------------------------------------------------- the manifests' rules

def manifest(name: str, kind: str) -> dict:
    return next(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc and doc["kind"] == kind)


def pytorchjob_env() -> dict[str, str]:
    container = manifest("pytorchjob.yaml", "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"]["containers"][0]
    return {entry["name"]: entry["value"] for entry in container["env"] if "value" in entry}


def indexed_job_action(exit_code: int) -> str:
    """What the Job controller does with a pod of indexed-job.yaml whose container `gapm`
    exited with `exit_code`: the first podFailurePolicy rule whose onExitCodes matches
    (operator In / NotIn, optional containerName), else Count (a failure against backoffLimit)."""
    for rule in manifest("indexed-job.yaml", "Job")["spec"]["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes is None or codes.get("containerName", "gapm") != "gapm":
            continue
        listed = exit_code in codes["values"]
        if listed if codes["operator"] == "In" else (not listed and exit_code != 0):
            return rule["action"]
    return "Count"


def pytorchjob_outcome(exit_code: int) -> str:
    """The Kubeflow training operator (v1.9, pkg/controller.v1/common/pod.go) with replicas'
    restartPolicy ExitCode: a pod that exited 128-255 is deleted and recreated, 1-127 fail the job."""
    policies = {spec["restartPolicy"] for spec in
                manifest("pytorchjob.yaml", "PyTorchJob")["spec"]["pytorchReplicaSpecs"].values()}
    assert policies == {"ExitCode"}
    return "succeeded" if exit_code == 0 else "restart" if exit_code >= 128 else "fail job"


def test_the_manifests_map_the_contracts_codes():
    assert indexed_job_action(2) == "FailJob"
    assert indexed_job_action(75) == "Ignore"
    assert indexed_job_action(1) == indexed_job_action(137) == "Count"
    resumable = int(pytorchjob_env()["GAPM_EXIT_RESUMABLE"])
    assert pytorchjob_outcome(resumable) == "restart" and pytorchjob_outcome(2) == "fail job"


def test_start_node_rejects_an_exit_status_out_of_range():
    result = subprocess.run([str(LAUNCH / "start_node.sh")], capture_output=True, text=True, timeout=30,
                            env=clean_environment(GAPM_DRY_RUN="1", GAPM_CPU="1", GAPM_EXIT_RESUMABLE="300"))
    assert result.returncode == 2 and "GAPM_EXIT_RESUMABLE must be an exit status 1-255" in result.stderr


# --------------------------------------------------------------------------- checks of one cell

def assert_one_line_instead_of_the_traceback(output: str, code: int) -> None:
    lines = [line for line in output.splitlines() if line.startswith("gapm launch: rank ")]
    assert lines and all(f"; exiting {code}: " in line for line in lines), output[-4000:]
    for marker in TRACEBACKS:
        assert marker not in output, f"{marker!r} in:\n{output[-4000:]}"


def assert_stopped_at_a_checkpoint(run_dir: Path) -> None:
    saved = [checkpoints.read_meta(path) for path in checkpoints.list_checkpoints(run_dir / "checkpoints")]
    assert [(meta.stage, 0 < meta.stage_step < 400) for meta in saved] == [(1, True)], saved


# --------------------------------------------------------------------------- cheap cells

@pytest.mark.parametrize("processes", [1, 2])
def test_a_typo_through_gapm_launch_exits_2_with_one_line(tmp_path, processes):
    launch = gapm_launch(tmp_path, processes, TYPO)
    assert launch.wait() == [2], launch.output()
    assert_one_line_instead_of_the_traceback(launch.output(), 2)
    assert "unknown config key 'stage1.stepz'" in launch.output()


def test_a_stop_before_the_training_processes_start_exits_75_at_once(tmp_path):
    """Node 1 alone: its launcher waits in torch's C++ rendezvous for node 0, where no Python
    signal handler runs; SIGTERM to start_node.sh still ends it at once with 75."""
    port = free_port()
    log = tmp_path / "node1.log"
    launch = Launch([start([str(LAUNCH / "start_node.sh"), *train_arguments(tmp_path)],
                           clean_environment(**node_environment("start_node", 1, port)), log)], [log], tmp_path)
    deadline = time.monotonic() + 60
    while not any("pipeline.launcher" in " ".join(child.cmdline())
                  for child in psutil.Process(launch.processes[0].pid).children()):
        assert time.monotonic() < deadline and launch.processes[0].poll() is None, launch.output()
        time.sleep(0.2)
    time.sleep(3)  # into the rendezvous
    launch.processes[0].send_signal(signal.SIGTERM)
    assert launch.wait(timeout=60) == [75], launch.output()
    assert "gapm launch: stopped by SIGTERM before the training processes started" in launch.output()
    assert "start_node.sh: node 1 of 2 exits 75" in launch.output()


def test_a_stop_after_the_workers_exited_keeps_their_code(tmp_path):
    """A scheduler ends a node's job step when another node exited first (srun, an Indexed Job);
    by then this node's workers may have exited 2 and its launcher be printing its line or
    shutting down: the SIGTERM must not turn that 2 into a death by signal (which start_node.sh
    reports as 75, resumable, and a scheduler retries)."""
    script = (f"import os, signal, sys\nfrom pipeline import launcher\n"
              f"code = launcher.main({['--cpu', '--num_processes', '1', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'pipeline.cli', 'train', *train_arguments(tmp_path, TYPO)]!r})\n"
              "os.kill(os.getpid(), signal.SIGTERM)  # as srun's would arrive during the shutdown\n"
              "print('still here after SIGTERM', file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "still here after SIGTERM" in done.stderr and "unknown config key 'stage1.stepz'" in done.stderr


# --------------------------------------------------------------------------- slow cells

@pytest.mark.slow  # one or two processes train until signalled: 20-50 s each on 2 shared cores
@pytest.mark.parametrize("processes", [1, 2])
def test_a_workers_own_75_through_gapm_launch(tmp_path, processes):
    launch = gapm_launch(tmp_path, processes)
    launch.wait_until_training()
    launch.signal_one_worker(signal.SIGTERM)
    assert launch.wait() == [75], launch.output()
    assert_one_line_instead_of_the_traceback(launch.output(), 75)
    assert_stopped_at_a_checkpoint(launch.run_dir)


@pytest.mark.slow  # two processes train until one is killed: 20-40 s
def test_a_killed_worker_through_gapm_launch_is_a_failure(tmp_path):
    launch = gapm_launch(tmp_path, 2)
    launch.wait_until_training()
    launch.signal_one_worker(signal.SIGKILL)
    assert launch.wait() == [137], launch.output()
    assert "exited 137: failed: killed by SIGKILL" in launch.output()


@pytest.mark.slow  # two nodes reading the config: 15-40 s each
@pytest.mark.parametrize("layer", NODE_LAYERS)
def test_a_typo_through_two_nodes_exits_2_and_is_never_retried(tmp_path, layer):
    launch = two_nodes(tmp_path, layer, TYPO)
    codes = launch.wait()
    assert codes == [2, 2], launch.output()
    assert_one_line_instead_of_the_traceback(launch.output(), 2)
    if layer == "indexed-job":
        assert {indexed_job_action(code) for code in codes} == {"FailJob"}
    if layer == "pytorchjob":
        assert {pytorchjob_outcome(code) for code in codes} == {"fail job"}


@pytest.mark.slow  # two nodes train until one worker is signalled: 30-60 s each
@pytest.mark.parametrize("layer", NODE_LAYERS)
def test_a_workers_own_75_through_two_nodes_restarts_them(tmp_path, layer):
    launch = two_nodes(tmp_path, layer)
    launch.wait_until_training()
    launch.signal_one_worker(signal.SIGTERM)  # one training process: no launcher sees a signal
    codes = launch.wait()
    resumable = int(pytorchjob_env()["GAPM_EXIT_RESUMABLE"]) if layer == "pytorchjob" else 75
    assert codes == [resumable, resumable], launch.output()
    assert "start_node.sh: received SIG" not in launch.output()  # no launcher was signalled
    assert_one_line_instead_of_the_traceback(launch.output(), 75)
    assert_stopped_at_a_checkpoint(launch.run_dir)
    if layer == "indexed-job":
        assert {indexed_job_action(code) for code in codes} == {"Ignore"}
    if layer == "pytorchjob":
        assert {pytorchjob_outcome(code) for code in codes} == {"restart"}


@pytest.mark.slow  # two nodes train until one worker is killed: 30-60 s each
@pytest.mark.parametrize("layer", ["start_node", "indexed-job"])
def test_a_killed_worker_through_two_nodes_is_a_failure(tmp_path, layer):
    launch = two_nodes(tmp_path, layer)
    launch.wait_until_training()
    launch.signal_one_worker(signal.SIGKILL)
    codes = launch.wait()
    assert 137 in codes and not set(codes) & {0, 2, 75}, f"{codes}:\n{launch.output()[-4000:]}"
    if layer == "indexed-job":
        assert {indexed_job_action(code) for code in codes} == {"Count"}


@pytest.mark.slow  # stopped by a worker's 75, then relaunched to the end: 60-120 s
def test_after_a_workers_own_75_the_relaunch_resumes_and_finishes(tmp_path):
    launch = two_nodes(tmp_path, "start_node")
    launch.wait_until_training()
    launch.signal_one_worker(signal.SIGTERM)
    assert launch.wait() == [75, 75], launch.output()
    (stopped,) = checkpoints.list_checkpoints(launch.run_dir / "checkpoints")
    relaunch = two_nodes(tmp_path, "start_node", name="relaunch", GAPM_LOG_LEVEL="INFO")
    assert relaunch.wait() == [0, 0], relaunch.output()
    assert f"resuming from {stopped}" in relaunch.output(), relaunch.output()[-4000:]
    final = max(checkpoints.read_meta(path).step for path in checkpoints.list_checkpoints(launch.run_dir / "checkpoints"))
    assert final == 400 + 4
