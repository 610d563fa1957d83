"""What the commands show: progress bars on rank 0 only, gapm's messages at GAPM_LOG_LEVEL,
library chatter (botocore's credential lines, MLflow's notices) only at DEBUG, one line for a
bad level."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from pipeline import cli, console


@pytest.fixture()
def restore_logging():
    """configure_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {name: logging.getLogger(name).level
                                                for name in (*console.OWN_LOGGERS, "mlflow")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def test_progress_bar_counts_with_a_rate_on_rank_0(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("RANK", "0")
    with console.progress_bar(120, "reading", unit="img") as bar:
        bar.update(100)
        bar.update(20)
    err = capsys.readouterr().err
    assert "reading" in err and "120/120" in err and "img/s" in err


@pytest.mark.parametrize("variables", [{"RANK": "1"}, {"TQDM_DISABLE": "1"}])
def test_progress_bar_is_silent_off_rank_0_or_when_disabled(monkeypatch, capsys, variables):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    with console.progress_bar(10, "reading", unit="img") as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_report_prints_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    console.report("result")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    console.report("result")
    assert capsys.readouterr().out == "result\n"


def test_library_info_is_debug_only_and_gapm_info_shows(monkeypatch, capsys, restore_logging):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    console.configure_logging("INFO")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("mlflow.tracking").info("Created version 1")
    logging.getLogger("pipeline.eval.jobs").info("logged to MLflow run abc")
    err = capsys.readouterr().err
    assert "Found credentials" not in err and "Created version" not in err
    assert "INFO pipeline.eval.jobs: logged to MLflow run abc" in err

    console.configure_logging("DEBUG")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    assert "Found credentials" in capsys.readouterr().err


def test_other_ranks_log_warnings_only_and_say_their_rank(monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    console.configure_logging("INFO")
    logging.getLogger("pipeline.train.loop").info("resuming from step 10")
    logging.getLogger("pipeline.train.loop").warning("data: 3 corrupt samples skipped")
    err = capsys.readouterr().err
    assert "resuming" not in err
    assert "WARNING [rank 1] pipeline.train.loop: data: 3 corrupt samples skipped" in err


def test_a_bad_log_level_is_one_line(monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("GAPM_LOG_LEVEL", "LOUD")
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err.strip() == "gapm: error: GAPM_LOG_LEVEL=LOUD: expected one of DEBUG, INFO, WARNING, ERROR"


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def test_in_batch_logs_a_bar_is_whole_lines_and_a_log_record_starts_its_own(monkeypatch, capsys, restore_logging):
    """stderr is not a terminal (capsys): every drawing of a bar is one line, without the
    carriage returns that glued the next log record to it, and a bar updated 1000 times with
    new losses every 10 steps draws twice within 30 s: when it starts and when it ends."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    console.configure_logging("INFO")
    with console.progress_bar(1000, "stage 1", unit="step") as bar:
        for step in range(1, 1001):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{1 / step:.4f}", refresh=False)  # as the training loop does
            if step == 500:
                logging.getLogger("pipeline.tracking.mlflow_sink").info("MLflow: run abc in experiment e")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("stage 1:")] == [lines[0], lines[-1]], err
    assert "0/1000" in lines[0] and "1000/1000" in lines[-1] and "loss=0.0010" in lines[-1]
    (record,) = [line for line in lines if "MLflow: run abc" in line]
    assert LOG_LINE.match(record), record
    assert len(lines) == 3


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_log_record_clears_the_bar_and_takes_its_own_line(monkeypatch, restore_logging):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    terminal = TerminalStream()
    monkeypatch.setattr(sys, "stderr", terminal)
    console.configure_logging("INFO")
    with console.progress_bar(100, "stage 1", unit="step") as bar:
        bar.update(10)
        logging.getLogger("pipeline.tracking.mlflow_sink").info("MLflow: run abc in experiment e")
        bar.update(90)
    shown = terminal.getvalue()
    (line,) = [line for line in shown.split("\n") if "MLflow: run abc" in line]
    # what stays on the screen of that line: the text after its last carriage return
    assert LOG_LINE.match(line.rsplit("\r", 1)[-1]), repr(line)
    assert "stage 1:" in shown.split("MLflow: run abc", 1)[1]  # the bar is drawn again below it
    assert "\rstage 1: 100%" in shown  # in place, on a terminal


def test_in_batch_logs_a_long_bar_draws_a_line_per_30_s_at_most(monkeypatch, capsys):
    """10,000 steps over 1,250 s of a simulated clock: a line every 30 s or more (the demo's
    log had two lines in one second where tqdm's monitor thread redrew a bar whose dynamic
    miniters had grown above 1: batch bars keep miniters at 1, so the monitor leaves them)."""
    import tqdm.std

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("RANK", "0")
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # the clock a bar reads
    with console.progress_bar(10000, "stage 1", unit="step") as bar:
        for _ in range(10000):
            clock[0] += 0.125
            bar.update(1)
        assert bar.miniters == 1 and not bar.dynamic_miniters  # what tqdm's monitor thread skips
    lines = capsys.readouterr().err.splitlines()
    # the simulated seconds each line shows (tqdm's [MM:SS<...] field), never this machine's time
    simulated = [int(m) * 60 + int(s) for m, s in (re.search(r"\[(\d+):(\d+)<", line).groups() for line in lines)]
    assert simulated[0] == 0 and simulated[-1] == 1250 and "10000/10000" in lines[-1]
    gaps = [later - earlier for earlier, later in zip(simulated, simulated[1:-1])]
    assert all(gap >= 30 for gap in gaps), gaps
    assert 1250 // 31 <= len(lines) <= 1250 // 30 + 2
