"""Loader benchmark: pipeline.data.streaming against a bare tarfile + PIL decode loop.

Why: the streaming pipeline adds shard splitting, a shuffle buffer, corruption checks, batching
and DataLoader workers on top of "read tar, decode PNG". This measures what that costs on the
same shards, at several dataset sizes and worker counts, shows that memory stays flat as the
dataset grows (everything is streamed; only the shuffle buffer of encoded samples is held), and
gives the decode rate of one loader worker (what the throughput benchmark divides by to say how
many workers keep one device busy).

    python benchmarks/loader.py                                   # 5,000 / 20,000 / 50,000 samples; 0, 1, 2 workers
    python benchmarks/loader.py --sizes 5000 --workers 1 --repeats 5
    python benchmarks/loader.py --out s3://bucket/bench           # shards in S3 (kept, reused next time)

How it measures, on a shared and noisy machine: every dataset is written (and synced) before
anything is timed; then for each size and repetition each streaming pass runs right after a
bare pass over the same shards, and the ratio is taken within that pair (interleaved, so slow
periods of the machine hit both sides). Reported: the median ratio and its spread over the
repetitions. With 0 workers the CPU-time ratio is printed too: it is what the code costs,
independent of what else runs on the machine. Not a test: numbers depend on the machine.
Progress goes to stderr as it runs (the data sets written, then a line per measured pair of
passes); the table to stdout at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import storage  # noqa: E402
from pipeline.data.streaming import make_batch_stream  # noqa: E402

STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr as the benchmark goes, with the seconds since it started."""
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def write_synthetic_shards(out: str, samples: int, image_size: int, samples_per_shard: int, seed: int) -> None:
    """Random RGB PNGs in the converter's layout (shards + manifest), written without the converter."""
    rng = np.random.default_rng(seed)
    shards = []
    with tempfile.TemporaryDirectory() as staging:
        for first in range(0, samples, samples_per_shard):
            count = min(samples_per_shard, samples - first)
            name = f"shard-{len(shards):06d}.tar"
            path = os.path.join(staging, name)
            with tarfile.open(path, "w") as tar:
                for index in range(first, first + count):
                    pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    for suffix, payload in (("png", buffer.getvalue()), ("cls", b"0")):
                        info = tarfile.TarInfo(f"{index:08d}.{suffix}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            storage.upload_file(path, storage.join_url(out, name))
            shards.append({"name": name, "num_samples": count})
    manifest = {
        "dataset": "synthetic",
        "split": "train",
        "num_samples": samples,
        "image": {"height": image_size, "width": image_size, "channels": 3, "format": "png"},
        "shards": shards,
    }
    storage.write_bytes(storage.join_url(out, "manifest.json"), json.dumps(manifest).encode())


def shard_set(out: str, size: int, image_size: int, samples_per_shard: int) -> tuple[str, list[str]]:
    """(spec, shard URLs) of a synthetic set of `size` images, written unless `out` already holds it."""
    spec = storage.join_url(out, f"n{size}-s{image_size}-p{samples_per_shard}")
    manifest_url = storage.join_url(spec, "manifest.json")
    if storage.exists(manifest_url):
        progress(f"{size} samples: reusing {spec}")
    else:
        progress(f"{size} samples: writing {image_size}x{image_size} PNG shards to {spec}")
        write_synthetic_shards(spec, size, image_size, samples_per_shard, seed=size)
    shards = json.loads(storage.read_bytes(manifest_url))["shards"]
    return spec, [storage.join_url(spec, shard["name"]) for shard in shards]


def bare_loop(shard_urls: list[str]) -> int:
    """The floor: read each tar sequentially and decode every PNG, nothing else."""
    decoded = 0
    for url in shard_urls:
        with storage.open_read_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as picture:
                        np.asarray(picture.convert("RGB"))
                    decoded += 1
    return decoded


# --------------------------------------------------------------------------- memory (Linux /proc)


def _rss_mib(pid: int | str) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _child_pids() -> list[int]:
    pids = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as children:
                pids.extend(int(pid) for pid in children.read().split())
    except OSError:
        pass
    return pids


class MemoryWatch:
    """Peak resident memory of this process and of its loader workers, sampled every 0.2 s.

    A worker's RSS includes the pages it shares with its parent since the fork (the torch
    libraries); what matters here is whether it grows with the dataset.
    """

    def __init__(self) -> None:
        self.main_start = _rss_mib("self")
        self.main_peak = self.main_start
        self.workers_peak = 0.0
        self._next = 0.0

    def sample(self) -> None:
        now = time.perf_counter()
        if now < self._next:
            return
        self._next = now + 0.2
        self.main_peak = max(self.main_peak, _rss_mib("self"))
        self.workers_peak = max(self.workers_peak, sum(_rss_mib(pid) for pid in _child_pids()))


# --------------------------------------------------------------------------- one pass of each side


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_bare(urls: list[str]) -> dict[str, float]:
    cpu, started = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    count = bare_loop(urls)
    return {"samples": count, "wall": time.perf_counter() - started, "cpu": _cpu_seconds(resource.RUSAGE_SELF) - cpu}


def time_stream(spec: str, *, batch_size: int, workers: int, shuffle_buffer: int) -> dict[str, float]:
    stream = make_batch_stream(spec, batch_size, num_workers=workers, drop_last=False, shuffle_buffer=shuffle_buffer)
    memory = MemoryWatch()
    cpu, workers_cpu = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    count = 0
    for batch in stream:
        count += batch.shape[0]
        memory.sample()
    wall = time.perf_counter() - started
    # Workers are joined when the pass ends, so their CPU time is in RUSAGE_CHILDREN by now.
    return {"samples": count, "wall": wall, "cpu": _cpu_seconds(resource.RUSAGE_SELF) - cpu,
            "workers_cpu": _cpu_seconds(resource.RUSAGE_CHILDREN) - workers_cpu,
            "main_rss": memory.main_peak, "main_growth": memory.main_peak - memory.main_start,
            "workers_rss": memory.workers_peak}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def run(sizes: list[int], worker_counts: list[int], *, repeats: int, image_size: int, samples_per_shard: int,
        batch_size: int, shuffle_buffer: int, out: str) -> list[dict]:
    sets = {size: shard_set(out, size, image_size, samples_per_shard) for size in sizes}
    if not storage.is_s3_url(out):
        os.sync()  # no writeback of freshly written shards during the timed passes
    rows = []
    measured_pairs, total_pairs = 0, len(sizes) * repeats * len(worker_counts)
    for size in sizes:
        spec, urls = sets[size]
        pairs: dict[int, list[tuple[dict, dict]]] = {workers: [] for workers in worker_counts}
        for repetition in range(repeats):
            for workers in worker_counts:
                bare = time_bare(urls)
                streamed = time_stream(spec, batch_size=batch_size, workers=workers, shuffle_buffer=shuffle_buffer)
                assert streamed["samples"] == bare["samples"] == size, (streamed["samples"], bare["samples"], size)
                pairs[workers].append((bare, streamed))
                measured_pairs += 1
                progress(f"pass pair {measured_pairs}/{total_pairs}: {size} samples, {workers} worker(s), repetition "
                         f"{repetition + 1}/{repeats}: bare {size / bare['wall']:.0f}/s, streaming "
                         f"{size / streamed['wall']:.0f}/s (ratio {bare['wall'] / streamed['wall']:.2f})")
        for workers, measured in pairs.items():
            bare_rates = [size / bare["wall"] for bare, _ in measured]
            stream_rates = [size / streamed["wall"] for _, streamed in measured]
            ratios = [bare["wall"] / streamed["wall"] for bare, streamed in measured]
            # CPU seconds of whoever decodes: this process with 0 workers, else the workers.
            decode_cpu = [streamed["cpu"] if workers == 0 else streamed["workers_cpu"] for _, streamed in measured]
            rows.append({
                "samples": size, "workers": workers,
                "bare_per_s": statistics.median(bare_rates), "stream_per_s": statistics.median(stream_rates),
                "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_text": _spread(ratios),
                "cpu_ratio_text": _spread([bare["cpu"] / streamed["cpu"] for bare, streamed in measured])
                if workers == 0 else "",
                "decode_per_worker_cpu_s": size / statistics.median(decode_cpu),
                "consumer_cpu_us": statistics.median(streamed["cpu"] for _, streamed in measured) / size * 1e6,
                "main_rss_mib": max(streamed["main_rss"] for _, streamed in measured),
                "main_growth_mib": max(streamed["main_growth"] for _, streamed in measured),
                "workers_rss_mib": max(streamed["workers_rss"] for _, streamed in measured),
            })
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"loader benchmark: {args.image_size}x{args.image_size} RGB PNG, {args.samples_per_shard} samples/shard, "
          f"batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}, {args.repeats} interleaved repetitions, "
          f"{os.cpu_count()} CPUs")
    header = (f"{'samples':>8} {'workers':>7} {'bare/s':>8} {'stream/s':>9} {'ratio median [min-max]':>23} "
              f"{'cpu ratio':>18} {'decode/s/worker':>15} {'main RSS':>9} {'+growth':>8} {'workers RSS':>11}")
    print(header)
    for row in rows:
        print(f"{row['samples']:>8} {row['workers']:>7} {row['bare_per_s']:>8.0f} {row['stream_per_s']:>9.0f} "
              f"{row['ratio_text']:>23} {row['cpu_ratio_text']:>18} {row['decode_per_worker_cpu_s']:>15.0f} "
              f"{row['main_rss_mib']:>9.0f} {row['main_growth_mib']:>8.1f} {row['workers_rss_mib']:>11.0f}")
    print("ratio = streaming / bare samples per second (wall clock, each stream pass paired with the bare pass "
          "just before it); target >= 0.9")
    print("cpu ratio (0 workers) = bare / streaming CPU seconds of this process: the code's cost, whatever else runs")
    print("decode/s/worker = samples per CPU-second of the process that decodes (this one with 0 workers, else the "
          "workers, including handing batches over): the rate one worker gives with a core to itself")
    print("RSS in MiB: peak of this process during a pass (+growth within the pass) and peak sum over the workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,50000",
                        help="dataset sizes (samples), comma-separated (default: %(default)s)")
    parser.add_argument("--workers", default="0,1,2",
                        help="DataLoader worker counts of the streaming side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repetitions of each pair of passes (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the random RGB images (default: %(default)s)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the streaming side (default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="shuffle buffer of the streaming side (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="where shards go (dir or s3://; kept and reused) (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (default: none)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    temporary = tempfile.TemporaryDirectory(prefix="gapm-loader-bench-") if args.out is None else None
    try:
        rows = run([int(v) for v in args.sizes.split(",")], [int(v) for v in args.workers.split(",")],
                   repeats=args.repeats, image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                   batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                   out=args.out if temporary is None else temporary.name)
    finally:
        if temporary is not None:
            temporary.cleanup()
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
