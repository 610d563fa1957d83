"""`gapm sample RUN_DIR` and `gapm eval RUN_DIR` (the README's tour: `gapm sample runs/swissroll`,
`gapm eval runs/swissroll --no-log`): a run directory stands for its newest complete checkpoint,
in RUN_DIR/checkpoints or wherever its config.yaml's train.checkpoint_dir says."""

from __future__ import annotations

import shutil

import numpy as np
import yaml
from helpers import tiny_config, train

from pipeline import checkpoints, cli
from pipeline.eval.mlflow_runs import resolve_target
from pipeline.tracking import registry


def test_sample_and_eval_take_a_run_directory_and_use_its_newest_complete_checkpoint(tmp_path, capsys):
    config = tiny_config(tmp_path / "runs", "name=tour", stage1_steps=10, stage2_steps=10, checkpoint_every=10)
    run_dir = config.run_dir
    result = train(config, resume="never")
    newest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
    assert newest == result.final_checkpoint and newest.name == "step-00000020"
    unfinished = run_dir / "checkpoints" / "step-00000030"  # no meta.json: not a complete checkpoint
    unfinished.mkdir()
    shutil.copy(newest / checkpoints.MODEL_FILE, unfinished / checkpoints.MODEL_FILE)
    expected = registry.sample(checkpoints.load_model(newest)[0], 50, 2).numpy()
    older = registry.sample(checkpoints.load_model(run_dir / "checkpoints" / "step-00000010")[0], 50, 2).numpy()
    assert not np.array_equal(expected, older)

    out = tmp_path / "tour" / "samples.png"
    assert cli.main(["sample", str(run_dir), "-n", "50", "--seed", "2", "--out", str(out)]) == 0
    assert np.array_equal(np.load(out.with_suffix(".npy")), expected)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), "--no-log"]) == 0
    assert capsys.readouterr().out.startswith("step 20: eval/test_")

    # Checkpoints kept elsewhere (train.checkpoint_dir): the run's config.yaml says where.
    elsewhere = tmp_path / "scratch" / "checkpoints-of-tour"
    shutil.move(run_dir / "checkpoints", elsewhere)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["train"]["checkpoint_dir"] = str(elsewhere)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / "mlflow_run_id").write_text("0123abcd\n")
    target = resolve_target(str(run_dir))
    assert (target.uri, target.run_dir, target.run_id) == (str(elsewhere / "step-00000020"), run_dir, "0123abcd")
    out = tmp_path / "tour" / "elsewhere.png"
    assert cli.main(["sample", str(run_dir), "-n", "50", "--seed", "2", "--out", str(out)]) == 0
    assert np.array_equal(np.load(out.with_suffix(".npy")), expected)

    # A run directory without a complete checkpoint: one line, bad input.
    shutil.rmtree(elsewhere)
    capsys.readouterr()
    assert cli.main(["sample", str(run_dir), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"gapm sample: error: run directory {run_dir} has no complete checkpoint in {elsewhere} yet; "
                     "train it (gapm train ... resumes) or name a checkpoint"), error
    assert cli.main(["eval", str(run_dir), "--no-log"]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
