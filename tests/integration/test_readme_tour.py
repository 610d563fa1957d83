"""The README's five-minute tour, run as written: its bash block is taken from README.md and run
by bash (`set -e`) in an empty directory holding this checkout's configs, after the command
`make demo` runs. Only the budget shrinks: `gapm` is a shell function (defined by the
directory's `.venv/bin/activate`, which the tour sources) that appends tiny `--set` overrides
to `gapm train`. A tour command that stops working fails this test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny_overrides

from pipeline.cli import build_parser

DEMO_COMMAND = "gapm train --config configs/swissroll.yaml"  # the Makefile's demo target


def tour_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A five-minute tour"):]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found, "README.md: no ```bash block under '## A five-minute tour'"
    return found.group(1)


def tiny_training_overrides() -> list[str]:
    """Seconds per training, for GAPM and baselines alike: no method-specific keys."""
    return [o for o in tiny_overrides(stage1_steps=20, stage2_steps=10, tracking=True)
            if not o.startswith("model.hyperparameters")] + ["tracking.system_metrics=false"]


def test_the_makefile_demo_runs_the_tours_first_command():
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):].split("\n\n", 1)[0]
    assert "gapm train --config configs/swissroll.yaml" in demo, demo
    assert DEMO_COMMAND in tour_block()


def test_the_readme_tour_runs_as_written(tmp_path):
    block = tour_block()
    assert "source .venv/bin/activate" in block
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    sets = " ".join(f"--set {o}" for o in tiny_training_overrides())
    activate = tmp_path / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f"""
gapm() {{
  if [ "$1" = train ]; then "{sys.executable}" -m pipeline.cli "$@" {sets}
  else "{sys.executable}" -m pipeline.cli "$@"; fi
}}
""")
    script = f"set -euo pipefail\nsource .venv/bin/activate\n{DEMO_COMMAND}\n{block}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GAPM_LOG_LEVEL="WARNING")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    runs = tmp_path / "runs"
    for written in ("tour/samples.png", "tour/champion.png", "tour/roll-shards/train/manifest.json",
                    "swissroll/mlflow_run_id", "tour-vae/metrics.json"):
        assert (runs / written).is_file(), f"the tour did not write runs/{written}"
    assert "eval/test_" in done.stdout  # gapm eval printed its scores


@pytest.mark.parametrize("line", [line for line in tour_block().splitlines() if line.startswith("gapm ")])
def test_each_tour_command_names_a_real_subcommand(line):
    subcommand = line.split()[1]
    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert subcommand in choices, f"README tour: `{line}` — no gapm subcommand {subcommand!r}"
