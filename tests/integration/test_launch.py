"""The launchers in launch/, the Dockerfile and the README commands that use them.

Static checks: every YAML parses and has what its kind needs (accelerate loads its configs,
the Kubernetes objects have their required fields, GPUs, /dev/shm, no inline secrets), the
Dockerfile's shape, shellcheck on every script. Behaviour: the node scripts' command lines
for given scheduler variables (dry runs), and real 2-node CPU trainings on 127.0.0.1 started
through launch/start_node.sh (the README's local recipe, nodes in either order) and
launch/k8s/entrypoint.sh. The same scripts under a real Slurm cluster: test_launch_slurm.py;
the manifests against the Kubernetes and Kubeflow schemas: test_launch_k8s_schemas.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, clean_environment, free_port, tiny_overrides

from pipeline import checkpoints
from pipeline.cli import build_parser
from pipeline.config import ExperimentConfig, load_config

LAUNCH = ROOT / "launch"
K8S = LAUNCH / "k8s"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
ACCELERATE_CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
K8S_MANIFESTS = sorted(K8S.glob("*.yaml"))
IMAGE_ROOT = "/opt/gapm"  # WORKDIR of the Dockerfile, where the manifests find the scripts
EXIT_RESUMABLE = 75

# Smallest run that still checkpoints in both stages: saves at steps 2, 4 (end of stage 1), 6.
TINY = tiny_overrides(stage1_steps=4, stage2_steps=2, batch_size=32, samples=256, test_samples=64, width=16,
                      checkpoint_every=2, log_every=2, eval_samples=64, discriminator_steps=1, tracking=True)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_MANIFESTS for doc in documents(path)
            if kind is None or doc["kind"] == kind]


# --------------------------------------------------------------------------- accelerate configs

def test_accelerate_configs_exist():
    names = {path.name for path in ACCELERATE_CONFIGS}
    assert {"multi_gpu.yaml", "multi_node.yaml", "bf16.yaml", "fp16.yaml", "deepspeed_zero2.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_has_required_fields_and_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    (config,) = documents(path)
    for key in ("compute_environment", "distributed_type", "num_machines", "num_processes", "mixed_precision"):
        assert key in config, f"{path.name} lacks {key}"
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["mixed_precision"] in ("no", "bf16", "fp16")
    assert config["num_processes"] >= config["num_machines"] >= 1
    load_config_from_file(str(path))  # accelerate's own parser: unknown keys are errors


def test_accelerate_configs_say_what_they_are():
    configs = {path.name: documents(path)[0] for path in ACCELERATE_CONFIGS}
    assert configs["multi_gpu.yaml"]["distributed_type"] == "MULTI_GPU"
    assert configs["multi_node.yaml"]["distributed_type"] == "MULTI_GPU"
    assert configs["multi_node.yaml"]["num_machines"] > 1
    for key in ("machine_rank", "main_process_ip", "main_process_port"):
        assert key in configs["multi_node.yaml"]
    assert configs["bf16.yaml"]["mixed_precision"] == "bf16"
    assert configs["fp16.yaml"]["mixed_precision"] == "fp16"
    deepspeed = configs["deepspeed_zero2.yaml"]
    assert deepspeed["distributed_type"] == "DEEPSPEED"
    assert deepspeed["deepspeed_config"]["zero_stage"] == 2
    assert "one DeepSpeed engine per trained network" in (LAUNCH / "accelerate/deepspeed_zero2.yaml").read_text()


def readme_section() -> str:
    """The documentation's clusters page (docs/clusters.md)."""
    return (ROOT / "docs/clusters.md").read_text()


def test_readme_documents_every_accelerate_config_with_a_working_command():
    lines = re.sub(r"\\\n\s*", " ", readme_section()).splitlines()
    # `gapm launch`, not `accelerate launch`: that one turns exit 2 and 75 into 1
    assert not [line for line in lines if re.match(r"\s*accelerate launch ", line)]
    commands = [line for line in lines if "gapm launch --config_file" in line]
    documented = set()
    for command in commands:
        config_file = re.search(r"--config_file (\S+)", command).group(1)
        assert (ROOT / config_file).is_file(), command
        documented.add(Path(config_file).name)
        train = re.search(r"(?:-m pipeline\.cli|\$\(which gapm\)) train --config (\S+)", command)
        assert train, f"no '-m pipeline.cli train --config FILE' in: {command}"
        assert (ROOT / train.group(1)).is_file(), command
    assert documented >= {path.name for path in ACCELERATE_CONFIGS}


def test_readme_paths_exist():
    for path in set(re.findall(r"\b(launch/[\w./-]+\.(?:yaml|sh|sbatch))", readme_section())):
        assert (ROOT / path).is_file(), path


# --------------------------------------------------------------------------- Kubernetes manifests

def test_every_manifest_is_a_kubernetes_object():
    assert K8S_MANIFESTS
    for path, doc in k8s_objects():
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without metadata.name"


def pod_specs(doc: dict) -> list[dict]:
    """The pod templates of a workload object."""
    if doc["kind"] == "PyTorchJob":
        return [replica["template"]["spec"] for replica in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def workloads() -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in k8s_objects() if pod_specs(doc)]


MATRIX_MANIFESTS = ("matrix-indexed-job.yaml", "matrix-report-job.yaml")  # tests/integration/test_launch_matrix.py


def training_workloads() -> list[tuple[Path, dict]]:
    """The workloads that train or evaluate one experiment (configmap.yaml's)."""
    return [(path, doc) for path, doc in workloads() if path.name not in MATRIX_MANIFESTS]


def test_the_workloads_exist():
    kinds = sorted((path.name, doc["kind"]) for path, doc in workloads())
    assert kinds == [("eval-cronjob.yaml", "CronJob"), ("indexed-job.yaml", "Job"), ("matrix-indexed-job.yaml", "Job"),
                     ("matrix-report-job.yaml", "Job"), ("pytorchjob.yaml", "PyTorchJob")]
    assert sorted(path.name for path, _ in k8s_objects("ConfigMap")) == ["configmap.yaml", "matrix-indexed-job.yaml"]
    services = [doc for _, doc in k8s_objects("Service")]
    assert services and services[0]["spec"]["clusterIP"] == "None"  # headless, for the Indexed Job


def test_pytorchjob_has_master_and_worker_running_the_entrypoint():
    (_, job), = k8s_objects("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        assert spec["restartPolicy"] in ("OnFailure", "ExitCode")
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator injects its variables into this one
        assert container["command"] == [f"{IMAGE_ROOT}/launch/k8s/entrypoint.sh"]


def test_indexed_job_meets_at_pod_zero_through_the_headless_service():
    job, = [doc for doc in documents(K8S / "indexed-job.yaml") if doc["kind"] == "Job"]
    (_, service), = k8s_objects("Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["GAPM_NNODES"] == str(spec["completions"])
    assert env["GAPM_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod["containers"][0]["command"] == [f"{IMAGE_ROOT}/launch/k8s/entrypoint.sh"]
    codes = {code for rule in spec["podFailurePolicy"]["rules"]
             for code in rule.get("onExitCodes", {}).get("values", [])}
    assert {2, EXIT_RESUMABLE} <= codes


def test_eval_cronjob_runs_eval_watch_once_never_concurrently():
    (_, cron), = k8s_objects("CronJob")
    assert cron["spec"]["schedule"].count(" ") == 4  # five cron fields
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    args = pod_specs(cron)[0]["containers"][0]["args"]
    assert args[:2] == ["eval-watch", "--once"]


@pytest.mark.parametrize("name", ["pytorchjob.yaml", "indexed-job.yaml", "eval-cronjob.yaml"])
def test_workload_containers_get_gpus_shm_config_and_runs(name):
    for doc in documents(K8S / name):
        for pod in pod_specs(doc):
            volumes = {volume["name"]: volume for volume in pod["volumes"]}
            for container in pod["containers"]:
                resources = container["resources"]
                assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, container["name"]
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
                assert "configMap" in volumes[mounts["/etc/gapm"]]
                assert "persistentVolumeClaim" in volumes[mounts["/mnt/runs"]]


SENSITIVE = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|USERNAME|CREDENTIAL|^AWS_|^MLFLOW_TRACKING_URI$")


def test_no_inline_secret_values_outside_the_example():
    for path in K8S_MANIFESTS:
        if path.name == "secrets.example.yaml":
            continue
        for doc in documents(path):
            assert doc["kind"] != "Secret", f"{path.name}: ship Secrets only as secrets.example.yaml"
            for pod in pod_specs(doc):
                for container in pod["containers"]:
                    for entry in container.get("env", []):
                        if SENSITIVE.search(entry["name"]):
                            assert "value" not in entry, f"{path.name}: {entry['name']} is inlined"
                            assert "secretKeyRef" in entry["valueFrom"], f"{path.name}: {entry['name']}"
                    referenced = {ref["secretRef"]["name"] for ref in container.get("envFrom", [])
                                  if "secretRef" in ref}
                    referenced |= {entry["valueFrom"]["secretKeyRef"]["name"] for entry in container.get("env", [])
                                   if "secretKeyRef" in entry.get("valueFrom", {})}
                    assert {"gapm-s3", "gapm-mlflow"} <= referenced, f"{path.name}: {container['name']}"


def test_example_secrets_hold_only_placeholders():
    secrets = documents(K8S / "secrets.example.yaml")
    assert {secret["metadata"]["name"] for secret in secrets} == {"gapm-s3", "gapm-mlflow"}
    assert "EXAMPLE ONLY" in (K8S / "secrets.example.yaml").read_text()
    for secret in secrets:
        assert secret["kind"] == "Secret" and "data" not in secret
        for key, value in secret["stringData"].items():
            if key != "AWS_DEFAULT_REGION":
                assert "EXAMPLE-REPLACE-ME" in value, key


def test_training_pods_pass_valid_gapm_train_arguments_and_mount_the_config():
    configmap, = documents(K8S / "configmap.yaml")
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for _, doc in training_workloads():
        for pod in pod_specs(doc):
            container = pod["containers"][0]
            command = container.get("command")
            if command:  # training pods: entrypoint.sh + `gapm train` arguments
                assert command[0].startswith(IMAGE_ROOT + "/")
                assert (ROOT / command[0][len(IMAGE_ROOT) + 1:]).is_file()
                args = build_parser().parse_args(["train", *container["args"]])
            elif container["args"][0] in subcommands:  # the image's ENTRYPOINT is gapm
                args = build_parser().parse_args(container["args"])
            else:  # eval-watch not in the CLI yet: check its config arguments alone
                assert container["args"][:2] == ["eval-watch", "--once"]
                args = build_parser().parse_args(["config", *container["args"][2:]])
            config_path = Path(args.config)
            volume = next(v for v in pod["volumes"] if "configMap" in v)
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
            assert str(config_path.parent) == mount["mountPath"]
            assert config_path.name in configmap["data"]


def test_configmap_holds_the_swissroll_experiment(tmp_path):
    configmap, = documents(K8S / "configmap.yaml")
    (tmp_path / "experiment.yaml").write_text(configmap["data"]["experiment.yaml"])
    assert load_config(tmp_path / "experiment.yaml") == load_config(ROOT / "configs/swissroll.yaml"), \
        "launch/k8s/configmap.yaml differs from configs/swissroll.yaml: regenerate it (command in the file)"


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in joined.splitlines()) if line]


def test_dockerfile_builds_a_cuda_image_running_gapm_as_non_root():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert next(k for k in keywords if k != "ARG") == "FROM", "FROM must come first (only ARGs before it)"
    args = dict(re.match(r"(\w+)=(\S+)", value).groups() for keyword, value in instructions
                if keyword == "ARG" and "=" in value)
    base = dict(instructions)["FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base), base
    runs = " ".join(value for keyword, value in instructions if keyword == "RUN")
    assert args["GAPM_EXTRAS"] == "deepspeed"  # the CUDA image gets DeepSpeed
    assert re.search(r'package="\.\[\$\{GAPM_EXTRAS\}\]".*pip install --constraint \S+ "\$package"', runs)
    users = [value for keyword, value in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["gapm"]
    assert dict(instructions)["WORKDIR"] == IMAGE_ROOT


def test_dockerignore_keeps_environments_runs_and_caches_out():
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "mlruns", ".git", "**/__pycache__", ".pytest_cache"} <= patterns
    assert not patterns & {"launch", "pipeline", "gapm", "configs", "pyproject.toml", "README.md"}


# --------------------------------------------------------------------------- shell scripts

def test_scripts_are_executable():
    assert {path.name for path in SCRIPTS} >= {"start_node.sh", "launch_node.sh", "train.sbatch",
                                                "eval.sbatch", "entrypoint.sh"}
    for path in SCRIPTS:
        assert os.access(path, os.X_OK), f"chmod +x {path.relative_to(ROOT)}"


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_sbatch_asks_for_the_signal_and_requeue():
    text = (LAUNCH / "slurm/train.sbatch").read_text()
    for directive in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert directive in text
    assert "scontrol requeue" in text and "launch/slurm/launch_node.sh" in text


def fake_scontrol(directory: Path, hosts: list[str]) -> Path:
    """A stand-in scontrol for dry runs of clusters that do not exist here: it expands any
    node list to `hosts` and, like a cluster that hides its nodes, knows no node's details
    (launch_node.sh then uses the host name as it is). tests/integration/test_launch_slurm.py
    runs the scripts under a real Slurm."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "%s\\n" ' + " ".join(hosts) + "; exit 0; fi\n"
        'echo "scontrol: error: cannot answer $*" >&2; exit 1\n')
    (directory / "scontrol").chmod(0o755)
    return directory


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    result = subprocess.run([str(LAUNCH / script), *args], env=clean_environment(GAPM_DRY_RUN="1", **env),
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_slurm_node_command_for_4_nodes_of_8_gpus(tmp_path):
    path = f"{fake_scontrol(tmp_path / 'bin', ['gpu07', 'gpu08', 'gpu09', 'gpu10'])}:{os.environ['PATH']}"
    command = dry_run("slurm/launch_node.sh", "--config", "configs/swissroll.yaml", "--set", "seed=1",
                      PATH=path, SLURM_NNODES="4", SLURM_NODEID="2", SLURM_JOB_NODELIST="gpu[07-10]",
                      SLURM_JOB_ID="123456", SLURM_GPUS_ON_NODE="8")
    assert command[:3] == [sys.executable, "-m", "pipeline.launcher"]
    assert option(command, "--config_file") == str(LAUNCH / "accelerate/multi_node.yaml")
    assert option(command, "--num_machines") == "4"
    assert option(command, "--machine_rank") == "2"
    assert option(command, "--num_processes") == "32"
    assert option(command, "--main_process_ip") == "gpu07"
    assert option(command, "--main_process_port") == str(20000 + 123456 % 10000)
    assert option(command, "--rdzv_backend") == "static"  # node 2 connects to gpu07, never listens itself
    assert option(command, "--rdzv_conf") == "timeout=900"
    assert command[command.index("-m", 3):] == ["-m", "pipeline.cli", "train", "--config", "configs/swissroll.yaml",
                                               "--set", "seed=1", "--resume", "auto"]


def test_slurm_rendezvous_host_when_scontrol_cannot_answer(tmp_path):
    """A failing scontrol (no slurm.conf, no controller): the node list itself is parsed."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: no controller' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    common = dict(SLURM_NNODES="2", SLURM_NODEID="0", GAPM_CPU="1", PATH=f"{tmp_path}:{os.environ['PATH']}")
    assert option(dry_run("slurm/launch_node.sh", SLURM_JOB_NODELIST="gpu[07-08,11],cpu1", **common),
                  "--main_process_ip") == "gpu07"
    assert option(dry_run("slurm/launch_node.sh", SLURM_JOB_NODELIST="n1,n2", **common),
                  "--main_process_ip") == "n1"
    assert option(dry_run("slurm/launch_node.sh", SLURM_LAUNCH_NODE_IPADDR="10.1.2.3", **common),
                  "--main_process_ip") == "10.1.2.3"


def test_slurm_node_script_outside_slurm_names_the_missing_variable():
    result = subprocess.run([str(LAUNCH / "slurm/launch_node.sh")], env=clean_environment(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "SLURM_NNODES is not set" in result.stderr


@pytest.mark.parametrize("variables, expected", [
    # training operator < 1.7, or nprocPerNode unset: WORLD_SIZE counts pods
    (dict(MASTER_ADDR="gapm-train-master-0", MASTER_PORT="23456", RANK="1", WORLD_SIZE="2",
          GAPM_PROCS_PER_NODE="8"), ("gapm-train-master-0", "23456", "2", "1", "16")),
    # operator >= 1.7 with nprocPerNode: 8 -> WORLD_SIZE counts processes, PET_NNODES pods
    (dict(MASTER_ADDR="gapm-train-master-0", MASTER_PORT="23456", RANK="2", WORLD_SIZE="24",
          PET_NNODES="3", PET_NODE_RANK="2", PET_NPROC_PER_NODE="8"), ("gapm-train-master-0", "23456", "3", "2", "24")),
    # Indexed Job
    (dict(JOB_COMPLETION_INDEX="1", GAPM_NNODES="2", GAPM_MASTER_ADDR="gapm-train-0.gapm-train",
          GAPM_MASTER_PORT="29500", GAPM_PROCS_PER_NODE="8"), ("gapm-train-0.gapm-train", "29500", "2", "1", "16")),
    # no controller: one node
    (dict(GAPM_PROCS_PER_NODE="2"), ("127.0.0.1", "29500", "1", "0", "2")),
])
def test_k8s_entrypoint_command(variables, expected):
    command = dry_run("k8s/entrypoint.sh", "--config", "/etc/gapm/experiment.yaml", **variables)
    got = tuple(option(command, name) for name in ("--main_process_ip", "--main_process_port", "--num_machines",
                                                  "--machine_rank", "--num_processes"))
    assert got == expected
    assert option(command, "--rdzv_backend") == "static"
    assert command[-2:] == ["--resume", "auto"]


@pytest.mark.parametrize("variables, message", [
    (dict(JOB_COMPLETION_INDEX="0", GAPM_MASTER_ADDR="x"), "set GAPM_NNODES"),
    (dict(RANK="0", PET_NNODES="1:4", MASTER_ADDR="m", MASTER_PORT="1"), "elastic"),
    (dict(RANK="3", WORLD_SIZE="2", MASTER_ADDR="m", MASTER_PORT="1", GAPM_CPU="1"), "must be below"),
])
def test_k8s_entrypoint_rejects_bad_variables_clearly(variables, message):
    result = subprocess.run([str(K8S / "entrypoint.sh")], env=clean_environment(GAPM_DRY_RUN="1", **variables),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --------------------------------------------------------------------------- real launches (CPU, gloo)

def gapm_args(output_dir: Path, *extra: str) -> list[str]:
    overrides = [f"output_dir={output_dir}", *TINY, *extra]
    if "tracking" in {field.name for field in dataclasses.fields(ExperimentConfig)}:
        overrides.append("tracking.enabled=false")  # MLflow start-up would double these tests' time
    return ["--config", "configs/swissroll.yaml", *[arg for o in overrides for arg in ("--set", o)]]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(processes: list[subprocess.Popen], logs: list[Path], timeout: float = 150) -> None:
    """Waits for every node; the first one to fail ends the others (they would wait for it)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        killed = [process.poll() is None for process in processes]
        for process, kill in zip(processes, killed):
            if kill:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    # The node that failed by itself says why; the ones ended here only waited for it.
    for process, log, kill in sorted(zip(processes, logs, killed), key=lambda entry: entry[2]):
        assert process.returncode == 0, f"{log.name} (exit {process.returncode}{', killed: still running' * kill})" \
                                        f":\n{log.read_text()[-4000:]}"


def assert_two_process_run(run_dir: Path) -> None:
    assert json.loads((run_dir / "tags.json").read_text())["world_size"] == "2"
    latest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == "step-00000006"
    assert checkpoints.read_meta(latest).stage == 2
    assert (run_dir / "metrics.json").is_file()


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        assert process.poll() is None, f"{log.name} exited ({process.returncode}) before '{text}':\n" \
                                       f"{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no '{text}' in {log.name} after {timeout:.0f}s"
        time.sleep(0.1)


@pytest.mark.slow  # a 2-node training per backend, 25-50 s each on 2 shared cores
@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_local_nodes_on_one_host_start_in_any_order(tmp_path, backend):
    """README's local multi-node recipe: two start_node.sh on one host, same address and port.
    Node 1 starts first, and node 0 only once node 1's torchrun agent is joining the
    rendezvous (it logs its launch configs right before): node 1 must not take node 0's port
    (with c10d it did, being on node 0's host: node 0's accelerate then refused to start,
    'port already in use')."""
    port = str(free_port())
    common = dict(GAPM_NNODES="2", GAPM_MASTER_ADDR="127.0.0.1", GAPM_MASTER_PORT=port, GAPM_CPU="1",
                  GAPM_RDZV_BACKEND=backend)
    logs = {rank: tmp_path / f"node{rank}.log" for rank in (1, 0)}
    processes = {1: start([str(LAUNCH / "start_node.sh"), *gapm_args(tmp_path)],
                          clean_environment(GAPM_NODE_RANK="1", LOGLEVEL="INFO", **common), logs[1])}
    try:
        wait_for_line(logs[1], "Starting elastic_operator with launch configs", processes[1])
    except AssertionError:
        os.killpg(processes[1].pid, signal.SIGKILL)
        raise
    processes[0] = start([str(LAUNCH / "start_node.sh"), *gapm_args(tmp_path)],
                         clean_environment(GAPM_NODE_RANK="0", **common), logs[0])
    finish(list(processes.values()), list(logs.values()))
    assert f"rendezvous {backend} at 127.0.0.1:{port}" in logs[0].read_text()
    assert_two_process_run(tmp_path / "swissroll")


@pytest.mark.slow  # two pods of training, 30-50 s on 2 cores
def test_two_pytorchjob_pods_train_through_the_k8s_entrypoint(tmp_path):
    port = str(free_port())
    processes, logs = [], []
    for rank in (0, 1):  # what the training operator injects into Master-0 and Worker-0
        env = clean_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                                PET_NNODES="2", PET_NODE_RANK=str(rank), PET_NPROC_PER_NODE="auto",
                                GAPM_CPU="1")
        logs.append(tmp_path / f"pod{rank}.log")
        processes.append(start([str(K8S / "entrypoint.sh"), *gapm_args(tmp_path)], env, logs[-1]))
    finish(processes, logs)
    assert_two_process_run(tmp_path / "swissroll")
