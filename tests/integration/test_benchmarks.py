"""The benchmarks as a user starts them: `--help` names every default, and a run shows its
progress on stderr as it goes (a line per measured pass or repetition), the table on stdout.
The numbers themselves are not tested: they depend on the machine."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

BENCHMARKS = ("loader", "train_step", "throughput")
PROGRESS_LINE = re.compile(r"^\[ *\d+\.\ds\] ")


def benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help_names_every_default(name):
    parser = benchmark_module(name).build_parser()
    shown = [action for action in parser._actions
             if action.option_strings and action.help != argparse.SUPPRESS and not isinstance(
                 action, argparse._HelpAction)]
    assert shown
    for action in shown:
        assert "(default: " in action.help, action.option_strings
    text = parser.format_help()
    if name == "loader":
        assert "(default: fashion-mnist,rgb32:10000,rgb64:5000)" in " ".join(text.split())
    if name == "train_step":
        assert "timed steps per stage (default: 200)" in " ".join(text.split())


def run_benchmark(name: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *arguments], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_loader_benchmark_shows_a_line_per_measured_pass():
    result = run_benchmark("loader", "--sets", "rgb8:40", "--raw", "rgb8", "--workers", "0", "--repeats", "2",
                           "--columns", "limit,bare,gapm", "--batch-size", "8", "--shuffle-buffer", "10", timeout=300)
    lines = result.stderr.splitlines()
    assert all(PROGRESS_LINE.match(line) for line in lines), lines
    assert "40 samples: writing 8x8 png shards" in lines[0] and "40 samples: writing 8x8 raw shards" in lines[1]
    passes = [line.split("] ", 1)[1].rsplit(":", 1)[0] for line in lines[2:]]
    # per repetition: PNG's three columns, then raw's two (no decode-only limit without a decode)
    assert len(passes) == 2 * (3 + 2), passes
    assert sum("repetition 2/2: rgb8:40 raw" in p for p in passes) == 2, passes
    assert result.stdout.startswith("loader benchmark: batch 8, shuffle buffer 10, 2 interleaved repetitions")
    assert "| rgb8:40 | raw | gapm, 0 workers |" in result.stdout


@pytest.mark.slow  # two fresh processes that each train both stages: about a minute on a small CPU
def test_train_step_benchmark_shows_a_line_per_repetition():
    result = run_benchmark("train_step", "--steps", "2", "--warmup", "2", "--repeats", "2", "--batch-size", "16",
                           timeout=600)
    lines = result.stderr.splitlines()
    assert all(PROGRESS_LINE.match(line) for line in lines), lines
    assert "2 repetition(s) x 1 checkout(s)" in lines[0]
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines[1:]] == ["repetition 1/2", "repetition 2/2"]
    assert "stage 1 pipeline/bare " in lines[1] and "stage 2 pipeline/bare " in lines[1]
    assert result.stdout.startswith("train_step benchmark: data shape 2, batch 16")
