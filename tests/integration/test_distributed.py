"""Real multi-process training over gloo (torchrun, 2 CPU processes), preemption and crash resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, free_port, tiny_overrides

from pipeline import checkpoints

TINY = tiny_overrides(stage1_steps=20, stage2_steps=10, batch_size=None, log_every=5)




def environment() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GAPM_LOG_LEVEL": "WARNING"}


def gapm_command(processes: int, overrides: list[str], *extra: str) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    cli = ["-m", "pipeline.cli", "train", "--config", str(ROOT / "configs/swissroll.yaml"), *sets, *extra]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cli]


def run_training(processes: int, overrides: list[str], *extra: str, timeout: int = 240,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(gapm_command(processes, overrides, *extra), env={**environment(), **(env or {})},
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_model(run_dir: Path):
    model, _ = checkpoints.load_model(checkpoints.latest_checkpoint(run_dir / "checkpoints"))
    return model


def test_two_processes_train_both_stages_with_identical_parameters(tmp_path):
    result = run_training(2, [f"output_dir={tmp_path}", "data.batch_size=32", *TINY, "train.progress_bar=true"],
                          env={"GAPM_LOG_LEVEL": "INFO", "TQDM_DISABLE": ""})
    run_dir = tmp_path / "swissroll"
    # one voice: rank 0 prints the result and draws the progress; rank 1 adds nothing at INFO
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["metrics", "run directory"], result.stdout
    assert result.stderr.count("stage 1:   0%") == 1 and result.stderr.count("stage 2:   0%") == 1, result.stderr
    assert "[rank 1]" not in result.stderr, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # rank fingerprints (parameters and BN statistics) gathered at the end of training
    assert metrics["distributed/max_parameter_divergence"] == 0.0
    assert json.loads((run_dir / "tags.json").read_text())["world_size"] == "2"
    assert checkpoints.latest_checkpoint(run_dir / "checkpoints").name == "step-00000030"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("stage2/latent_generator_loss" in row for row in logged)


@pytest.mark.slow  # two training launches, ~40 s on 2 cores
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # Deterministic stage 1 (no critic, no BN: nothing differs but the data split), so DDP's
    # averaged gradients over 2 x 32 samples must equal one process's over the same 64.
    common = [*TINY, "stage2.steps=0", "model.hyperparameters.adversarial_regularizer=false", "model.latent_norm=false"]
    run_training(1, [f"output_dir={tmp_path / 'one'}", "data.batch_size=64", *common])
    run_training(2, [f"output_dir={tmp_path / 'two'}", "data.batch_size=32", *common])
    one, two = final_model(tmp_path / "one/swissroll"), final_model(tmp_path / "two/swissroll")
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not checkpoints.list_checkpoints(run_dir / "checkpoints"):
        assert process.poll() is None, process.stderr.read()
        if time.time() > deadline:  # a guard against hanging, not a timing assertion
            pytest.fail("no checkpoint appeared")
        time.sleep(0.05)


LONG = [*TINY, "stage1.steps=300", "stage2.steps=20", "train.checkpoint_every=20"]


@pytest.mark.slow  # three training launches, ~60 s on 2 cores
def test_kill_9_then_resume_reaches_the_uninterrupted_parameters(tmp_path):
    run_training(1, [f"output_dir={tmp_path / 'straight'}", "data.batch_size=64", *LONG])
    crashed = [f"output_dir={tmp_path / 'crashed'}", "data.batch_size=64", *LONG]
    process = subprocess.Popen(gapm_command(1, crashed), env=environment(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path / "crashed/swissroll", process)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = checkpoints.list_checkpoints(tmp_path / "crashed/swissroll/checkpoints")
    assert survivors and survivors[-1].name < "step-00000320"  # really interrupted
    run_training(1, crashed, "--resume", "auto")
    straight, resumed = final_model(tmp_path / "straight/swissroll"), final_model(tmp_path / "crashed/swissroll")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # two 2-process launches, ~60 s on 2 cores
def test_sigterm_on_two_ranks_checkpoints_exits_resumable_and_resumes(tmp_path):
    overrides = [f"output_dir={tmp_path}", "data.batch_size=32", *LONG]
    process = subprocess.Popen(gapm_command(2, overrides), env=environment(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    run_dir = tmp_path / "swissroll"
    wait_for_checkpoint(run_dir, process)
    os.killpg(process.pid, signal.SIGTERM)  # like Kubernetes eviction / Slurm: every process
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "relaunch with --resume auto" in stderr
    stopped_at = checkpoints.read_meta(checkpoints.latest_checkpoint(run_dir / "checkpoints"))
    assert stopped_at.stage == 1 and 20 <= stopped_at.stage_step < 300
    run_training(2, overrides)
    final = checkpoints.read_meta(checkpoints.latest_checkpoint(run_dir / "checkpoints"))
    assert (final.stage, final.step) == (2, 320)
    assert json.loads((run_dir / "metrics.json").read_text())["distributed/max_parameter_divergence"] == 0.0


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_run_completes_both_stages(tmp_path, precision):
    run_training(1, [f"output_dir={tmp_path}", "data.batch_size=64", f"train.mixed_precision={precision}", *TINY])
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(tmp_path / "swissroll/checkpoints"))
    assert (meta.stage, meta.step) == (2, 30)
    metrics = json.loads((tmp_path / "swissroll/metrics.json").read_text())
    assert all(v == v for v in metrics.values())  # no NaN
