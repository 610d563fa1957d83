"""gapm's exit-code contract (pipeline/exit_codes.py) and how `gapm launch` sums up its ranks
(pipeline/launcher.py): which code wins, which rank's line is shown, what the workers leave."""

import pytest

from pipeline import cli, exit_codes, launcher

KILLED_BY_TERM, KILLED_BY_KILL = -15, -9  # how torch and subprocess report a death by signal


@pytest.mark.parametrize("codes, expected", [
    ([], 0),
    ([0, 0, 0], 0),
    ([75, 2], 2),                 # bad input wins over everything: never retried
    ([0, 1, 75], 75),             # resumable over a failure
    ([75, KILLED_BY_TERM], 75),
    ([1, KILLED_BY_KILL], 1),     # otherwise the first failure
    ([KILLED_BY_KILL, 1], 137),   # a death by signal N is 128 + N, as a shell reports it
    ([0, 3], 3),
])
def test_the_combined_code_is_2_over_75_over_the_first_failure(codes, expected):
    assert exit_codes.combined(codes) == expected


def test_meanings_name_what_the_scheduler_should_do():
    assert "retrying cannot help" in exit_codes.meaning(2)
    assert "start again" in exit_codes.meaning(75)
    assert exit_codes.meaning(KILLED_BY_KILL) == "failed: killed by SIGKILL"
    assert exit_codes.meaning(1) == "failed"


def test_a_worker_leaves_its_line_for_its_launcher_and_nothing_without_one(tmp_path, monkeypatch):
    monkeypatch.delenv(exit_codes.REASONS_DIR_ENV, raising=False)
    exit_codes.record_exit_reason("no launcher: goes nowhere")
    monkeypatch.setenv(exit_codes.REASONS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    exit_codes.record_exit_reason("gapm train: error: unknown config key 'x'\n  (second line)")
    assert exit_codes.exit_reasons(str(tmp_path)) == {3: "gapm train: error: unknown config key 'x' (second line)"}
    monkeypatch.setenv(exit_codes.REASONS_DIR_ENV, str(tmp_path / "gone"))
    exit_codes.record_exit_reason("the launcher's directory is gone: no error")


def test_gapm_leaves_the_line_it_prints_for_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(exit_codes.REASONS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["config", "--config", "configs/swissroll.yaml", "--set", "stage1.stepz=1"]) == 2
    printed = capsys.readouterr().err.strip()
    assert "stage1.stepz" in printed and exit_codes.exit_reasons(str(tmp_path)) == {1: printed}


def test_gapm_leaves_a_line_for_invalid_arguments_and_for_a_bug(tmp_path, monkeypatch):
    monkeypatch.setenv(exit_codes.REASONS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as invalid:
        cli.main(["train", "--no-such-option"])
    assert invalid.value.code == 2 and "invalid command-line arguments" in exit_codes.exit_reasons(str(tmp_path))[0]

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "command_show_config", broken)
    with pytest.raises(ValueError):
        cli.main(["config", "--config", "configs/swissroll.yaml"])
    assert exit_codes.exit_reasons(str(tmp_path))[0] == "ValueError: an internal invariant broke"


def test_the_launchers_line_names_the_deciding_rank_its_reason_and_the_others():
    code, line = launcher.summary([(1, 2), (0, 2)], {0: "gapm train: error: unknown config key 'stage1.stepz'",
                                                      1: "same on rank 1"})
    assert code == 2
    assert line == ("gapm launch: rank 0 exited 2: gapm train: error: unknown config key 'stage1.stepz' "
                    "(rank 1 exited 2); exiting 2: bad input: fix it, retrying cannot help")
    assert "\n" not in line


def test_for_a_crash_the_first_rank_to_fail_decides_not_the_ones_stopped_after_it():
    code, line = launcher.summary([(1, KILLED_BY_KILL), (0, KILLED_BY_TERM)], {})
    assert code == 137
    assert line.startswith("gapm launch: rank 1 exited 137: failed: killed by SIGKILL (rank 0 exited 143); exiting 137")
    code, line = launcher.summary([(2, 1)], {})
    assert (code, line) == (1, "gapm launch: rank 2 exited 1: see its output above; exiting 1: failed")


def test_a_resumable_stop_beside_a_failure_is_still_resumable():
    code, line = launcher.summary([(1, 1), (0, 75)], {0: "gapm train: stopped by SIGTERM; checkpoint step-8 written"})
    assert code == 75 and "rank 0 exited 75: gapm train: stopped by SIGTERM" in line and "(rank 1 exited 1)" in line
