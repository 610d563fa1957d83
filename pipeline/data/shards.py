"""Dataset conversion: source files -> WebDataset tar shards + a manifest per split (the
readers of each source format are in `pipeline.data.converters`).

Training streams shards rather than reading the original datasets because the originals come in
five unrelated formats (pickle batches, IDX, a JPEG directory, generated points) and none of them
streams well from object storage. Every converter here produces the same thing:

    OUT/<split>/shard-000000.tar, shard-000001.tar, ...  and  OUT/<split>/manifest.json

where OUT is a local directory, a ``file://`` URL or ``s3://bucket/prefix``. Each sample in a tar is
``%08d`` (its index in the split) with

* images: ``.png`` (lossless, default), ``.jpg``, or ``.npy`` for ``image_format="raw"`` (the
  uint8 pixels as an (H, W, C) array: no decode when read, see below), ``.cls`` (label as text)
  and ``.json`` ``{"label": int, "index": int}`` (``index`` is the position in the source split);
* swiss-roll points: ``.npy`` (float32 array of shape (2,), or (3,) for ``swissroll3d``) and
  ``.json`` ``{"index", "t"}``.

The manifest lists every shard with its sample count and sha256, plus the dataset, split, image
geometry, preprocessing and the size of the largest tar member (``max_member_bytes``: readers
refuse members far above it unread, see pipeline.data.streaming), so a reader can size epochs without opening the tars and a person can
see how the data was made. Tars are written deterministically (fixed mtimes/owners), so converting
the same source twice gives byte-identical shards.

Raw pixels (``image_format="raw"``, recorded as ``image.format: "raw"`` in the manifest): each
``.npy`` member is exactly ``np.save`` of a C-ordered uint8 array of the manifest's (height,
width, channels), so any tool reads it with ``np.load``, and the reader takes the pixels as they
are once it has compared the member's size and header with what the manifest implies. For tiny
images this removes the decode from the input pipeline; it does not save bytes (PNG compresses,
and a tar member is padded to 512 bytes either way) and costs storage and network at larger
sizes (64x64 RGB: 12 KiB a sample against a few KiB of PNG or JPEG).

Splits: CIFAR-10, MNIST and Fashion-MNIST have ``train`` and ``test``; swiss-roll has ``train``
(``swissroll_samples`` points) and ``test`` (``SWISSROLL_TEST_SAMPLES`` points); CelebA has ``train``, ``valid`` and
``test`` following ``list_eval_partition.txt`` (0, 1, 2) - the validation set is kept as its own
split rather than merged into test so that the official test partition stays comparable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Any

import numpy as np
from PIL import Image

from pipeline import console
from pipeline.data import converters, storage
from pipeline.data.settings import SWISSROLL_SAMPLES
from pipeline.data.converters import (
    CELEBA_CROPS,
    DATASETS,
    Sample,
    SplitSource,
    crop_celeba,
    read_idx,
)
from pipeline.data.sample_decode import RAW_EXTENSION, npy_header
from pipeline.errors import DataError

__all__ = [
    "DATASETS",
    "CELEBA_CROPS",
    "MANIFEST_NAME",
    "convert_dataset",
    "read_manifest",
    "read_idx",
    "crop_celeba",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gapm-shards/1"
IMAGE_FORMATS = ("png", "jpg", "raw")  # raw: uint8 pixels as .npy, no decode when read

# Fixed tar member metadata: shards of the same source are byte-identical, so their sha256 in the
# manifest identifies the data, not the time of conversion.
_TAR_MTIME = 0


# --------------------------------------------------------------------------- public API


def convert_dataset(
    dataset: str,
    src: str,
    out: str,
    *,
    split: str | None = None,
    image_format: str = "png",
    jpeg_quality: int = 95,
    samples_per_shard: int = 10000,
    limit: int | None = None,
    celeba_crop: str = "center178",
    seed: int = 0,
    swissroll_samples: int = SWISSROLL_SAMPLES,
) -> dict[str, dict[str, Any]]:
    """Convert ``dataset`` found at ``src`` into shards under ``out``; return ``{split: manifest}``.

    ``split`` converts one split only (default: all of the dataset's splits). ``limit`` keeps the
    first N samples of each split (quick experiments, tests). ``seed`` drives the swiss-roll
    sampler (its test set uses ``seed + 1``); the other datasets are converted in source order,
    because shuffling is the reader's job. ``src`` is ignored for swiss-roll (pass "-").

    The source is validated before anything is written: a missing directory or file, or a file in
    the wrong format, raises FileNotFoundError / ValueError naming the file and the expected layout.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    image_format = image_format.lower()
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image_format {image_format!r}: expected 'png' (lossless), 'jpg' or 'raw' (uint8 pixels, "
                        "no decode when read)")
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"jpeg_quality {jpeg_quality}: expected 1..100")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard {samples_per_shard}: expected a positive number")
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit}: expected a positive number or None for the whole dataset")
    if celeba_crop not in CELEBA_CROPS:
        raise DataError(f"celeba_crop {celeba_crop!r}: expected one of {', '.join(CELEBA_CROPS)}")

    sources = converters.read_source(dataset, src, limit=limit, celeba_crop=celeba_crop, seed=seed,
                                     swissroll_samples=swissroll_samples)

    if split is not None:
        if split not in sources:
            raise DataError(f"{dataset} has no split {split!r}; expected one of {', '.join(sources)}")
        sources = {split: sources[split]}

    if storage.is_s3_url(out):
        # Fail on a missing bucket / bad credentials before spending minutes encoding images.
        bucket, _ = storage.split_s3_url(out)
        storage.check_readable(f"s3://{bucket}")

    created = [] if storage.is_s3_url(out) else _missing_directories(
        [storage.local_path(storage.join_url(out, name)) for name in sources])
    manifests = {}
    try:
        for name, source in sources.items():
            manifests[name] = _write_split(
                source,
                dataset=dataset,
                src=src,
                out_split=storage.join_url(out, name),
                image_format=image_format,
                jpeg_quality=int(jpeg_quality),
                samples_per_shard=samples_per_shard,
            )
    except BaseException:
        _remove_if_empty(created)  # a failed conversion leaves no empty output directories behind
        raise
    return manifests


def _missing_directories(paths: list[str]) -> list[str]:
    """The directories (and their missing parents) that writing into `paths` will create."""
    missing: list[str] = []
    for path in paths:
        path = os.path.abspath(path)
        while path and not os.path.exists(path) and path not in missing:
            missing.append(path)
            path = os.path.dirname(path)
    return missing


def _remove_if_empty(directories: list[str]) -> None:
    for directory in sorted(directories, key=len, reverse=True):  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            pass  # not empty (a split converted before the failure), or gone


def read_manifest(directory_url: str) -> dict[str, Any]:
    """Read ``manifest.json`` of one split directory (local or s3://)."""
    url = storage.join_url(directory_url, MANIFEST_NAME)
    data = storage.read_bytes(url)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"{url}: not valid JSON ({exc}); re-run the shard conversion") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{url}: not a shard manifest (no 'shards' list); re-run the shard conversion")
    return manifest


# --------------------------------------------------------------------------- writing


def _write_split(
    source: SplitSource,
    *,
    dataset: str,
    src: str,
    out_split: str,
    image_format: str,
    jpeg_quality: int,
    samples_per_shard: int,
) -> dict[str, Any]:
    """Write one split's shards, then its manifest (last, so a manifest means a complete split).

    Each tar is first written under a temporary name; locally it is renamed into place, for S3 it
    is uploaded once complete and the local copy removed, so only whole shards ever appear.
    """
    to_s3 = storage.is_s3_url(out_split)
    # A manifest vouches for a complete split; drop any old one before shards are overwritten.
    storage.delete(storage.join_url(out_split, MANIFEST_NAME))
    staging = tempfile.mkdtemp(prefix="gapm-shards-") if to_s3 else storage.local_path(out_split)
    os.makedirs(staging, exist_ok=True)
    shards: list[dict[str, Any]] = []
    total = largest_member = 0
    unit = "img" if source.image is not None else "point"
    progress = console.progress_bar(source.count, f"{dataset} {source.split}", unit=unit)
    try:
        tar: tarfile.TarFile | None = None
        tmp_path = ""
        in_shard = 0

        def finish_shard() -> None:
            nonlocal tar
            assert tar is not None
            tar.close()
            tar = None
            name = f"shard-{len(shards):06d}.tar"
            digest, size = _sha256_of(tmp_path)
            if to_s3:
                storage.upload_file(tmp_path, storage.join_url(out_split, name))
                os.remove(tmp_path)
            else:
                os.replace(tmp_path, os.path.join(staging, name))
            shards.append({"name": name, "num_samples": in_shard, "sha256": digest, "bytes": size})

        for sample in source.samples:
            if tar is None:
                tmp_path = os.path.join(staging, f".shard-{len(shards):06d}.tar.partial")
                tar = tarfile.open(tmp_path, "w", format=tarfile.PAX_FORMAT)
                in_shard = 0
            key = f"{total:08d}"
            for suffix, payload in _encode_sample(sample, image_format, jpeg_quality).items():
                _add_member(tar, f"{key}.{suffix}", payload)
                largest_member = max(largest_member, len(payload))
            in_shard += 1
            total += 1
            progress.update(1)
            if in_shard == samples_per_shard:
                finish_shard()
                progress.set_postfix(shards=len(shards), refresh=False)
        if tar is not None:
            finish_shard()
            progress.set_postfix(shards=len(shards), refresh=False)
    finally:
        progress.close()
        if to_s3:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            for leftover in os.listdir(staging):
                if leftover.endswith(".partial"):
                    os.remove(os.path.join(staging, leftover))

    if total == 0:
        raise DataError(f"{src}: the {source.split} split of {dataset} has no samples; nothing written")
    manifest = _split_manifest(source, dataset=dataset, src=src, image_format=image_format,
                               jpeg_quality=jpeg_quality, samples_per_shard=samples_per_shard, shards=shards,
                               max_member_bytes=largest_member)
    storage.write_bytes(
        storage.join_url(out_split, MANIFEST_NAME), (json.dumps(manifest, indent=2) + "\n").encode()
    )
    return manifest


def _split_manifest(source: SplitSource, *, dataset: str, src: str, image_format: str, jpeg_quality: int,
                    samples_per_shard: int, shards: list[dict[str, Any]], max_member_bytes: int) -> dict[str, Any]:
    """What manifest.json records of one written split: its shards and how they were made."""
    image = None
    if source.image is not None:
        image = dict(source.image, format=image_format)
        if image_format == "jpg":
            image["jpeg_quality"] = jpeg_quality
    return {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "split": source.split,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "samples_per_shard": samples_per_shard,
        "max_member_bytes": max_member_bytes,
        "image": image,
        "point_dim": source.point_dim if source.image is None else None,
        "preprocessing": source.preprocessing,
        "source": src,
        "shards": shards,
    }


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _encode_sample(sample: Sample, image_format: str, jpeg_quality: int) -> dict[str, bytes]:
    if sample.point is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(sample.point, dtype=np.float32))
        meta = {"index": sample.index, **sample.extra}
        return {"npy": buffer.getvalue(), "json": json.dumps(meta).encode()}
    assert sample.image is not None
    label = -1 if sample.label is None else int(sample.label)
    meta = {"label": label, "index": sample.index, **sample.extra}
    return {**_encode_image(sample.image, image_format, jpeg_quality), "cls": str(label).encode(),
            "json": json.dumps(meta).encode()}


def _encode_image(image: np.ndarray, image_format: str, jpeg_quality: int) -> dict[str, bytes]:
    """The image member of a sample: PNG, JPEG, or the raw pixels as a (H, W, C) uint8 .npy."""
    if image_format == "raw":
        pixels = np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None], dtype=np.uint8)
        return {RAW_EXTENSION: npy_header(pixels.shape) + pixels.tobytes()}
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    if image_format == "png":
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=jpeg_quality)
    return {image_format: buffer.getvalue()}


def _sha256_of(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
