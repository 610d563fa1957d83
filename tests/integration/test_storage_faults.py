"""Storage faults where shards and checkpoints are read and written (issue 24, items 1, 6, 7
and 11): a fault-injecting proxy in front of the moto S3 server (`faulty_s3`) stops for
seconds or for good, throttles, cuts connections or trickles a byte at a time. What must hold:
a read continues at the byte where it broke, never skipping or repeating one; a spent retry
budget or a stall raises StorageUnavailable (resumable) within about the budget; a stop signal
ends a stuck wait at once; the outage says what it does; loader workers ride it out with the
same batches, and die with a killed training process.

Training under the same faults, one process and two ranks: test_storage_outages_in_training.py.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, storage_warnings, tiny_overrides, train

from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.data import outages, storage
from pipeline.data.s3_stream import ResumableObjectStream
from pipeline.data.shards import convert_dataset
from pipeline.data.streaming import make_batch_stream
from pipeline.errors import GapmError
from pipeline.stopping import StopRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
def test_a_blip_mid_object_continues_at_the_same_byte(faulty_s3, caplog, fault):
    proxy, bucket = faulty_s3
    url, data = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    actions = {"outage": lambda: proxy.outage(2.0), "connection cut": proxy.cut_connections,
               "throttled": lambda: (proxy.throttle(), threading.Timer(2.0, proxy.up).start())}
    proxy.after_bytes(3 << 20, actions[fault])
    assert read_slowly(url, budget_s=60) == data
    assert proxy.faults_fired == 1
    lines = storage_warnings(caplog)
    assert any("storage unavailable" in line and "retrying for up to 60 s" in line for line in lines), lines
    resumed = [line for line in lines if "reachable again" in line]
    assert len(resumed) == 1 and "nothing skipped" in resumed[0], lines
    offset = int(re.search(r"reading on from byte ([\d,]+)", resumed[0]).group(1).replace(",", ""))
    assert 0 < offset < len(data)  # inside the object: the rest came by a Range request


def test_storage_gone_for_good_gives_up_after_the_budget(faulty_s3, caplog):
    proxy, bucket = faulty_s3
    url, _ = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(3 << 20, lambda: proxy.outage(None))
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable) as error:
        read_slowly(url, budget_s=3)
    assert 2.5 < time.monotonic() - started < 15
    assert "the whole retry budget" in str(error.value) and url in str(error.value)
    assert not isinstance(error.value, GapmError) or error.value.transient  # the CLI's exit 75, not 2


def test_a_trickle_is_a_stall_cut_within_the_budget(faulty_s3, caplog):
    """An endpoint sending a byte every half second never lets a socket read time out; the
    reader still gives up within about its budget (not after minutes)."""
    proxy, bucket = faulty_s3
    url, _ = put_random_object(bucket, 24 << 20)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.after_bytes(3 << 20, lambda: proxy.trickle(0.5))
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="the read stalled"):
        read_slowly(url, budget_s=4)
    assert time.monotonic() - started < 12
    assert any("no data for" in line for line in storage_warnings(caplog))


def test_a_stop_signal_ends_a_stuck_read_at_once(faulty_s3):
    proxy, bucket = faulty_s3
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


def test_a_checkpoint_upload_says_training_goes_on_while_it_waits(faulty_s3, tmp_path, caplog, monkeypatch):
    from pipeline.checkpoints.uploads import RemoteCheckpointWriter

    proxy, bucket = faulty_s3
    config = load_config(ROOT / "configs/swissroll.yaml", [f"output_dir={tmp_path / 'run'}",
                                                           *tiny_overrides(stage1_steps=4, stage2_steps=0)])
    reference = train(config, resume="never").final_checkpoint
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
    first, *_, last = storage_warnings(caplog)
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
    first, *middle, last = storage_warnings(caplog)
    assert first.startswith("reading the manifest: storage unavailable (s3://b/manifest.json: cannot reach")
    assert "retrying for up to 60 s, training waits" in first and "training checkpoints and exits 75" in first
    assert middle and all("still unavailable after" in line and "retrying for another" in line for line in middle)
    assert len(middle) <= 3  # about once per (shortened) minute, not once per attempt
    assert "reachable again after" in last


def test_a_trickle_on_a_small_request_is_cut_within_the_budget(faulty_s3, caplog):
    """Manifests and listings at each epoch's start: a request that trickles is a stall too."""
    proxy, bucket = faulty_s3
    storage.write_bytes(f"s3://{bucket}/manifest.json", b"{}" * 2000)
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    proxy.trickle(0.5)
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="the whole retry budget"):
        storage.with_retries(lambda: storage.read_bytes(f"s3://{bucket}/manifest.json"), "reading the manifest",
                             budget_s=4, stall_s=60)
    assert time.monotonic() - started < 15  # the budget, not a socket timeout per byte
    assert any("the request stalled" in line for line in storage_warnings(caplog))


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


def test_loader_workers_ride_out_an_outage_with_the_same_batches(faulty_s3, cifar10_source, data_warnings_file):
    """Reads in DataLoader worker processes: the same batches, in the same order, nothing counted."""
    proxy, bucket = faulty_s3
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
