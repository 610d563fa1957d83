"""launch/slurm/ under a real Slurm: the `slurm_cluster` fixture's two emulated nodes (n1, n2
on 127.0.0.1, see tests/slurm_cluster.py), jobs submitted with sbatch from the repository root
as the README's local recipe does, on CPU over gloo.

Fast: the cluster places one task on each node; train.sbatch's node commands (dry run) meet
at node 0's address; a missing config fails the job with status 2 and no requeue. Slow: a real
2-node training followed by eval.sbatch through --dependency=afterok, the time-limit path
(SIGUSR1 to the batch script -> checkpoint -> requeue -> the same job resumes and finishes),
and the exit-code cells of tests/integration/test_launch_exit_codes.py under Slurm: a config
typo fails the job with 2 and no requeue; a worker's own 75 (SIGTERM to one training process,
no signal to any script) requeues it and the requeued job finishes; a killed worker fails it.
"""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, clean_environment, tiny_overrides
from slurm_cluster import SlurmCluster

from pipeline import checkpoints

# The README's local recipe (Running on clusters > Local multi-node runs): the emulated nodes
# have no GPUs and two CPUs each, so the scripts' GPU and CPU requests are overridden.
LOCAL_SBATCH_OPTIONS = ["--gpus-per-node=0", "--cpus-per-task=1"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 600.0  # a hang guard only: these jobs take seconds to a minute or two
EXIT_RESUMABLE = 75


def job_environment(**extra: str) -> dict[str, str]:
    """What the job inherits from sbatch (--export=ALL): this environment without scheduler or
    MLflow variables (the jobs use the run's embedded store), training on CPU."""
    env = {k: v for k, v in clean_environment(GAPM_CPU="1", **extra).items() if not k.startswith("MLFLOW_")}
    return env


def submit(cluster: SlurmCluster, script: str, *arguments: str, log: Path, options: tuple[str, ...] = (),
           env: dict[str, str]) -> str:
    """`sbatch --parsable <local options> <options> launch/slurm/<script> <arguments>` from the
    repository root; returns the job id."""
    out = cluster.client("sbatch", "--parsable", *LOCAL_SBATCH_OPTIONS, f"--output={log}", *options,
                         f"launch/slurm/{script}", *arguments, env=env, cwd=ROOT)
    return out.strip().split(";")[0]


def job_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def wait_for_job(cluster: SlurmCluster, job_id: str, log: Path) -> dict[str, str]:
    """Polls until the job has ended (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = cluster.job(job_id)
        if job["JobState"] in FINAL_STATES:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']}:\n{job_log(log)[-4000:]}"
        time.sleep(0.5)


def node_commands(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in job_log(log).splitlines() if "pipeline.launcher" in line]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def set_arguments(output_dir: Path, *overrides: str) -> list[str]:
    return [arg for override in (f"output_dir={output_dir}", *overrides) for arg in ("--set", override)]


# --------------------------------------------------------------------------- fast

def test_the_docs_show_the_local_recipe_these_tests_submit():
    readme = (ROOT / "docs/clusters.md").read_text()
    options = " ".join(LOCAL_SBATCH_OPTIONS)
    for line in ("python3 tests/slurm_cluster.py",
                 f"sbatch --parsable {options} launch/slurm/train.sbatch configs/swissroll.yaml",
                 f"sbatch {options} --dependency=afterok:$jobid launch/slurm/eval.sbatch configs/swissroll.yaml",
                 "scancel --signal=USR1 --batch $jobid"):
        assert line in readme, f"docs/clusters.md no longer shows: {line}"


def test_where_slurm_cannot_run_the_reason_says_what_to_do(monkeypatch, tmp_path):
    """What the fixture skips with: not root, or not installed and not installable."""
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="runs its daemons as root"):
        slurm_cluster.SlurmCluster(tmp_path).start()
    monkeypatch.setattr(slurm_cluster, "find_program", lambda name: None)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="not installed and not root: apt-get install slurm-wlm munge"):
        slurm_cluster.ensure_installed()
    assert not (tmp_path / "slurm.conf").exists()


def test_the_cluster_runs_one_task_on_each_emulated_node(slurm_cluster, tmp_path):
    log = tmp_path / "job.out"
    out = slurm_cluster.client("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                               "--wrap", 'srun bash -c "echo task \\$SLURM_NODEID on \\$SLURMD_NODENAME"')
    job = wait_for_job(slurm_cluster, out.strip(), log)
    assert job["JobState"] == "COMPLETED", job_log(log)
    assert sorted(job_log(log).split("\n")[:-1]) == ["task 0 on n1", "task 1 on n2"]


def test_train_sbatch_node_commands_meet_at_node_0s_address(slurm_cluster, tmp_path):
    """train.sbatch as documented, GAPM_DRY_RUN=1: srun starts launch_node.sh on n1 and n2;
    both name node 0 by its NodeAddr (127.0.0.1: "n1" resolves nowhere) and the job's port."""
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/swissroll.yaml", "--set", "seed=3", log=log,
                    env=job_environment(GAPM_DRY_RUN="1"))
    job = wait_for_job(slurm_cluster, job_id, log)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "n[1-2]", job_log(log)
    commands = node_commands(log)
    assert sorted(option(command, "--machine_rank") for command in commands) == ["0", "1"], job_log(log)
    for command in commands:
        assert option(command, "--num_machines") == "2" and option(command, "--num_processes") == "2"
        assert option(command, "--main_process_ip") == "127.0.0.1"
        assert option(command, "--main_process_port") == str(20000 + int(job_id) % 10000)
        assert option(command, "--rdzv_backend") == "static"
        assert command[-6:] == ["--config", "configs/swissroll.yaml", "--set", "seed=3", "--resume", "auto"]


def test_train_sbatch_with_a_missing_config_fails_with_status_2_and_is_not_requeued(slurm_cluster, tmp_path):
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/no-such-experiment.yaml", log=log,
                    env=job_environment())
    job = wait_for_job(slurm_cluster, job_id, log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), job_log(log)
    assert "train.sbatch: error: config 'configs/no-such-experiment.yaml' not found" in job_log(log)


def test_eval_sbatch_with_a_config_typo_fails_with_2_and_ends_its_cycle(slurm_cluster, tmp_path):
    """GAPM_EVAL_EVERY queues the next evaluation first; bad input would fail it the same way,
    so the failing one cancels it."""
    log = tmp_path / "eval.out"
    job_id = submit(slurm_cluster, "eval.sbatch", "configs/swissroll.yaml",
                    *set_arguments(tmp_path, "stage1.stepz=1"), log=log,
                    env=job_environment(GAPM_EVAL_EVERY="now+1hour"))
    job = wait_for_job(slurm_cluster, job_id, log)
    output = job_log(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), output
    assert "unknown config key 'stage1.stepz'" in output and "Traceback" not in output
    next_id = output.split("next evaluation queued as job ", 1)[1].split()[0]
    assert f"cancelling the next evaluation, job {next_id}" in output
    assert slurm_cluster.job(next_id)["JobState"] == "CANCELLED"


# --------------------------------------------------------------------------- slow: real trainings

@pytest.mark.slow  # a 2-node training with MLflow, then an evaluation of its checkpoints: 40-90 s on 2 cores
def test_train_sbatch_on_two_nodes_then_eval_sbatch_after_it_scores_its_checkpoints(slurm_cluster, tmp_path):
    from mlflow import MlflowClient

    overrides = [*tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64,
                                 width=16, checkpoint_every=2, log_every=2, eval_samples=64, discriminator_steps=1,
                                 tracking=True), "tracking.system_metrics=false"]
    arguments = ["configs/swissroll.yaml", *set_arguments(tmp_path, *overrides)]
    env = job_environment(GAPM_LOG_LEVEL="INFO")
    train_log, eval_log = tmp_path / "train.out", tmp_path / "eval.out"
    train_id = submit(slurm_cluster, "train.sbatch", *arguments, log=train_log, env=env)
    eval_id = submit(slurm_cluster, "eval.sbatch", *arguments, log=eval_log, env=env,
                     options=(f"--dependency=afterok:{train_id}",))
    waiting = slurm_cluster.job(eval_id)
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency")

    train = wait_for_job(slurm_cluster, train_id, train_log)
    assert (train["JobState"], train["NumNodes"], train["NodeList"]) == ("COMPLETED", "2", "n[1-2]"), \
        job_log(train_log)[-4000:]
    for node in (0, 1):
        assert f"start_node.sh: node {node} of 2" in job_log(train_log)
    run_dir = tmp_path / "swissroll"
    assert json.loads((run_dir / "tags.json").read_text())["world_size"] == "2"
    assert json.loads((run_dir / "metrics.json").read_text())["distributed/max_parameter_divergence"] == 0
    steps = [checkpoints.read_meta(path).step for path in checkpoints.list_checkpoints(run_dir / "checkpoints")]
    assert sorted(steps) == [2, 4, 6]

    evaluation = wait_for_job(slurm_cluster, eval_id, eval_log)
    assert evaluation["JobState"] == "COMPLETED", job_log(eval_log)[-4000:]
    assert evaluation["StartTime"] >= train["EndTime"]  # same ISO format: the dependency held it back
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    scored = {metric.step for metric in client.get_metric_history(run_id, "eval/test_sample_mmd")}
    assert scored == {6}, job_log(eval_log)[-4000:]  # stage 2's checkpoint; stage 1's (2, 4) cannot generate
    assert "@champion: version" in job_log(eval_log)


@pytest.mark.slow  # a 2-node training stopped, requeued after Slurm's hold (20 s here) and finished: 60-120 s
def test_usr1_to_the_batch_script_checkpoints_requeues_and_the_same_job_finishes_from_the_checkpoint(
        slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` is what `#SBATCH --signal=B:USR1@120` does before the
    time limit: the script passes it to the training, both nodes stop at a checkpoint (exit
    75), the script requeues the job, and its next start resumes from that checkpoint."""
    total_stage1 = 300  # the signal arrives within the first few dozen steps, long before the end
    overrides = tiny_overrides(stage1_steps=total_stage1, stage2_steps=100, batch_size=32, samples=256,
                               test_samples=64, width=16, checkpoint_every=1000, log_every=10, eval_samples=64,
                               discriminator_steps=1)
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/swissroll.yaml", *set_arguments(tmp_path, *overrides),
                    log=log, env=job_environment(GAPM_LOG_LEVEL="INFO"))
    metrics = tmp_path / "swissroll" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), job_log(log)[-4000:]
        assert time.monotonic() < deadline, f"training did not start:\n{job_log(log)[-4000:]}"
        time.sleep(0.2)
    # What eval.sbatch's `--dependency=afterok` relies on: the requeue is not the job's end.
    after_log = tmp_path / "after.out"
    after_id = slurm_cluster.client("sbatch", "--parsable", f"--dependency=afterok:{job_id}", f"--output={after_log}",
                                    "--wrap", "true").strip()
    slurm_cluster.client("scancel", "--signal=USR1", "--batch", job_id)

    job = wait_for_job(slurm_cluster, job_id, log)
    output = job_log(log)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), output[-4000:]
    first_start, _, second_start = output.partition(f"train.sbatch: job {job_id} start 1 ")
    assert second_start, f"no second start of job {job_id}:\n{output[-4000:]}"
    assert "SIGUSR1 (time limit near)" in first_start and f"exiting {EXIT_RESUMABLE}" in first_start
    assert f"requeueing job {job_id}" in first_start
    # rank 0 speaks (node 0's launcher repeats its line in its own, which starts "gapm launch:")
    assert sum(line.startswith("gapm train: stopped by") for line in first_start.splitlines()) == 1
    assert "checkpoint None" not in output

    run_dir = tmp_path / "swissroll"
    saved = [checkpoints.read_meta(path) for path in checkpoints.list_checkpoints(run_dir / "checkpoints")]
    stopped = [meta for meta in saved if meta.stage == 1 and meta.stage_step < total_stage1]
    assert len(stopped) == 1 and stopped[0].stage_step > 0, [(m.stage, m.step) for m in saved]
    assert f"(stage 1, step {stopped[0].step})" in second_start and "resuming from" in second_start
    assert max(meta.step for meta in saved) == total_stage1 + 100
    assert json.loads((run_dir / "metrics.json").read_text())["distributed/max_parameter_divergence"] == 0
    after = wait_for_job(slurm_cluster, after_id, after_log)
    assert after["JobState"] == "COMPLETED" and after["StartTime"] >= job["EndTime"]


# --------------------------------------------------------------------------- slow: exit codes

# Long enough a stage 1 to be signalled while it trains (as in test_launch_exit_codes.py).
LONG_STAGE1 = 400
LONG = tiny_overrides(stage1_steps=LONG_STAGE1, stage2_steps=4, batch_size=32, samples=256, test_samples=64,
                      width=16, checkpoint_every=1000, log_every=5, eval_samples=64, discriminator_steps=1)
TRACEBACKS = ("Traceback", "ChildFailedError", "torch.distributed.elastic.multiprocessing.errors")


def training_processes(output_dir: Path) -> list[psutil.Process]:
    """The `gapm train` workers of the job writing to `output_dir` (not their launchers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if ("pipeline.cli" in cmdline and "train" in cmdline and "pipeline.launcher" not in cmdline
                and f"output_dir={output_dir}" in cmdline):
            found.append(process)
    return found


def signal_one_worker_once_training(cluster: SlurmCluster, job_id: str, log: Path, output_dir: Path,
                                    signum: int) -> None:
    metrics = output_dir / "swissroll" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), job_log(log)[-4000:]
        assert time.monotonic() < deadline, f"training did not start:\n{job_log(log)[-4000:]}"
        time.sleep(0.2)
    workers = sorted(training_processes(output_dir), key=lambda process: process.pid)
    assert len(workers) == 2, f"{workers}:\n{job_log(log)[-4000:]}"
    workers[-1].send_signal(signum)


@pytest.mark.slow  # two nodes that read the config and stop: 20-40 s
def test_a_config_typo_fails_the_job_with_2_and_one_line_and_no_requeue(slurm_cluster, tmp_path):
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/swissroll.yaml",
                    *set_arguments(tmp_path, *LONG, "stage1.stepz=1"), log=log, env=job_environment())
    job = wait_for_job(slurm_cluster, job_id, log)
    output = job_log(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), output[-4000:]
    assert "train.sbatch: nodes exited 2 2 " in output
    launcher_lines = [line for line in output.splitlines() if line.startswith("gapm launch: rank ")]
    assert len(launcher_lines) == 2 and all("unknown config key 'stage1.stepz'" in line and
                                            line.endswith("exiting 2: bad input: fix it, retrying cannot help")
                                            for line in launcher_lines), output[-4000:]
    for marker in TRACEBACKS:
        assert marker not in output


@pytest.mark.slow  # trains, stops with a worker's 75, requeued after Slurm's hold (20 s), finishes: 90-180 s
def test_a_workers_own_75_requeues_the_job_which_then_finishes(slurm_cluster, tmp_path):
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/swissroll.yaml", *set_arguments(tmp_path, *LONG),
                    log=log, env=job_environment(GAPM_LOG_LEVEL="INFO"))
    signal_one_worker_once_training(slurm_cluster, job_id, log, tmp_path, signal.SIGTERM)
    job = wait_for_job(slurm_cluster, job_id, log)
    output = job_log(log)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), output[-4000:]
    first_start, _, second_start = output.partition(f"train.sbatch: job {job_id} start 1 ")
    assert "train.sbatch: nodes exited 75 75 " in first_start, first_start[-4000:]
    assert f"requeueing job {job_id} (a node exited 75, resumable)" in first_start
    # Nobody signalled the training: the 75 is the worker's own. (srun ending the step once one
    # node exited may still reach the other node's launcher as it exits; it keeps its code.)
    assert "SIGUSR1" not in first_start and "asking the training processes" not in first_start
    assert "stopped by SIGTERM before training started" not in first_start
    for marker in TRACEBACKS:
        assert marker not in first_start
    saved = [checkpoints.read_meta(path) for path in checkpoints.list_checkpoints(tmp_path / "swissroll" / "checkpoints")]
    stopped = [meta for meta in saved if meta.stage == 1 and meta.stage_step < LONG_STAGE1]
    assert len(stopped) == 1 and f"(stage 1, step {stopped[0].step})" in second_start, second_start[-4000:]
    assert max(meta.step for meta in saved) == LONG_STAGE1 + 4


@pytest.mark.slow  # trains until one worker is killed: 40-90 s
def test_a_killed_worker_fails_the_job_without_requeue(slurm_cluster, tmp_path):
    log = tmp_path / "train.out"
    job_id = submit(slurm_cluster, "train.sbatch", "configs/swissroll.yaml", *set_arguments(tmp_path, *LONG),
                    log=log, env=job_environment())
    signal_one_worker_once_training(slurm_cluster, job_id, log, tmp_path, signal.SIGKILL)
    job = wait_for_job(slurm_cluster, job_id, log)
    output = job_log(log)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", output[-4000:]
    assert job["ExitCode"] not in ("0:0", "2:0", f"{EXIT_RESUMABLE}:0"), output[-4000:]
    assert "exited 137: failed: killed by SIGKILL" in output and "requeueing" not in output
