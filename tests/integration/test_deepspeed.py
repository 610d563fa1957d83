"""DeepSpeed ZeRO through the accelerate environment: one engine per trained network (CPU, 1 process).

Accelerate only runs DeepSpeed multi-process on GPUs; multi-GPU DeepSpeed is exercised by
benchmarks/gpu_check.sh on a GPU machine, not here.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install '.[deepspeed]')")
pytest.importorskip("transformers", reason="accelerate's DeepSpeed integration needs transformers")

from helpers import (
    ROOT,
    tiny_overrides,  # noqa: E402
)

from pipeline import checkpoints  # noqa: E402

TINY = tiny_overrides(stage1_steps=10, stage2_steps=6, batch_size=32, samples=256, test_samples=64, width=16,
                      checkpoint_every=5, log_every=5, eval_samples=64, discriminator_steps=1)


def deepspeed_training(tmp_path, *extra, zero_stage="2"):
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": zero_stage,
           "OMP_NUM_THREADS": "1", "GAPM_LOG_LEVEL": "INFO"}
    env.pop("ACCELERATE_USE_CPU", None)
    sets = [a for o in [f"output_dir={tmp_path}", *TINY, *extra] for a in ("--set", o)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
               "-m", "pipeline.cli", "train", "--config", "configs/swissroll.yaml", *sets]
    # The first DeepSpeed import in a new environment JIT-builds a C++ op: minutes on 2 cores.
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two DeepSpeed launches, ~60 s on 2 cores
def test_zero2_engines_train_both_stages_and_resume(tmp_path):
    first = deepspeed_training(tmp_path, "stage2.steps=0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "one ZeRO-2 engine for each of autoencoder, critic" in first.stderr
    second = deepspeed_training(tmp_path)  # resumes at the end of stage 1, trains stage 2
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Adam moments restart" in second.stderr
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(tmp_path / "swissroll/checkpoints"))
    assert (meta.stage, meta.step) == (2, 16)
    metrics = json.loads((tmp_path / "swissroll/metrics.json").read_text())
    assert all(v == v for v in metrics.values())


@pytest.mark.slow  # importing DeepSpeed alone takes ~20 s here
def test_zero3_is_refused_with_a_clear_message(tmp_path):
    result = deepspeed_training(tmp_path, zero_stage="3")
    assert result.returncode != 0  # torchrun reports a failed worker as 1; the worker exits 2
    assert "gapm train: error: DeepSpeed ZeRO-3 is not supported" in result.stderr
