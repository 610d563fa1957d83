"""Storage faults (issue 24, items 1, 6 and 7): a fault-injecting proxy in front of the moto S3
server stops (for seconds, or for good), throttles or trickles while shards stream. What must
hold: nothing is skipped, a run that waited an outage out is bit-identical to an undisturbed
one, a spent retry budget (or a stop signal during a stuck read) checkpoints and exits 75 and
the resumed run is bit-identical too, and the outage says what it is doing.

Cells of the fault matrix (faults x layers) kept here: one process (in-process `train`, and
`gapm train` subprocesses) and 2 ranks (torchrun over gloo). Long cells are marked slow.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, PausableProxy, free_port, tiny_overrides
from PIL import Image

from pipeline.config import load_config
from pipeline.data import outages, storage
from pipeline.data.s3_stream import ResumableObjectStream
from pipeline.data.shards import convert_dataset
from pipeline.data.streaming import make_batch_stream
from pipeline.errors import GapmError
from pipeline.stopping import StopRequest, TrainingInterrupted
from pipeline.train import checkpoints
from pipeline.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def proxy(s3_bucket, monkeypatch):
    """The test S3 endpoint reached through a fault-injecting proxy; (proxy, bucket)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proxy = PausableProxy(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    # train() sets the budget for the whole process from its config; each test starts from 120 s.
    monkeypatch.setenv(outages.RETRY_BUDGET_ENV, "120")
    yield proxy, s3_bucket
    proxy.up()  # ends a trickle or throttling, so abandoned reads finish
    proxy.down()


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "storage" in r.getMessage() and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- one S3 object


def put_random_object(bucket: str, size: int) -> tuple[str, bytes]:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    url = f"s3://{bucket}/objects/blob-{size}"
    storage.write_bytes(url, data)
    return url, data


def read_slowly(url: str, **kwargs) -> bytes:
    """Reads like the tar reader, with a pause per read so that the proxy sees the client's
    buffers fill: a fault scheduled after N bytes then falls inside the object."""
    parts = []
    with ResumableObjectStream(url, **kwargs) as stream:
        while part := stream.read(256 * 1024):
            parts.append(part)
            time.sleep(0.003)
    return b"".join(parts)


@pytest.mark.parametrize("fault", ["outage", "throttled", "connection cut"])
def test_a_blip_mid_object_continues_at_the_same_byte(proxy, caplog, fault):
    proxy, bucket = proxy
    url, data = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    actions = {"outage": lambda: proxy.outage(2.0), "connection cut": proxy.cut_connections,
               "throttled": lambda: (proxy.throttle(), threading.Timer(2.0, proxy.up).start())}
    proxy.after_bytes(3 << 20, actions[fault])
    assert read_slowly(url, budget_s=60) == data
    assert proxy.faults_fired == 1
    lines = outage_lines(caplog)
    assert any("storage unavailable" in line and "retrying for up to 60 s" in line for line in lines), lines
    resumed = [line for line in lines if "reachable again" in line]
    assert len(resumed) == 1 and "nothing skipped" in resumed[0], lines
    offset = int(re.search(r"reading on from byte ([\d,]+)", resumed[0]).group(1).replace(",", ""))
    assert 0 < offset < len(data)  # inside the object: the rest came by a Range request


def test_storage_gone_for_good_gives_up_after_the_budget(proxy, caplog):
    proxy, bucket = proxy
    url, _ = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(3 << 20, lambda: proxy.outage(None))
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable) as error:
        read_slowly(url, budget_s=3)
    assert 2.5 < time.monotonic() - started < 15
    assert "the whole retry budget" in str(error.value) and url in str(error.value)
    assert not isinstance(error.value, GapmError) or error.value.transient  # the CLI's exit 75, not 2


def test_a_trickle_is_a_stall_cut_within_the_budget(proxy, caplog):
    """An endpoint sending a byte every half second never lets a socket read time out; the
    reader still gives up within about its budget (not after minutes)."""
    proxy, bucket = proxy
    url, _ = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(3 << 20, lambda: proxy.trickle(0.5))
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="the read stalled"):
        read_slowly(url, budget_s=4)
    assert time.monotonic() - started < 12
    assert any("no data for" in line for line in outage_lines(caplog))


def test_a_stop_signal_ends_a_stuck_read_at_once(proxy):
    proxy, bucket = proxy
    url, _ = put_random_object(bucket, 24 << 20)
    proxy.after_bytes(3 << 20, lambda: proxy.trickle(0.5))
    with StopRequest():
        stream = ResumableObjectStream(url, budget_s=600)
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match="a stop was requested"):
            while stream.read(256 * 1024):
                time.sleep(0.003)
        stream.close()
    assert time.monotonic() - started < 6  # the signal came after 2 s; the budget was 600 s


def test_a_checkpoint_upload_says_training_goes_on_while_it_waits(proxy, undisturbed, tmp_path, caplog, monkeypatch):
    from pipeline.train.checkpoint_uploads import RemoteCheckpointWriter

    proxy, bucket = proxy
    _, reference, _ = undisturbed
    staged = tmp_path / ".checkpoint-uploads" / reference.name
    shutil.copytree(reference, staged)
    monkeypatch.setattr(outages, "REPORT_EVERY_S", 1.0)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.outage(3.0)
    writer = RemoteCheckpointWriter(f"s3://{bucket}/runs/upload", staged.parent, keep_last=3)
    writer.submit(staged)
    assert writer.drain(120)
    writer.close()
    assert writer.failure is None
    assert [checkpoints.checkpoint_basename(c) for c in checkpoints.list_checkpoints(f"s3://{bucket}/runs/upload")] \
        == [reference.name]
    first, *_, last = outage_lines(caplog)
    assert first.startswith(f"uploading checkpoint {reference.name}") and "storage unavailable" in first
    assert f"training goes on, the checkpoint waits in {staged}" in first and "next launch" in first
    assert "reachable again" in last


def test_an_outage_reports_at_once_about_every_interval_and_at_its_end(caplog, monkeypatch):
    """The messages' rhythm, with a minute shortened to a second (an operation that fails for
    3 s: boto's own retries inside one call would make a real endpoint's timing vary)."""
    monkeypatch.setattr(outages, "REPORT_EVERY_S", 1.0)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    back_at = time.monotonic() + 3.0

    def read_manifest() -> bytes:
        if time.monotonic() < back_at:
            raise storage.StorageError("s3://b/manifest.json: cannot reach the S3 endpoint", transient=True)
        return b"{}"

    assert storage.with_retries(read_manifest, "reading the manifest", budget_s=60) == b"{}"
    first, *middle, last = outage_lines(caplog)
    assert first.startswith("reading the manifest: storage unavailable (s3://b/manifest.json: cannot reach")
    assert "retrying for up to 60 s, training waits" in first and "training checkpoints and exits 75" in first
    assert middle and all("still unavailable after" in line and "retrying for another" in line for line in middle)
    assert len(middle) <= 3  # about once per (shortened) minute, not once per attempt
    assert "reachable again after" in last


# --------------------------------------------------------------------------- training, one process


def roll_shards(bucket: str) -> str:
    """1000 swiss-roll points in 20 shards of 50, in S3."""
    convert_dataset("swissroll", "-", f"s3://{bucket}/roll", split="train", samples_per_shard=50,
                    swissroll_samples=1000)
    return f"s3://{bucket}/roll/train"


def roll_overrides(output_dir, shards: str, *extra: str) -> list[str]:
    """80 steps of tiny networks over 25-point batches (two passes over the 20 shards)."""
    return [f"output_dir={output_dir}", f"data.train={shards}", "data.test=swissroll", "data.shuffle_buffer=100",
            *tiny_overrides(stage1_steps=60, stage2_steps=20, batch_size=25, samples=None, test_samples=200,
                            width=16, checkpoint_every=20, log_every=10, eval_samples=64, discriminator_steps=1),
            "train.keep_last_checkpoints=10", *extra]


def roll_run(output_dir, shards: str, *extra: str):
    return load_config(ROOT / "configs/swissroll.yaml", roll_overrides(output_dir, shards, *extra))


def differing_tensors(first: checkpoints.Checkpoint, second: checkpoints.Checkpoint) -> list[str]:
    """Names of the tensors (weights, buffers, optimizer moments) that differ between two checkpoints."""
    a, b = checkpoints.load_model(first)[0].state_dict(), checkpoints.load_model(second)[0].state_dict()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    state_a, state_b = checkpoints.load_training_state(first), checkpoints.load_training_state(second)
    for network, optimizer in state_a["optimizers"].items():
        for index, moments in optimizer["state"].items():
            for key, value in moments.items():
                if not torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["optimizers"][network]["state"][index][key])):
                    differ.append(f"{network}.state.{index}.{key}")
    return differ


@pytest.fixture(scope="module")
def undisturbed(one_torch_thread, s3_endpoint, _s3_admin_client, tmp_path_factory):
    """Roll shards in a bucket of their own, and a run through a proxy that no fault touches:
    (shards, its final checkpoint, how many bytes it read through the proxy), so that a fault
    can be placed inside a run. Shared by the module's runs; each test brings its own proxy."""
    import uuid

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    _s3_admin_client.create_bucket(Bucket=bucket)
    shards = roll_shards(bucket)
    proxy = PausableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = train(roll_run(tmp_path_factory.mktemp("undisturbed"), shards), resume="never")
    proxy.down()
    assert result.metrics["data/failed_shards"] == 0
    return shards, result.final_checkpoint, proxy.relayed


def test_a_two_second_outage_mid_training_changes_nothing(proxy, undisturbed, tmp_path, caplog):
    proxy, _ = proxy
    shards, reference, relayed = undisturbed
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(relayed * 3 // 10, lambda: proxy.outage(2.0))  # inside the first epoch
    result = train(roll_run(tmp_path, shards), resume="never")
    assert proxy.faults_fired == 1
    assert any("storage unavailable" in line for line in outage_lines(caplog)), "the outage must have been felt"
    assert any("reachable again" in line for line in outage_lines(caplog))
    assert result.metrics["data/failed_shards"] == 0 and result.metrics["data/corrupt_samples"] == 0
    assert differing_tensors(reference, result.final_checkpoint) == []


def test_storage_gone_for_good_checkpoints_exits_resumably_and_resumes_exactly(proxy, undisturbed, tmp_path):
    proxy, _ = proxy
    shards, reference, relayed = undisturbed
    proxy.after_bytes(relayed * 7 // 10, lambda: proxy.outage(None))  # inside the second epoch
    config = roll_run(tmp_path, shards, "train.storage_retry_seconds=2")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, resume="never")
    message = str(stopped.value)
    assert "storage outage" in message and "the whole retry budget" in message and "relaunch with --resume auto" in message
    assert not isinstance(stopped.value, GapmError)  # exit 75, never 2
    saved = checkpoints.latest_checkpoint(config.run_dir / "checkpoints")
    step = checkpoints.read_meta(saved).step
    assert step % 20 != 0, "the run checkpoints where it stopped, not only at its last periodic checkpoint"
    proxy.up()
    resumed = train(roll_run(tmp_path, shards), resume="auto")
    assert checkpoints.read_meta(resumed.final_checkpoint).step == 80
    assert differing_tensors(reference, resumed.final_checkpoint) == []


def test_storage_unreachable_at_launch_is_waited_for(proxy, tmp_path, caplog):
    proxy, bucket = proxy
    shards = roll_shards(bucket)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.outage(3.0)
    result = train(roll_run(tmp_path, shards, "stage1.steps=10", "stage2.steps=0"), resume="never")
    assert checkpoints.read_meta(result.final_checkpoint).step == 10
    assert any(line.startswith("checking data.train") and "storage unavailable" in line
               for line in outage_lines(caplog)), outage_lines(caplog)


# --------------------------------------------------------------------------- loader workers


def child_pids(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children += [int(child) for child in listing.read().split()]
        except OSError:
            pass
    return children


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_loader_workers_die_with_a_killed_training_process(cifar10_source, tmp_path):
    src, _ = cifar10_source
    convert_dataset("cifar10", src, str(tmp_path / "cifar"), split="train", samples_per_shard=50)
    overrides = [f"output_dir={tmp_path}", f"data.train={tmp_path}/cifar/train", "data.test=synthetic",
                 "data.num_workers=2", "model.data_shape=[3, 32, 32]", "model.latent_dim=8", "model.prior_dim=8",
                 "model.width=8", "model.latent_generator_widths=[16]", "model.latent_discriminator_widths=[16]",
                 "stage1.steps=100000", "data.batch_size=64", "train.progress_bar=false", "tracking.enabled=false"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config",
                                str(ROOT / "configs/swissroll.yaml"), *[a for o in overrides for a in ("--set", o)]],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers := child_pids(process.pid)) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no loader workers appeared"
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are streaming batches
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "loader workers outlived their training process"
    finally:
        process.kill()
        for pid in workers:  # ours, started by the process above: left behind only if the test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def data_warnings_file(tmp_path):
    """The data layer's warnings, also from forked loader workers (caplog sees this process only)."""
    path = tmp_path / "data-warnings.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("pipeline.data")
    logger.addHandler(handler)
    yield path
    logger.removeHandler(handler)
    handler.close()


def test_loader_workers_ride_out_an_outage_with_the_same_batches(proxy, cifar10_source, data_warnings_file):
    """Reads in DataLoader worker processes: the same batches, in the same order, nothing counted."""
    proxy, bucket = proxy
    src, _ = cifar10_source
    convert_dataset("cifar10", src, f"s3://{bucket}/cifar", split="train", samples_per_shard=25)
    spec = f"s3://{bucket}/cifar/train"
    before = proxy.relayed
    undisturbed = list(make_batch_stream(spec, batch_size=20, num_workers=2, seed=4))
    relayed = proxy.relayed - before
    proxy.after_bytes(relayed // 2, lambda: proxy.outage(2.0))
    stream = make_batch_stream(spec, batch_size=20, num_workers=2, seed=4)
    disturbed = list(stream)
    assert proxy.faults_fired == 1
    assert len(disturbed) == len(undisturbed) == 10
    assert all(torch.equal(a, b) for a, b in zip(undisturbed, disturbed))
    assert stream.stats.failed_shards == 0 and stream.stats.corrupt_samples == 0
    said = data_warnings_file.read_text()  # by the workers
    assert "storage unavailable" in said and "reachable again" in said, said


# --------------------------------------------------------------------------- slow cells


@pytest.mark.slow  # two runs with an 8 s outage, ~40 s
def test_an_eight_second_outage_mid_training_changes_nothing(proxy, undisturbed, tmp_path, caplog):
    proxy, _ = proxy
    shards, reference, relayed = undisturbed
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(relayed * 6 // 10, lambda: proxy.outage(8.0))
    result = train(roll_run(tmp_path, shards), resume="never")
    assert proxy.faults_fired == 1 and any("reachable again" in line for line in outage_lines(caplog))
    assert result.metrics["data/failed_shards"] == 0
    assert differing_tensors(reference, result.final_checkpoint) == []


@pytest.mark.slow  # ~20 s
def test_data_and_checkpoints_in_the_same_lost_storage(proxy, undisturbed, tmp_path):
    """The checkpoint written when the data's storage is gone cannot go to that storage either:
    it stays staged on local disk, and the next launch uploads it and resumes exactly."""
    proxy, bucket = proxy
    shards, reference, relayed = undisturbed
    remote = f"s3://{bucket}/runs/lost"
    proxy.after_bytes(relayed * 7 // 10, lambda: proxy.outage(None))
    config = roll_run(tmp_path, shards, "train.storage_retry_seconds=2", f"train.checkpoint_dir={remote}")
    with pytest.raises(TrainingInterrupted):
        train(config, resume="never")
    staged = sorted((config.run_dir / ".checkpoint-uploads").glob("step-*"))
    assert staged, "the checkpoint written at the stop must wait on local disk"
    proxy.up()
    resumed = train(roll_run(tmp_path, shards, f"train.checkpoint_dir={remote}"), resume="auto")
    assert checkpoints.read_meta(resumed.final_checkpoint).step == 80
    assert differing_tensors(reference, resumed.final_checkpoint) == []


def gapm_train(overrides: list[str], *, processes: int = 1, env: dict | None = None) -> subprocess.Popen:
    sets = [arg for o in overrides for arg in ("--set", o)]
    cli = ["-m", "pipeline.cli", "train", "--config", str(ROOT / "configs/swissroll.yaml"), *sets]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.Popen([sys.executable, *launcher, *cli], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                                 "GAPM_LOG_LEVEL": "WARNING", **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def assert_resumable_exit(process: subprocess.Popen, stderr: str, reason: str) -> None:
    """Exit 75 from gapm, one line from rank 0. Through torchrun: the ranks exit 75 (torchrun
    itself exits 1 and stops the ranks still exiting with SIGTERM: the launcher layer's part)."""
    if process.args[1:3] == ["-m", "torch.distributed.run"]:
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)
        assert process.returncode != 0 and "75" in codes and set(codes) <= {"75", "-15"}, stderr[-3000:]
    else:
        assert process.returncode == 75, stderr[-3000:]
    assert f"gapm train: stopped by {reason}" in stderr and "relaunch with --resume auto" in stderr, stderr[-3000:]
    assert "gapm train: error:" not in stderr


@pytest.mark.slow  # a trickle after half a run: ~40 s
def test_a_trickling_endpoint_stops_the_run_within_its_budget(proxy, undisturbed, tmp_path):
    proxy, _ = proxy
    shards, _, relayed = undisturbed
    fired = []
    proxy.after_bytes(relayed * 6 // 10, lambda: (proxy.trickle(0.5), fired.append(time.monotonic())))
    process = gapm_train(roll_overrides(tmp_path, shards, "train.storage_retry_seconds=8"))
    stderr = finish(process)
    assert fired, stderr[-3000:]
    assert time.monotonic() - fired[0] < 8 + 30, "the budget (8 s) bounds the wait, not a 300 s socket timeout"
    assert_resumable_exit(process, stderr, "a storage outage")
    assert "the read stalled" in stderr
    stopped = checkpoints.read_meta(checkpoints.latest_checkpoint(tmp_path / "swissroll" / "checkpoints"))
    assert 0 < stopped.step < 80


@pytest.mark.slow  # three runs, one of them 2 processes: ~90 s
@pytest.mark.parametrize("workers", [2])
def test_sigterm_during_a_stuck_read_checkpoints_and_resumes_exactly(proxy, undisturbed, tmp_path, workers):
    """The stall would last the whole 600 s budget; SIGTERM ends it at once — also when the read
    is stuck in a DataLoader worker, which the signal does not reach."""
    proxy, _ = proxy
    shards, _, _ = undisturbed
    before = proxy.relayed  # workers split the shards among them: a reference of their own
    reference = train(roll_run(tmp_path / "reference", shards, f"data.num_workers={workers}"),
                      resume="never").final_checkpoint
    relayed = proxy.relayed - before
    fired = []
    proxy.after_bytes(relayed * 7 // 10, lambda: (proxy.trickle(0.5), fired.append(time.monotonic())))
    overrides = roll_overrides(tmp_path, shards, f"data.num_workers={workers}")
    process = gapm_train(overrides)
    while not fired:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.1)
    time.sleep(3.0)  # the read is stuck now
    signalled = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    stderr = finish(process)
    assert time.monotonic() - signalled < 30
    assert_resumable_exit(process, stderr, "SIGTERM")
    proxy.full_speed()
    resumed = gapm_train(overrides)
    assert finish(resumed) is not None and resumed.returncode == 0
    final = checkpoints.latest_checkpoint(tmp_path / "swissroll" / "checkpoints")
    assert checkpoints.read_meta(final).step == 80
    assert differing_tensors(reference, final) == []


@pytest.mark.slow  # four 2-process launches, ~4 min on 2 cores
def test_two_ranks_ride_out_an_outage_and_stop_together_for_good(proxy, tmp_path):
    """Both ranks wait an outage out; storage gone for good stops both at the same step, with a
    checkpoint there, and the relaunch ends bit-identical. Without the latent BatchNorm: a
    checkpoint written off the schedule averages the ranks' BatchNorm running statistics (as
    after SIGTERM), which the uninterrupted run does not do at that step, and an average rounds;
    exact resume of per-rank BatchNorm state is issue 24's item 2, not the storage's."""
    proxy, bucket = proxy
    shards = roll_shards(bucket)

    def run(name: str, *extra: str) -> tuple[subprocess.Popen, str]:
        process = gapm_train(roll_overrides(tmp_path / name, shards, "model.latent_norm=false", *extra), processes=2)
        return process, finish(process)

    before = proxy.relayed
    process, stderr = run("undisturbed")
    assert process.returncode == 0, stderr[-3000:]
    relayed = proxy.relayed - before
    reference = checkpoints.latest_checkpoint(tmp_path / "undisturbed/swissroll/checkpoints")

    proxy.after_bytes(relayed * 3 // 10, lambda: proxy.outage(2.0))
    process, stderr = run("blip")
    assert process.returncode == 0 and proxy.faults_fired == 1, stderr[-3000:]
    assert "storage unavailable" in stderr
    assert differing_tensors(reference, checkpoints.latest_checkpoint(tmp_path / "blip/swissroll/checkpoints")) == []

    proxy.after_bytes(relayed * 6 // 10, lambda: proxy.outage(None))
    process, stderr = run("lost", "train.storage_retry_seconds=3")
    assert_resumable_exit(process, stderr, "a storage outage")
    stopped = checkpoints.read_meta(checkpoints.latest_checkpoint(tmp_path / "lost/swissroll/checkpoints"))
    assert stopped.stage == 1 and stopped.step % 20 != 0, stopped  # where it stopped, not a periodic one
    proxy.up()
    process, stderr = run("lost")
    assert process.returncode == 0, stderr[-3000:]
    final = checkpoints.latest_checkpoint(tmp_path / "lost/swissroll/checkpoints")
    assert checkpoints.read_meta(final).step == 80
    assert differing_tensors(reference, final) == []


def test_a_trickle_on_a_small_request_is_cut_within_the_budget(proxy, caplog):
    """Manifests and listings at each epoch's start: a request that trickles is a stall too."""
    proxy, bucket = proxy
    storage.write_bytes(f"s3://{bucket}/manifest.json", b"{}" * 2000)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.trickle(0.5)
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="the whole retry budget"):
        storage.with_retries(lambda: storage.read_bytes(f"s3://{bucket}/manifest.json"), "reading the manifest",
                             budget_s=4, stall_s=60)
    assert time.monotonic() - started < 15  # the budget, not a socket timeout per byte
    assert any("the request stalled" in line for line in outage_lines(caplog))
