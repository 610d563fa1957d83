"""Environment failures on local disk (issue 24 item 10): each one line, the right exit status,
nothing lost. No space (a full disk, `ulimit -f`) is resumable — exit 75, and a relaunch once
there is room goes on from the last complete checkpoint; a place that cannot be written (under
a regular file, read-only) is bad input — exit 2, before anything is trained. A non-finite
learning rate is a config error naming the key."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, differing_parameters, free_port, tiny_overrides, train

from pipeline import checkpoints, cli
from pipeline.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overrides(output_dir, *extra) -> list[str]:
    return [f"output_dir={output_dir}", *tiny_overrides(stage1_steps=30, stage2_steps=20, checkpoint_every=10),
            "train.keep_last_checkpoints=10", *extra]


def gapm_train(output_dir, *extra) -> int:
    return cli.main(["train", "--config", str(ROOT / "configs/swissroll.yaml"),
                     *[a for o in overrides(output_dir, *extra) for a in ("--set", o)]])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def mount_tmpfs(directory: Path, options: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                      capture_output=True).returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here (needs root)")


def unmount(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], capture_output=True)


# --------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_a_non_finite_learning_rate_names_the_key(tmp_path, capsys, value):
    assert gapm_train(tmp_path, f"optimizers.autoencoder.lr={value}") == 2
    err = one_line(capsys)
    assert "optimizers.autoencoder.lr" in err and "finite" in err
    assert not (tmp_path / "swissroll").exists()


@pytest.mark.parametrize("key", ["output_dir", "train.checkpoint_dir"])
def test_a_directory_under_a_regular_file_is_one_line_and_exit_2(tmp_path, capsys, key):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    assert gapm_train(tmp_path / "runs", f"{key}={blocker}/runs") == 2
    err = one_line(capsys)
    assert str(blocker) in err and "regular file" in err and key in err
    assert not list(tmp_path.glob("runs/swissroll/checkpoints/step-*"))  # stopped before training


@pytest.mark.parametrize("key", ["output_dir", "train.checkpoint_dir"])
def test_a_read_only_directory_is_one_line_and_exit_2(tmp_path, capsys, key):
    read_only = tmp_path / "read-only"
    mount_tmpfs(read_only, "size=1m,ro")
    try:
        assert gapm_train(tmp_path / "runs", f"{key}={read_only}") == 2
        err = one_line(capsys)
        assert str(read_only) in err and "read-only" in err and key in err
    finally:
        unmount(read_only)


# --------------------------------------------------------------------------- no space: exit 75


def test_a_full_disk_while_checkpointing_stops_resumably_and_the_relaunch_finishes_exactly(tmp_path, capsys):
    """A 168 KiB disk holds two checkpoints of this model (about 66 KiB each): the third save
    finds no space. The run stops with 75 in one line, the two complete checkpoints intact and
    no half-written one; once the disk is larger, the relaunch resumes from step 20 and ends
    bit-identical to an uninterrupted run."""
    uninterrupted = train(load_config(ROOT / "configs/swissroll.yaml", overrides(tmp_path / "a")), resume="never")
    small = tmp_path / "small-disk"
    mount_tmpfs(small, "size=168k")
    try:
        assert gapm_train(tmp_path / "b", f"train.checkpoint_dir={small}") == 75
        err = one_line(capsys)
        assert "no space left" in err and str(small) in err and "KiB free" in err and "--resume auto" in err
        assert [p.name for p in checkpoints.list_checkpoints(small)] == ["step-00000010", "step-00000020"]
        assert not [p for p in small.iterdir() if p.name.startswith(".")]  # nothing half-written
        checkpoints.load_model(small / "step-00000020")  # whole: its files match meta.json
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        assert gapm_train(tmp_path / "b", f"train.checkpoint_dir={small}") == 0
        final = checkpoints.latest_checkpoint(small)
        assert final.name == "step-00000050" and differing_parameters(uninterrupted.final_checkpoint, final) == []
    finally:
        unmount(small)


def test_the_file_size_limit_stops_resumably_in_one_line(tmp_path):
    """`ulimit -f 16` (16 KiB per file): the first checkpoint's weights do not fit. The process
    is not killed by SIGXFSZ: it stops with 75 and one line; without the limit the relaunch
    trains to the end."""
    command = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(ROOT / "configs/swissroll.yaml"),
               *[a for o in overrides(tmp_path) for a in ("--set", o)]]

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    limited = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             preexec_fn=limit_file_size)
    lines = [line for line in limited.stderr.splitlines() if line.startswith("gapm train:")]
    assert limited.returncode == 75, limited.stderr[-3000:]
    assert len(lines) == 1 and "ulimit -f" in lines[0] and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    directory = tmp_path / "swissroll/checkpoints"
    assert not checkpoints.list_checkpoints(directory) and not list(directory.glob(".tmp-*"))
    relaunched = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert checkpoints.read_meta(checkpoints.latest_checkpoint(directory)).step == 50


@pytest.mark.slow  # two 2-process launches over gloo
def test_on_two_ranks_a_checkpoint_rank_0_cannot_write_stops_both_and_the_relaunch_finishes(tmp_path):
    """Rank 0 hits the file-size limit while rank 1 waits at the next collective: both stop
    with 75 (none hangs), and a relaunch without the limit trains to the end."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "pipeline.cli", "train", "--config",
               str(ROOT / "configs/swissroll.yaml"), *[a for o in overrides(tmp_path, "data.batch_size=32")
                                                         for a in ("--set", o)]]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GAPM_LOG_LEVEL": "WARNING"}

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    limited = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
                             preexec_fn=limit_file_size)
    assert limited.returncode != 0
    assert limited.stderr.count("exitcode  : 75") == 2, limited.stderr[-4000:]
    assert len([line for line in limited.stderr.splitlines() if "no space left" in line]) == 1, limited.stderr[-4000:]
    command[command.index("--master_port") + 1] = str(free_port())
    relaunched = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    final = checkpoints.latest_checkpoint(tmp_path / "swissroll/checkpoints")
    assert checkpoints.read_meta(final).step == 50
