"""Experiment matrices on schedulers: launch/matrix_element.sh and launch/matrix_report.sh, the Slurm
job array (launch/slurm/matrix.sbatch, matrix_report.sbatch, submit_matrix.sh) and the Kubernetes
Indexed Job (launch/k8s/matrix-indexed-job.yaml, matrix-report-job.yaml).

Fast: the index each scheduler gives, the array task's exit codes (75 requeues that task, 2 and
failures never do) and SIGUSR1 passed on, run outside Slurm with stand-ins for srun, scontrol and
sbatch; the submit helper sizing the array from `gapm matrix list`; the report naming unfinished
elements; the Slurm logs folder; the manifests' wiring; a stopped element exiting 75 after its
checkpoint. Slow: the array and its dependent report job on the real two-node Slurm of
tests/slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, clean_environment, tiny_overrides

LAUNCH = ROOT / "launch"
K8S = LAUNCH / "k8s"
LOGS = LAUNCH / "slurm" / "logs"
IMAGE_ROOT = "/opt/gapm"
EXIT_RESUMABLE = 75
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# A 2-row x 2-seed swiss-roll matrix at a tiny budget (as tests/integration/test_matrix.py).
TINY = [o for o in tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64,
                                  width=8, checkpoint_every=2, log_every=2, eval_samples=64)
        if "discriminator_steps" not in o]


def write_matrix(directory: Path, **changes) -> Path:
    values = {"name": "roll", "output_dir": str(directory / "runs"), "seeds": [0, 1], "threads": 1, "set": TINY,
              "eval": ["-n", "64", "--no-log"],
              "runs": [{"config": str(ROOT / "configs/swissroll.yaml"), "name": "gapm",
                        "set": ["model.hyperparameters.discriminator_steps=1"]},
                       {"config": str(ROOT / "configs/swissroll-vae.yaml"), "name": "vae"}]}
    values.update(changes)
    path = directory / "matrix.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_script(script: Path | str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- the element's index

@pytest.mark.parametrize("variables, index", [
    (dict(SLURM_ARRAY_TASK_ID="3"), "3"),
    (dict(JOB_COMPLETION_INDEX="20"), "20"),
    (dict(GAPM_MATRIX_INDEX="1", SLURM_ARRAY_TASK_ID="3"), "1"),  # explicit wins
])
def test_matrix_element_takes_its_index_from_the_scheduler(variables, index):
    result = run_script(LAUNCH / "matrix_element.sh", "configs/matrices/fashion-mnist-table1.yaml",
                        env=clean_environment(GAPM_DRY_RUN="1", **variables))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [sys.executable, "-m", "pipeline.cli", "matrix", "element",
                                          "configs/matrices/fashion-mnist-table1.yaml", "--index", index]


@pytest.mark.parametrize("variables, arguments, message", [
    ({}, ["m.yaml"], "no element index: run this as a Slurm array task"),
    (dict(JOB_COMPLETION_INDEX="x1"), ["m.yaml"], "must be a number >= 0, got 'x1'"),
    (dict(JOB_COMPLETION_INDEX="1"), [], "usage: launch/matrix_element.sh MATRIX_FILE"),
])
def test_matrix_element_without_a_usable_index_says_so(variables, arguments, message):
    result = run_script(LAUNCH / "matrix_element.sh", *arguments, env=clean_environment(GAPM_DRY_RUN="1", **variables))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


# --------------------------------------------------------------------------- the array task (no Slurm)

def stand_ins(directory: Path, element: str) -> dict[str, str]:
    """srun (runs its command), scontrol (records its arguments) and a python that records its
    arguments and does `element` (bash) instead of gapm's element; the environment of array task
    3 of array job 100 that uses them."""
    directory.mkdir(parents=True, exist_ok=True)
    scripts = {
        "srun": 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": 'echo "$*" >> "$STAND_IN_CALLS"\n',
        "python": 'if [[ $1 == -c ]]; then exit 0; fi  # launch/gapm_python.sh asks for its modules\n'
                  'echo "python $*" >> "$STAND_IN_CALLS"\n' + element + "\n",
    }
    for name, body in scripts.items():
        (directory / name).write_text("#!/usr/bin/env bash\n" + body)
        (directory / name).chmod(0o755)
    return clean_environment(PATH=f"{directory}:{os.environ['PATH']}", GAPM_PYTHON=str(directory / "python"),
                             STAND_IN_CALLS=str(directory / "calls"), SLURM_ARRAY_JOB_ID="100", SLURM_JOB_ID="104",
                             SLURM_ARRAY_TASK_ID="3", SLURM_SUBMIT_DIR=str(ROOT))


def calls(directory: Path) -> list[str]:
    path = directory / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("status, job_status, requeued", [
    (0, 0, False),
    (EXIT_RESUMABLE, 0, True),  # requeued: the job itself ends well, the requeued task resumes
    (2, 2, False),  # bad input: never requeued
    (1, 1, False),
])
def test_an_array_task_requeues_itself_on_75_only(tmp_path, status, job_status, requeued):
    env = stand_ins(tmp_path / "bin", f"exit {status}")
    result = run_script(LAUNCH / "slurm/matrix.sbatch", "configs/matrices/fashion-mnist-table1.yaml", env=env)
    assert result.returncode == job_status, result.stderr
    recorded = calls(tmp_path / "bin")
    assert recorded[0] == "python -m pipeline.cli matrix element configs/matrices/fashion-mnist-table1.yaml --index 3"
    assert recorded[1:] == (["requeue 100_3"] if requeued else [])
    if status == 2:
        assert "not requeued" in result.stderr and "--array=3" in result.stderr


def test_an_array_task_passes_sigusr1_on_and_requeues(tmp_path):
    """Slurm's --signal=B:USR1@120 reaches only the batch script: it must reach the element,
    whose training checkpoints and exits 75 (here: a stand-in that does just that)."""
    env = stand_ins(tmp_path / "bin", "sleep 60 &\nsleeper=$!\ntrap 'kill $sleeper; exit 75' USR1\n"
                                      "echo element-ready >> \"$STAND_IN_CALLS\"\nwait")
    process = subprocess.Popen([str(LAUNCH / "slurm/matrix.sbatch"), "configs/matrices/fashion-mnist-table1.yaml"],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "element-ready" not in calls(tmp_path / "bin"):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "SIGUSR1 (time limit near)" in stderr and calls(tmp_path / "bin")[-1] == "requeue 100_3"


def test_a_batch_script_outside_an_array_says_how_to_submit(tmp_path):
    env = stand_ins(tmp_path / "bin", "exit 0")
    del env["SLURM_ARRAY_TASK_ID"]
    result = run_script(LAUNCH / "slurm/matrix.sbatch", "configs/matrices/fashion-mnist-table1.yaml", env=env)
    assert result.returncode == 2 and "submit with --array=0-N" in result.stderr
    missing = run_script(LAUNCH / "slurm/matrix.sbatch", "configs/matrices/nope.yaml", env=env)
    assert missing.returncode == 2 and "matrix file 'configs/matrices/nope.yaml' not found" in missing.stderr
    assert calls(tmp_path / "bin") == []


def fake_sbatch(directory: Path) -> dict[str, str]:
    """sbatch that records its arguments and answers job ids 500, 501, ... (--parsable)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sbatch").write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> "$STAND_IN_CALLS"\n'
        'echo "$((500 + $(wc -l < "$STAND_IN_CALLS") - 1));cluster"\n')
    (directory / "sbatch").chmod(0o755)
    return clean_environment(PATH=f"{directory}:{os.environ['PATH']}", STAND_IN_CALLS=str(directory / "calls"))


def test_submit_sizes_the_array_from_the_matrix_and_queues_the_report_after_it(tmp_path):
    matrix = write_matrix(tmp_path)
    env = fake_sbatch(tmp_path / "bin")
    result = run_script(LAUNCH / "slurm/submit_matrix.sh", str(matrix), "--partition=debug", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["500", "501"]
    array, report = calls(tmp_path / "bin")
    assert array == f"--parsable --array=0-3 --partition=debug launch/slurm/matrix.sbatch {matrix}"
    assert report == f"--parsable --dependency=afterany:500 --partition=debug launch/slurm/matrix_report.sbatch {matrix}"

    again = run_script(LAUNCH / "slurm/submit_matrix.sh", str(matrix), "--array=1,3", env=env, timeout=120)
    assert again.returncode == 0 and calls(tmp_path / "bin")[2].startswith("--parsable --array=1,3 launch/slurm/")


def test_submit_refuses_a_broken_matrix_before_queueing_anything(tmp_path):
    matrix = write_matrix(tmp_path, seeds=[0, 0])
    env = fake_sbatch(tmp_path / "bin")
    result = run_script(LAUNCH / "slurm/submit_matrix.sh", str(matrix), env=env, timeout=120)
    assert result.returncode == 2 and "distinct seeds" in result.stderr
    spaced = run_script(LAUNCH / "slurm/submit_matrix.sh", "configs/matrices/fashion-mnist-table1.yaml", "--time",
                        "1:00", env=env)
    assert spaced.returncode == 2 and "--name=value form" in spaced.stderr
    assert calls(tmp_path / "bin") == []


def fake_results(matrix_path: Path, indices: list[int]) -> None:
    """The files a finished, evaluated element leaves (training metrics, eval.json, its record)."""
    from pipeline.matrix import ELEMENT_RECORD, EVAL_RECORD, eval_fingerprint, expand, load_matrix, run_dir

    matrix = load_matrix(matrix_path)
    for element in (e for e in expand(matrix) if e.index in indices):
        directory = run_dir(matrix, element)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "metrics.json").write_text(json.dumps({"eval/test_sample_mmd": 0.1 + element.index}))
        (directory / EVAL_RECORD).write_text(json.dumps({"step": 6, "metrics": {"eval/test_sample_mmd": 0.2}}))
        (directory / ELEMENT_RECORD).write_text(json.dumps({"train_seconds": 10.0,
                                                            "eval_fingerprint": eval_fingerprint(matrix)}))


def test_the_report_is_written_and_names_the_elements_that_did_not_finish(tmp_path):
    matrix = write_matrix(tmp_path)
    fake_results(matrix, [0, 1, 3])
    env = clean_environment()
    partial = run_script(LAUNCH / "matrix_report.sh", str(matrix), env=env, timeout=120)
    assert partial.returncode == 1, partial.stderr
    assert "not finished: element(s) 2 (pending)" in partial.stderr and f"{matrix} --array=2" in partial.stderr
    table = (tmp_path / "runs/roll/report/roll.md").read_text()
    assert "| gapm | 0,1 |" in table and "| vae | 1 |" in table  # seed 0 of vae is element 2

    fake_results(matrix, [2])
    complete = run_script(LAUNCH / "matrix_report.sh", str(matrix), env=env, timeout=120)
    assert complete.returncode == 0 and "every element" in complete.stderr, complete.stderr
    assert "| vae | 0,1 |" in (tmp_path / "runs/roll/report/roll.md").read_text()


def test_every_slurm_log_goes_to_the_ignored_logs_folder():
    scripts = sorted((LAUNCH / "slurm").glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"train.sbatch", "eval.sbatch", "matrix.sbatch", "matrix_report.sbatch"}
    for script in scripts:
        outputs = [line.split("=", 1)[1] for line in script.read_text().splitlines()
                   if line.startswith("#SBATCH --output=")]
        assert len(outputs) == 1 and outputs[0].startswith("launch/slurm/logs/"), script.name
    tracked = subprocess.run(["git", "ls-files", "launch/slurm/logs"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.split() == ["launch/slurm/logs/.gitignore"]  # exists in every checkout, holds no log
    for log in ("gapm-train-123.out", "gapm-matrix-5_2.out"):
        assert subprocess.run(["git", "check-ignore", "-q", f"launch/slurm/logs/{log}"], cwd=ROOT).returncode == 0
    docs = (ROOT / "docs/clusters.md").read_text()
    assert "launch/slurm/logs/" in docs and "tail -f gapm-train-" not in docs


# --------------------------------------------------------------------------- Kubernetes

def manifest(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc}


def test_the_indexed_job_runs_each_element_of_its_matrix_once(tmp_path, monkeypatch):
    from pipeline.matrix import expand, load_matrix

    objects = manifest("matrix-indexed-job.yaml")
    configmap, job = objects["ConfigMap"], objects["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container, = pod["containers"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    assert container["command"] == [f"{IMAGE_ROOT}/launch/matrix_element.sh"]
    assert (ROOT / "launch/matrix_element.sh").is_file()
    # the matrix file: the ConfigMap's, where the pod mounts it
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    matrix_file = Path(container["args"][0])
    assert container["args"] == [str(matrix_file)]
    assert mounts[str(matrix_file.parent)]["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][matrix_file.name]
    (tmp_path / matrix_file.name).write_text(text)
    monkeypatch.chdir(ROOT)  # the matrix's configs are relative to the image's /opt/gapm
    matrix = load_matrix(tmp_path / matrix_file.name)
    assert spec["completions"] == len(expand(matrix)), "completions must be the matrix's element count"
    # the runs go to the shared claim
    claim_mount = next(path for path, volume in mounts.items() if "persistentVolumeClaim" in volume)
    assert Path(matrix.output_dir).is_relative_to(claim_mount)
    # 2 fails the Job, 75 and evictions are not failures
    rules = {(rule["action"], tuple(rule["onExitCodes"]["values"])) for rule in spec["podFailurePolicy"]["rules"]
             if "onExitCodes" in rule}
    assert rules == {("FailJob", (2,)), ("Ignore", (EXIT_RESUMABLE,))}
    assert {rule["onExitCodes"]["containerName"] for rule in spec["podFailurePolicy"]["rules"]
            if "onExitCodes" in rule} == {container["name"]}
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["fsGroup"] == 1000
    # the pod's command, given the index the Job controller sets
    result = run_script(LAUNCH / "matrix_element.sh", str(tmp_path / matrix_file.name),
                        env=clean_environment(GAPM_DRY_RUN="1", JOB_COMPLETION_INDEX=str(spec["completions"] - 1)))
    assert shlex.split(result.stdout)[-2:] == ["--index", str(spec["completions"] - 1)], result.stderr


def test_the_report_job_reads_the_same_matrix_and_runs():
    job = manifest("matrix-indexed-job.yaml")["Job"]
    report = manifest("matrix-report-job.yaml")["Job"]
    element_pod, report_pod = job["spec"]["template"]["spec"], report["spec"]["template"]["spec"]
    element, = element_pod["containers"]
    container, = report_pod["containers"]
    assert container["command"] == [f"{IMAGE_ROOT}/launch/matrix_report.sh"]
    assert container["args"] == element["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == \
           {m["mountPath"] for m in element["volumeMounts"]} - {"/dev/shm"}
    assert report_pod["volumes"] == [v for v in element_pod["volumes"] if v["name"] != "dshm"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "kubectl wait --for=condition=complete" in (K8S / "matrix-report-job.yaml").read_text()


# --------------------------------------------------------------------------- stopping an element

def test_a_stopped_element_checkpoints_and_exits_75_without_evaluating(tmp_path):
    """What the array task and the pod (gapm is PID 1 there) rely on: SIGTERM to `gapm matrix
    element` reaches its training, which checkpoints; the element exits 75 and skips eval."""
    matrix = write_matrix(tmp_path, seeds=[0], runs=[{"config": str(ROOT / "configs/swissroll.yaml"), "name": "gapm"}],
                          set=[*TINY, "stage1.steps=200000", "train.checkpoint_every=20",
                               "model.hyperparameters.discriminator_steps=1"])
    log = tmp_path / "element.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "matrix", "element", str(matrix),
                                    "--index", "0"], env=clean_environment(), cwd=ROOT, stdout=out, stderr=out)
    checkpoints_dir = tmp_path / "runs/roll/gapm-s0/checkpoints"
    deadline = time.monotonic() + 120
    try:
        while not (checkpoints_dir.is_dir() and any(checkpoints_dir.glob("step-*"))):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == EXIT_RESUMABLE, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped by SIGTERM" in log.read_text() and "pipeline.cli eval" not in log.read_text()
    assert not (tmp_path / "runs/roll/gapm-s0/eval.json").exists()
    assert json.loads((tmp_path / "runs/roll/gapm-s0/matrix-element.json").read_text())["train_launches"] == 1


# --------------------------------------------------------------------------- the real Slurm

@pytest.mark.slow  # four tiny elements (train + eval) and the report on two emulated nodes: 2-4 min
def test_the_matrix_runs_as_a_slurm_array_with_a_dependent_report(slurm_cluster, tmp_path):
    from pipeline.matrix import expand, is_evaluated, is_trained, load_matrix

    matrix_path = write_matrix(tmp_path)
    # what the jobs inherit from the submitting shell: training on CPU, no MLflow server
    env = {k: v for k, v in clean_environment(GAPM_CPU="1").items() if not k.startswith("MLFLOW_")}
    submitted = subprocess.run([str(LAUNCH / "slurm/submit_matrix.sh"), str(matrix_path), "--gpus-per-node=0",
                                "--cpus-per-task=1"], env=slurm_cluster.environment(env), cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array_id, report_id = submitted.stdout.split()
    task_logs = [LOGS / f"gapm-matrix-{array_id}_{index}.out" for index in range(4)]
    report_log = LOGS / f"gapm-matrix-report-{report_id}.out"
    try:
        deadline = time.monotonic() + 900
        while (report := slurm_cluster.job(report_id))["JobState"] not in FINAL_STATES:
            assert time.monotonic() < deadline, f"report job still {report['JobState']}"
            time.sleep(1)
        tasks = [slurm_cluster.job(f"{array_id}_{index}") for index in range(4)]
        logs = "\n".join(f"== {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in [*task_logs, report_log] if log.exists())
        assert [task["JobState"] for task in tasks] == ["COMPLETED"] * 4, logs
        assert report["JobState"] == "COMPLETED", logs
        assert all(report["StartTime"] >= task["EndTime"] for task in tasks)  # afterany: after every task
        matrix = load_matrix(matrix_path)
        for element in expand(matrix):
            assert is_trained(matrix, element) and is_evaluated(matrix, element), element.name
        table = (tmp_path / "runs/roll/report/roll.md").read_text()
        assert "| gapm | 0,1 |" in table and "| vae | 0,1 |" in table
        assert "every element of" in report_log.read_text() and "| gapm | 0,1 |" in report_log.read_text()
        assert "element 3 done" in task_logs[3].read_text()
    finally:
        for log in [*task_logs, report_log]:
            log.unlink(missing_ok=True)
