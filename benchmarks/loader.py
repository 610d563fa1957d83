"""Loader overhead benchmark: pipeline.data.streaming vs a bare tarfile + PIL decode loop.

Why: the streaming pipeline adds shard splitting, a shuffle buffer, corruption checks and
batching on top of "read tar, decode PNG". This measures what that costs on the same shards, in
one run, and shows that memory stays flat as the dataset grows (everything is streamed; only the
shuffle buffer of encoded samples is held).

    python benchmarks/loader.py --samples 5000            # 5000 and 4 x 5000 samples
    python benchmarks/loader.py --samples 20000 --workers 2 --out s3://bucket/bench

Not a test: numbers depend on the machine. Local output by default (a temporary directory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import storage  # noqa: E402
from pipeline.data.streaming import make_batch_stream  # noqa: E402


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


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000, help="smaller dataset size; the larger is 4x")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the streaming side")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--out", default=None, help="where to write shards (dir or s3://); default a temp dir")
    args = parser.parse_args()

    temporary = None
    out = args.out
    if out is None:
        temporary = tempfile.TemporaryDirectory(prefix="gapm-loader-bench-")
        out = temporary.name

    sizes = [args.samples, 4 * args.samples]
    print(f"{'samples':>8} {'bare/s':>10} {'stream/s':>10} {'ratio':>6} {'peak RSS MiB':>13}")
    for size in sizes:
        spec = storage.join_url(out, f"n{size}")
        write_synthetic_shards(spec, size, args.image_size, args.samples_per_shard, seed=size)
        urls = [storage.join_url(spec, shard["name"]) for shard in json.loads(
            storage.read_bytes(storage.join_url(spec, "manifest.json")))["shards"]]

        started = time.perf_counter()
        bare = bare_loop(urls)
        bare_rate = bare / (time.perf_counter() - started)

        stream = make_batch_stream(spec, args.batch_size, num_workers=args.workers, drop_last=False,
                                   shuffle_buffer=args.shuffle_buffer)
        started = time.perf_counter()
        streamed = sum(batch.shape[0] for batch in stream)
        stream_rate = streamed / (time.perf_counter() - started)
        assert streamed == bare == size, (streamed, bare, size)
        print(f"{size:>8} {bare_rate:>10.0f} {stream_rate:>10.0f} {stream_rate / bare_rate:>6.2f} {peak_rss_mib():>13.1f}")

    print("ratio = streaming / bare samples per second; peak RSS is the process high-water mark after each size")
    if args.workers:
        print("(with workers the streaming side decodes in parallel; RSS of worker processes is not included)")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
