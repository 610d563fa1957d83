"""The training loop end to end on the swiss-roll, in one process."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config, train
from PIL import Image

from pipeline import checkpoints, cli


def test_training_writes_every_output(tmp_path):
    result = train(tiny_config(tmp_path), resume="never")
    run = result.run_dir
    for name in ("config.yaml", "recon.npy", "samples.npy", "figure4.png", "metrics.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert np.load(run / "recon.npy").shape == (256, 2)
    assert np.load(run / "samples.npy").shape == (256, 2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"eval/reconstruction_mse", "eval/sample_nearest_distance", "eval/sample_mmd",
            "distributed/max_parameter_divergence", "data/corrupt_samples"} <= set(metrics)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("stage1/reconstruction_mse" in row for row in logged)
    assert any("stage2/latent_generator_loss" in row for row in logged)
    # keep_last_checkpoints=3 of the saves at 10, 20, 30 (end of stage 1), 40, 50 (end)
    kept = [p.name for p in checkpoints.list_checkpoints(run / "checkpoints")]
    assert kept == ["step-00000030", "step-00000040", "step-00000050"]
    assert result.final_checkpoint.name == "step-00000050"


def test_sample_writes_the_picture_and_the_array_the_readme_names(tmp_path, capsys):
    """`gapm sample CHECKPOINT -n N --out X.png` writes X.png (a scatter plot for points) and
    X.npy (N samples); any other picture name is refused in one line."""
    result = train(tiny_config(tmp_path, "stage1.steps=10", "stage2.steps=10"), resume="never")
    out = tmp_path / "pictures" / "roll.png"
    assert cli.main(["sample", str(result.final_checkpoint), "-n", "16", "--out", str(out), "--seed", "1"]) == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG"
    samples = np.load(tmp_path / "pictures" / "roll.npy")
    assert samples.shape == (16, 2)
    assert f"wrote {out} and {out.with_suffix('.npy')}: 16 samples" in capsys.readouterr().out
    assert cli.main(["sample", str(result.final_checkpoint), "--out", str(tmp_path / "roll")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "roll.npy").exists()


def test_resume_continues_to_identical_parameters(tmp_path):
    uninterrupted = train(tiny_config(tmp_path / "a"), resume="never")
    # Same run, stopped after 20 stage-1 steps, then resumed from that checkpoint.
    partial = tiny_config(tmp_path / "b", "stage1.steps=30", "stage2.steps=0", "train.keep_last_checkpoints=10")
    train(partial, resume="never")
    run_b = partial.run_dir / "checkpoints"
    for later in checkpoints.list_checkpoints(run_b):
        if later.name != "step-00000020":
            import shutil
            shutil.rmtree(later)
    resumed = train(tiny_config(tmp_path / "b"), resume="auto")
    a, _ = checkpoints.load_model(uninterrupted.final_checkpoint)
    b, _ = checkpoints.load_model(resumed.final_checkpoint)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_half_written_checkpoint_is_never_picked(tmp_path):
    config = tiny_config(tmp_path)
    result = train(config, resume="never")
    ckpt_dir = result.run_dir / "checkpoints"
    fake = ckpt_dir / "step-99999999"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"truncated")  # no meta.json: incomplete
    assert checkpoints.latest_checkpoint(ckpt_dir).name == "step-00000050"


def test_resuming_a_checkpoint_of_another_model_fails_clearly(tmp_path):
    train(tiny_config(tmp_path), resume="never")
    with pytest.raises(checkpoints.CheckpointError, match="different model .*width"):
        train(tiny_config(tmp_path, "model.width=16"), resume="auto")


def test_gradient_accumulation_steps_each_optimizer_every_k_backward_calls(tmp_path):
    config = tiny_config(tmp_path, "train.gradient_accumulation_steps=2", "train.grad_clip_norm=0.5",
                         "model.hyperparameters.critic_steps=2")
    result = train(config, resume="never")
    state = checkpoints.load_training_state(result.final_checkpoint)["optimizers"]

    def adam_steps(name):
        return int(next(iter(state[name]["state"].values()))["step"])

    # 30 stage-1 iterations: 30 autoencoder and 60 critic backward calls; 20 stage-2 iterations:
    # 20 g and 40 D calls (discriminator_steps=2). One optimizer step every 2 calls.
    assert adam_steps("autoencoder") == 15 and adam_steps("critic") == 30
    assert adam_steps("latent_generator") == 10 and adam_steps("latent_discriminator") == 20


def test_accumulation_must_divide_stage_lengths_and_checkpoint_interval(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"'stage1\.steps' \(30\) must be a multiple of train\.gradient_accumulation_steps \(4\)"):
        tiny_config(tmp_path, "train.gradient_accumulation_steps=4")


@pytest.mark.parametrize(("accumulation", "clip"), [(1, None), (2, 0.05)])
def test_update_matches_accelerates_own_backward_and_optimizer_wrappers(accumulation, clip):
    """engines.AccelerateUpdate drives the prepared optimizers directly (issue 16: Accelerate's
    wrappers cost ~0.3 ms per optimizer step); the parameters must come out exactly as through
    accelerator.backward / clip_grad_norm_ / AcceleratedOptimizer.step and zero_grad."""
    from accelerate import Accelerator

    from pipeline.train.engines import AccelerateUpdate

    accelerator = Accelerator(cpu=True)

    def trained(use_accelerate_wrappers: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        networks = {"a": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)),
                    "b": torch.nn.Linear(4, 1)}
        optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-2) for name, net in networks.items()}
        prepared = accelerator.prepare(*networks.values(), *optimizers.values())
        networks, optimizers = dict(zip("ab", prepared[:2])), dict(zip("ab", prepared[2:]))
        calls = {"a": 0, "b": 0}

        def wrapped_update(name, loss):  # what engines.py did before issue 16
            accelerator.backward(loss / accumulation)
            calls[name] += 1
            if calls[name] % accumulation:
                return
            if clip is not None:
                accelerator.clip_grad_norm_(networks[name].parameters(), clip)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        update = wrapped_update if use_accelerate_wrappers else AccelerateUpdate(
            accelerator, networks, optimizers, accumulation, clip)
        data = torch.randn(12, 16, 4)
        for batch in data:
            for name in ("a", "b", "a"):
                update(name, networks[name](batch).pow(2).mean())
        return [p.detach().clone() for net in networks.values() for p in net.parameters()]

    assert all(torch.equal(x, y) for x, y in zip(trained(True), trained(False)))


def test_iteration_seeding_draws_what_torch_manual_seed_draws():
    from pipeline.train.loop import seed_iteration

    seed_iteration(3, 1, 17, torch.device("cpu"))
    ours = torch.rand(5), torch.randn(3)
    torch.manual_seed((3 * 1_000_003 + 1 * 7_919 + 17) % 2**63)
    assert torch.equal(ours[0], torch.rand(5)) and torch.equal(ours[1], torch.randn(3))
