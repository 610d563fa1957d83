"""Loader benchmark: the streaming reader beside its references, on the same shards, in one run.

Columns, in samples per second (one process unless workers are named):

* decode-only limit: PIL on the image bytes already in memory (``Image.open(BytesIO(b))`` ->
  ``np.asarray``): no tar, no shuffle, no float conversion, no batching, which the reader must
  also do. The reference of issue 23 (target: the reader at >= 0.8x of it at 28x28 and 32x32,
  >= 0.85x at 64x64, with 0 workers).
* reader's decode: gapm's own decode path (pipeline/data/sample_decode.py) on the same bytes in
  memory: the reader divided by this is how much of its time is not decoding.
* bare loop: ``tarfile`` + PIL (or ``np.load`` for raw shards) over the shards.
* webdataset: stock ``WebDataset(urls).decode("rgb8")`` (target: the reader at >= 2x of it).
* gapm, W workers: ``make_batch_stream(..., num_workers=W, drop_last=False)``, float32 batches.

Data sets: the real Fashion-MNIST test split (10,000 28x28 grayscale images, converted by
``gapm shards`` into 2 shards) when its IDX files are there, and random-pixel RGB written here
(32x32, 10,000 samples; 64x64, 5,000), each also as raw-pixel shards (``--image-format raw``)
where asked. Every data set is written (and synced) before anything is timed; then each
repetition runs every column of every set once, in an order rotated by one per repetition, so
slow periods of a shared machine hit all columns alike. Reported: the median and the spread
over the repetitions, of the rates and of the ratios taken within each repetition, plus CPU
seconds (what the code costs whatever else runs), shard bytes and the reader's memory.
Progress goes to stderr as it runs; the tables to stdout at the end. Not a test: numbers
depend on the machine.

    python benchmarks/loader.py                                  # every set, 0 and 2 workers, 5 repetitions
    python benchmarks/loader.py --sets rgb32:20000 --workers 0 --repeats 3
    python benchmarks/loader.py --checkout /tmp/gapm-main         # that checkout's reader too: before and after
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
from collections.abc import Callable

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_support import measure_in_child, progress  # noqa: E402

from pipeline.data import storage  # noqa: E402
from pipeline.data.sample_decode import SampleDecoder, npy_header  # noqa: E402
from pipeline.data.shards import convert_dataset  # noqa: E402
from pipeline.data.streaming import make_batch_stream  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- data sets


def write_synthetic_shards(out: str, samples: int, image_size: int, samples_per_shard: int, seed: int,
                           image_format: str = "png") -> None:
    """Random RGB images in the converter's layout (shards + manifest), PNG or raw .npy."""
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
                    if image_format == "raw":
                        image = ("npy", npy_header(pixels.shape) + pixels.tobytes())
                    else:
                        buffer = io.BytesIO()
                        Image.fromarray(pixels).save(buffer, format="PNG")
                        image = ("png", buffer.getvalue())
                    for suffix, payload in (image, ("cls", b"0")):
                        info = tarfile.TarInfo(f"{index:08d}.{suffix}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            storage.upload_file(path, storage.join_url(out, name))
            shards.append({"name": name, "num_samples": count, "bytes": os.path.getsize(path)})
    manifest = {"dataset": "synthetic", "split": "train", "num_samples": samples, "shards": shards,
                "image": {"height": image_size, "width": image_size, "channels": 3, "format": image_format}}
    storage.write_bytes(storage.join_url(out, "manifest.json"), json.dumps(manifest).encode())


def shard_set(out: str, size: int, image_size: int, samples_per_shard: int,
              image_format: str = "png") -> tuple[str, list[str]]:
    """(spec, shard URLs) of a synthetic set of `size` images, written unless `out` already holds it."""
    spec = storage.join_url(out, f"n{size}-s{image_size}-p{samples_per_shard}-{image_format}")
    manifest_url = storage.join_url(spec, "manifest.json")
    if storage.exists(manifest_url):
        progress(f"{size} {image_size}x{image_size} samples: reusing {spec}")
    else:
        progress(f"{size} samples: writing {image_size}x{image_size} {image_format} shards to {spec}")
        write_synthetic_shards(spec, size, image_size, samples_per_shard, seed=size, image_format=image_format)
    shards = json.loads(storage.read_bytes(manifest_url))["shards"]
    return spec, [storage.join_url(spec, shard["name"]) for shard in shards]


def fashion_mnist_set(out: str, source: str, size: int, shards: int, image_format: str) -> tuple[str, list[str]]:
    """The first `size` images of Fashion-MNIST's test split as `gapm shards` writes them."""
    root = storage.join_url(out, f"fashion-mnist-n{size}-x{shards}-{image_format}")
    spec = storage.join_url(root, "test")
    if not storage.exists(storage.join_url(spec, "manifest.json")):
        progress(f"fashion-mnist: converting {size} test images to {image_format} shards in {root}")
        convert_dataset("fashion-mnist", source, root, split="test", limit=size, image_format=image_format,
                        samples_per_shard=-(-size // shards))
    shards_listed = json.loads(storage.read_bytes(storage.join_url(spec, "manifest.json")))["shards"]
    return spec, [storage.join_url(spec, shard["name"]) for shard in shards_listed]


def image_members(urls: list[str]) -> list[bytes]:
    """The image member of every sample, in memory: what the decode-only columns decode."""
    members = []
    for url in urls:
        with storage.open_read_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.endswith((".png", ".npy")):
                    members.append(tar.extractfile(member).read())
    return members


# --------------------------------------------------------------------------- one pass of each column


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _pil_pixels(data: bytes) -> np.ndarray:
    if data[:6] == b"\x93NUMPY":
        return np.load(io.BytesIO(data))
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture)


def decode_only(members: list[bytes]) -> int:
    """The decode-only limit: PIL on bytes in memory (raw members: np.load)."""
    for data in members:
        _pil_pixels(data)
    return len(members)


def reader_decode(members: list[bytes], shape: tuple[int, int, int], image_format: str) -> int:
    decode = SampleDecoder(shape, image_format)
    extension = "npy" if image_format == "raw" else "png"
    for data in members:
        decode({extension: data})
    return len(members)


def bare_loop(shard_urls: list[str]) -> int:
    """Read each tar sequentially and decode every image, nothing else."""
    decoded = 0
    for url in shard_urls:
        with storage.open_read_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.endswith((".png", ".npy")):
                    _pil_pixels(tar.extractfile(member).read())
                    decoded += 1
    return decoded


def stock_webdataset(shard_urls: list[str]) -> int:
    return sum(1 for _ in wds.WebDataset(shard_urls, shardshuffle=False, empty_check=False).decode("rgb8"))


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


def time_stream(spec: str, *, batch_size: int, workers: int, shuffle_buffer: int) -> dict[str, float]:
    """One pass of the reader: samples, wall and CPU seconds, and its memory (Linux /proc): the
    peak RSS of this process (and its growth within the pass) and the peak sum over the workers."""
    stream = make_batch_stream(spec, batch_size, num_workers=workers, drop_last=False, shuffle_buffer=shuffle_buffer)
    main_start = main_peak = _rss_mib("self")
    workers_peak, next_sample = 0.0, 0.0
    cpu, workers_cpu = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    count = 0
    for batch in stream:
        count += batch.shape[0]
        if time.perf_counter() >= next_sample:  # every 0.2 s
            next_sample = time.perf_counter() + 0.2
            main_peak = max(main_peak, _rss_mib("self"))
            workers_peak = max(workers_peak, sum(_rss_mib(pid) for pid in _child_pids()))
    wall = time.perf_counter() - started
    # Workers are joined when the pass ends, so their CPU time is in RUSAGE_CHILDREN by now.
    return {"samples": count, "wall": wall, "cpu": _cpu_seconds(resource.RUSAGE_SELF) - cpu,
            "workers_cpu": _cpu_seconds(resource.RUSAGE_CHILDREN) - workers_cpu,
            "main_rss": main_peak, "main_growth": main_peak - main_start, "workers_rss": workers_peak}


# One pass of another checkout's reader, timed inside its own fresh process (imports excluded).
_PASS_OF_CHECKOUT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.data.streaming import make_batch_stream
stream = make_batch_stream(sys.argv[2], int(sys.argv[3]), drop_last=False, shuffle_buffer=int(sys.argv[4]))
count, cpu, started = 0, time.process_time(), time.perf_counter()
for batch in stream:
    count += batch.shape[0]
print(json.dumps({"samples": count, "wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}))
"""


def time_checkout(checkout: str, spec: str, *, batch_size: int, shuffle_buffer: int) -> dict[str, float]:
    """One pass of the reader of another checkout of this repository (``--checkout``), 0 workers."""
    return measure_in_child([sys.executable, "-c", _PASS_OF_CHECKOUT, checkout, spec, str(batch_size),
                             str(shuffle_buffer)], what=f"{checkout}: {spec}")


def timed(run: Callable[[], int]) -> dict[str, float]:
    cpu, started = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    count = run()
    return {"samples": count, "wall": time.perf_counter() - started, "cpu": _cpu_seconds(resource.RUSAGE_SELF) - cpu}


# --------------------------------------------------------------------------- the run

LIMIT, READER_DECODE, BARE, WEBDATASET = "decode-only limit", "reader's decode", "bare loop", "webdataset"
CHECKOUT = "--checkout, 0 workers"


def gapm_column(workers: int) -> str:
    return f"gapm, {workers} worker{'s' if workers != 1 else ''}"


def data_sets(args: argparse.Namespace, out: str) -> list[dict]:
    """Every (set, format) measured: its shards, shape, image members in memory and shard bytes."""
    raw_sets = {name.partition(":")[0] for name in args.raw.split(",") if name}
    found = []
    for entry in args.sets.split(","):
        name, _, count_text = entry.partition(":")
        for image_format in ("png", "raw") if name in raw_sets else ("png",):
            if name == "fashion-mnist":
                if not os.path.exists(os.path.join(args.fashion_mnist, "t10k-images-idx3-ubyte.gz")):
                    progress(f"fashion-mnist: no IDX files in {args.fashion_mnist}; skipped")
                    break
                size = int(count_text or 10000)
                spec, urls = fashion_mnist_set(out, args.fashion_mnist, size, args.shards, image_format)
                shape = (28, 28, 1)
            elif name.startswith("rgb"):
                side, size = int(name[3:]), int(count_text or (10000 if int(name[3:]) <= 32 else 5000))
                spec, urls = shard_set(out, size, side, -(-size // args.shards), image_format)
                shape = (side, side, 3)
            else:
                raise SystemExit(f"--sets: unknown set {name!r}; expected fashion-mnist or rgbSIDE, e.g. rgb32:10000")
            shard_bytes = sum(os.path.getsize(storage.local_path(url)) for url in urls) \
                if not storage.is_s3_url(out) else float("nan")
            found.append({"set": entry, "format": image_format, "spec": spec, "urls": urls, "shape": shape,
                          "samples": size, "shard_bytes": shard_bytes,
                          "members": image_members(urls) if {"limit", "decode"} & set(args.columns.split(",")) else []})
    return found


def columns(data: dict, args: argparse.Namespace) -> list[tuple[str, Callable[[], dict]]]:
    members, urls, wanted = data["members"], data["urls"], set(args.columns.split(","))
    chosen = [] if data["format"] == "raw" or "limit" not in wanted else [
        (LIMIT, lambda: timed(lambda: decode_only(members)))]
    chosen += [(column, measure) for key, column, measure in (
        ("decode", READER_DECODE, lambda: timed(lambda: reader_decode(members, data["shape"], data["format"]))),
        ("bare", BARE, lambda: timed(lambda: bare_loop(urls))),
        ("webdataset", WEBDATASET, lambda: timed(lambda: stock_webdataset(urls)))) if key in wanted]
    if args.checkout:
        chosen.append((CHECKOUT, lambda: time_checkout(args.checkout, data["spec"], batch_size=args.batch_size,
                                                       shuffle_buffer=args.shuffle_buffer)))
    for workers in (int(w) for w in args.workers.split(",")) if "gapm" in wanted else ():
        chosen.append((gapm_column(workers), lambda workers=workers: time_stream(
            data["spec"], batch_size=args.batch_size, workers=workers, shuffle_buffer=args.shuffle_buffer)))
    return chosen


def run(args: argparse.Namespace, out: str) -> tuple[list[dict], dict]:
    """Each repetition runs every column of every set once (columns rotated by the repetition)."""
    sets = data_sets(args, out)
    if not storage.is_s3_url(out):
        os.sync()  # no writeback of freshly written shards during the timed passes
    passes: dict[tuple[str, str, str], list[dict]] = {}
    for repetition in range(args.repeats):
        for data in sets:
            chosen = columns(data, args)
            shift = repetition % len(chosen)
            for column, measure in chosen[shift:] + chosen[:shift]:
                measured = measure()
                assert measured["samples"] == data["samples"], (column, measured["samples"], data["samples"])
                passes.setdefault((data["set"], data["format"], column), []).append(measured)
                progress(f"repetition {repetition + 1}/{args.repeats}: {data['set']} {data['format']}, {column}: "
                         f"{data['samples'] / measured['wall']:,.0f} samples/s")
    return sets, passes


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def summary(sets: list[dict], passes: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (set, format, column): rates, CPU, memory, and its ratios to the references."""
    rows = []
    for data in sets:
        key = (data["set"], data["format"])
        for (name, image_format, column), measured in passes.items():
            if (name, image_format) != key:
                continue
            rates = [data["samples"] / m["wall"] for m in measured]
            row = {"set": name, "format": image_format, "column": column, "samples": data["samples"],
                   "per_s": statistics.median(rates), "per_s_text": _spread(rates, 0),
                   "cpu_us": statistics.median(m["cpu"] for m in measured) / data["samples"] * 1e6,
                   "workers_cpu_us": statistics.median(m.get("workers_cpu", 0.0) for m in measured) / data["samples"] * 1e6,
                   "shard_bytes": data["shard_bytes"]}
            if "main_rss" in measured[0]:
                row.update(main_rss_mib=max(m["main_rss"] for m in measured),
                           main_growth_mib=max(m["main_growth"] for m in measured),
                           workers_rss_mib=max(m["workers_rss"] for m in measured))
            for reference in (LIMIT, READER_DECODE, WEBDATASET, BARE, gapm_column(0), CHECKOUT):
                against = passes.get((name, image_format, reference))
                if against and reference != column:  # within each repetition: reference time / this time
                    ratios = [r["wall"] / m["wall"] for r, m in zip(against, measured)]
                    row[f"x {reference}"] = _spread(ratios)
                    row[f"x {reference} median"] = statistics.median(ratios)
                    if reference in (LIMIT, READER_DECODE) and column == gapm_column(0):
                        row[f"x {reference} cpu"] = _spread([r["cpu"] / m["cpu"] for r, m in zip(against, measured)])
            png = passes.get((name, "png", column))
            if image_format == "raw" and png:
                row["x png"] = _spread([p["wall"] / m["wall"] for p, m in zip(png, measured)])
            rows.append(row)
    return rows


def print_tables(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> None:
    print(f"loader benchmark: batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}, {args.repeats} "
          f"interleaved repetitions, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start and {load[1]:.1f} "
          "at the end (1 min)")
    print()
    print("| set | format | column | samples/s, median [min-max] | CPU us/sample (+ workers) | x decode-only limit | "
          "x reader's decode | x webdataset | x bare loop | x gapm 0 workers | x --checkout | "
          "memory MiB: main / growth / workers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory = (f"{row['main_rss_mib']:.0f} / {row['main_growth_mib']:.1f} / {row['workers_rss_mib']:.0f}"
                  if "main_rss_mib" in row else "")
        ratios = " | ".join(row.get(f"x {reference}", "") for reference in (LIMIT, READER_DECODE, WEBDATASET, BARE,
                                                                            gapm_column(0), CHECKOUT))
        cpu = f"{row['cpu_us']:.1f}" + (f" + {row['workers_cpu_us']:.1f}" if row["workers_cpu_us"] else "")
        print(f"| {row['set']} | {row['format']} | {row['column']} | {row['per_s_text']} | {cpu} | "
              f"{ratios} | {memory} |")
    print()
    print("x REF = REF's seconds / this column's seconds over the same samples, taken within each repetition "
          "(median [min-max]); > 1: this column is faster. CPU: this process's CPU seconds per sample, plus its "
          "loader workers'")
    zero = gapm_column(0)
    cpu_ratios = [(row, [f"x {name} {row[f'x {reference} cpu']}" for reference, name in
                         ((LIMIT, "decode-only limit"), (READER_DECODE, "reader's decode")) if f"x {reference} cpu" in row])
                  for row in rows if row["column"] == zero]
    if any(ratios for _, ratios in cpu_ratios):  # only the columns measured (--columns)
        print("CPU-time ratios of gapm with 0 workers (the code's cost, whatever else runs on the machine): "
              + "; ".join(f"{row['set']} {row['format']}: {', '.join(ratios)}" for row, ratios in cpu_ratios if ratios))
    raw_rows = [row for row in rows if row["format"] == "raw" and row["column"] == zero]
    if raw_rows:
        print()
        print("| set | PNG samples/s | raw samples/s | raw x PNG | PNG shard bytes (per sample) | "
              "raw shard bytes (per sample) |")
        print("|---|---|---|---|---|---|")
        for raw in raw_rows:
            png = next(row for row in rows if (row["set"], row["format"], row["column"]) == (raw["set"], "png", zero))
            print(f"| {raw['set']} | {png['per_s']:,.0f} | {raw['per_s']:,.0f} | {raw.get('x png', '')} | "
                  f"{png['shard_bytes']:,} ({png['shard_bytes'] / png['samples']:,.0f}) | "
                  f"{raw['shard_bytes']:,} ({raw['shard_bytes'] / raw['samples']:,.0f}) |")
        print("(gapm with 0 workers; a tar member is padded to 512 bytes and has a 512-byte header, and each "
              "sample also holds .cls and .json members)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="fashion-mnist,rgb32:10000,rgb64:5000",
                        help="data sets, comma-separated: fashion-mnist[:N] (its test split) and rgbSIDE[:N] (random "
                             "RGB) (default: %(default)s)")
    parser.add_argument("--raw", default="fashion-mnist,rgb32",
                        help="sets also measured as raw-pixel shards (default: %(default)s)")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts of the gapm columns "
                                                         "(default: %(default)s)")
    parser.add_argument("--columns", default="limit,decode,bare,webdataset,gapm",
                        help="what is measured: limit (decode-only), decode (the reader's), bare, webdataset, gapm "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repetitions of every column (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=2, help="shards per data set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the gapm columns (default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="shuffle buffer of the gapm columns (default: %(default)s)")
    parser.add_argument("--fashion-mnist", default=FASHION_MNIST,
                        help="directory of the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--checkout", default=None,
                        help="another checkout of this repository (e.g. `git worktree add /tmp/gapm-main main`): its "
                             "reader is measured too, 0 workers, a fresh process per pass (default: none)")
    parser.add_argument("--out", default=None,
                        help="where shards go (dir or s3://; kept and reused) (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (default: none)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    load_before = os.getloadavg()[0]
    temporary = tempfile.TemporaryDirectory(prefix="gapm-loader-bench-") if args.out is None else None
    try:
        sets, passes = run(args, args.out if temporary is None else temporary.name)
    finally:
        if temporary is not None:
            temporary.cleanup()
    rows = summary(sets, passes, args)
    print_tables(rows, args, (load_before, os.getloadavg()[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
