"""Dataset converters: source files -> WebDataset tar shards + a manifest per split.

Training streams shards rather than reading the original datasets because the originals come in
five unrelated formats (pickle batches, IDX, a JPEG directory, generated points) and none of them
streams well from object storage. Every converter here produces the same thing:

    OUT/<split>/shard-000000.tar, shard-000001.tar, ...  and  OUT/<split>/manifest.json

where OUT is a local directory, a ``file://`` URL or ``s3://bucket/prefix``. Each sample in a tar is
``%08d`` (its index in the split) with

* images: ``.png`` (lossless, default) or ``.jpg``, ``.cls`` (label as text) and ``.json``
  ``{"label": int, "index": int}`` (``index`` is the position in the source split);
* swiss-roll points: ``.npy`` (float32 array of shape (2,), or (3,) for ``swissroll3d``) and
  ``.json`` ``{"index", "t"}``.

The manifest lists every shard with its sample count and sha256, plus the dataset, split, image
geometry and preprocessing, so a reader can size epochs without opening the tars and a person can
see how the data was made. Tars are written deterministically (fixed mtimes/owners), so converting
the same source twice gives byte-identical shards.

Splits: CIFAR-10, MNIST and Fashion-MNIST have ``train`` and ``test``; swiss-roll has ``train``
(``swissroll_samples`` points) and ``test`` (1000 points); CelebA has ``train``, ``valid`` and
``test`` following ``list_eval_partition.txt`` (0, 1, 2) - the validation set is kept as its own
split rather than merged into test so that the official test partition stays comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data import storage, swissroll
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

DATASETS = ("cifar10", "celeba", "mnist", "fashion-mnist", "swissroll", "swissroll3d")
CELEBA_CROPS = ("center178", "authors")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gapm-shards/1"
SWISSROLL_TEST_SAMPLES = 1000
CELEBA_SIZE = 64

# Fixed tar member metadata: shards of the same source are byte-identical, so their sha256 in the
# manifest identifies the data, not the time of conversion.
_TAR_MTIME = 0


@dataclass
class _Sample:
    """One source sample before encoding: an image (H, W) / (H, W, 3) uint8 or a 2-D point."""

    index: int
    label: int | None = None
    image: np.ndarray | None = None
    point: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _SplitSource:
    """A lazily read split: validated up front, decoded while shards are written."""

    split: str
    samples: Iterator[_Sample]
    image: dict[str, int] | None  # height, width, channels; None for point data
    preprocessing: dict[str, Any]
    point_dim: int | None = None  # coordinates per point, for point data


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
    swissroll_samples: int = 5000,
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
    if image_format not in ("png", "jpg"):
        raise DataError(f"image_format {image_format!r}: expected 'png' (lossless) or 'jpg'")
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"jpeg_quality {jpeg_quality}: expected 1..100")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard {samples_per_shard}: expected a positive number")
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit}: expected a positive number or None for the whole dataset")
    if celeba_crop not in CELEBA_CROPS:
        raise DataError(f"celeba_crop {celeba_crop!r}: expected one of {', '.join(CELEBA_CROPS)}")

    if dataset == "cifar10":
        sources = _cifar10_sources(src, limit)
    elif dataset in ("mnist", "fashion-mnist"):
        sources = _idx_sources(src, limit)
    elif dataset == "celeba":
        sources = _celeba_sources(src, limit, celeba_crop)
    else:
        sources = _swissroll_sources(dataset, swissroll_samples, seed, limit)

    if split is not None:
        if split not in sources:
            raise DataError(f"{dataset} has no split {split!r}; expected one of {', '.join(sources)}")
        sources = {split: sources[split]}

    if storage.is_s3_url(out):
        # Fail on a missing bucket / bad credentials before spending minutes encoding images.
        bucket, _ = storage.split_s3_url(out)
        storage.check_readable(f"s3://{bucket}")

    manifests = {}
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
    return manifests


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
    source: _SplitSource,
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
    total = 0
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
            in_shard += 1
            total += 1
            if in_shard == samples_per_shard:
                finish_shard()
        if tar is not None:
            finish_shard()
    finally:
        if to_s3:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            for leftover in os.listdir(staging):
                if leftover.endswith(".partial"):
                    os.remove(os.path.join(staging, leftover))

    if total == 0:
        raise DataError(f"{src}: the {source.split} split of {dataset} has no samples; nothing written")
    image = None
    if source.image is not None:
        image = dict(source.image, format=image_format)
        if image_format == "jpg":
            image["jpeg_quality"] = jpeg_quality
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "split": source.split,
        "num_samples": total,
        "samples_per_shard": samples_per_shard,
        "image": image,
        "point_dim": source.point_dim if source.image is None else None,
        "preprocessing": source.preprocessing,
        "source": src,
        "shards": shards,
    }
    storage.write_bytes(
        storage.join_url(out_split, MANIFEST_NAME), (json.dumps(manifest, indent=2) + "\n").encode()
    )
    return manifest


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _encode_sample(sample: _Sample, image_format: str, jpeg_quality: int) -> dict[str, bytes]:
    if sample.point is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(sample.point, dtype=np.float32))
        meta = {"index": sample.index, **sample.extra}
        return {"npy": buffer.getvalue(), "json": json.dumps(meta).encode()}
    assert sample.image is not None
    buffer = io.BytesIO()
    picture = Image.fromarray(sample.image)
    if image_format == "png":
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=jpeg_quality)
    label = -1 if sample.label is None else int(sample.label)
    meta = {"label": label, "index": sample.index, **sample.extra}
    return {image_format: buffer.getvalue(), "cls": str(label).encode(), "json": json.dumps(meta).encode()}


def _sha256_of(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _limited(samples: Iterator[_Sample], limit: int | None) -> Iterator[_Sample]:
    for count, sample in enumerate(samples):
        if limit is not None and count >= limit:
            return
        yield sample


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_LAYOUT = (
    "expected the CIFAR-10 python version: a directory with data_batch_1 ... data_batch_5 and "
    "test_batch (as unpacked from cifar-10-python.tar.gz, i.e. cifar-10-batches-py/)"
)


def _cifar10_sources(src: str, limit: int | None) -> dict[str, _SplitSource]:
    root = storage.local_path(src)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{src}: no such directory; {_CIFAR_LAYOUT}")
    if not os.path.exists(os.path.join(root, "data_batch_1")) and os.path.isdir(
        os.path.join(root, "cifar-10-batches-py")
    ):
        root = os.path.join(root, "cifar-10-batches-py")
    files = {
        "train": [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)],
        "test": [os.path.join(root, "test_batch")],
    }
    missing = [path for paths in files.values() for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: missing; {_CIFAR_LAYOUT}")
    # Parse the first batch now so that a wrong format fails before anything is written.
    _load_cifar_batch(files["train"][0])
    geometry = {"height": 32, "width": 32, "channels": 3}
    return {
        name: _SplitSource(name, _limited(_cifar_samples(paths), limit), geometry, {"resize": None})
        for name, paths in files.items()
    }


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 ships as pickles; this unpickler only rebuilds plain containers and numpy
    arrays, so a tampered batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _load_cifar_batch(path: str) -> tuple[np.ndarray, list[int]]:
    """Load one pickle batch as (N, 32, 32, 3) uint8 images and labels."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc}); {_CIFAR_LAYOUT}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: unpickled a {type(batch).__name__}, not a dict; {_CIFAR_LAYOUT}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise DataError(f"{path}: batch has keys {keys}, expected 'data' and 'labels'; {_CIFAR_LAYOUT}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(
            f"{path}: 'data' is {data.dtype} {data.shape} with {len(labels)} labels; expected uint8 "
            f"(N, 3072) row-major RGB planes and N labels; {_CIFAR_LAYOUT}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), [int(label) for label in labels]


def _cifar_samples(paths: list[str]) -> Iterator[_Sample]:
    index = 0
    for path in paths:
        images, labels = _load_cifar_batch(path)
        for image, label in zip(images, labels):
            yield _Sample(index=index, label=label, image=image)
            index += 1


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_LAYOUT = (
    "expected the MNIST/Fashion-MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz) in one directory"
)


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (MNIST format), gzipped or not, checking its header against its size.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions, then each
    dimension as a big-endian uint32.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc}); re-download the file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x00000801 (labels) or "
            f"0x00000803 (images) - is this really an MNIST-format file? {_IDX_LAYOUT}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; re-download the file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(root: str, stem: str) -> str:
    prefix, kind = stem.rsplit("-", 1)  # e.g. "train-images", "idx3"
    candidates = [f"{stem}-ubyte", f"{prefix}.{kind}-ubyte"]
    for name in candidates:
        for path in (os.path.join(root, name), os.path.join(root, name + ".gz")):
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{os.path.join(root, candidates[0])}[.gz]: missing; {_IDX_LAYOUT}")


def _idx_sources(src: str, limit: int | None) -> dict[str, _SplitSource]:
    root = storage.local_path(src)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{src}: no such directory; {_IDX_LAYOUT}")
    sources = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images_path = _find_idx(root, f"{stem}-images-idx3")
        labels_path = _find_idx(root, f"{stem}-labels-idx1")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{labels_path}: expected {len(images)} labels to match {images_path}, got shape {labels.shape}"
            )
        geometry = {"height": int(images.shape[1]), "width": int(images.shape[2]), "channels": 1}
        sources[split] = _SplitSource(split, _limited(_idx_samples(images, labels), limit), geometry, {"resize": None})
    return sources


def _idx_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[_Sample]:
    for i in range(len(images)):
        yield _Sample(index=i, label=int(labels[i]), image=images[i])


# --------------------------------------------------------------------------- CelebA

_CELEBA_LAYOUT = (
    "expected SRC/img_align_celeba/*.jpg and SRC/list_eval_partition.txt with lines like "
    "'000001.jpg 0' (0 = train, 1 = valid, 2 = test)"
)
_CELEBA_PARTITIONS = {0: "train", 1: "valid", 2: "test"}


def crop_celeba(image: Image.Image, crop: str = "center178") -> Image.Image:
    """Crop and resize an aligned CelebA image (178x218) to 64x64 RGB.

    "center178": CenterCrop(178) + Resize(64), bilinear (Mimicry and most GAN papers).
    "authors":   resize to 64x78 (w x h), bilinear, keep rows 7..70 (the GAPM authors' code).
    Papers disagree, and FIDs are only comparable under the same crop, so it is recorded in the
    manifest.
    """
    image = image.convert("RGB")
    if crop == "center178":
        width, height = image.size
        if width < 178 or height < 178:
            raise DataError(f"CelebA image of size {width}x{height} is smaller than the 178x178 crop")
        # Same arithmetic as torchvision.transforms.CenterCrop.
        top = int(round((height - 178) / 2.0))
        left = int(round((width - 178) / 2.0))
        square = image.crop((left, top, left + 178, top + 178))
        return square.resize((CELEBA_SIZE, CELEBA_SIZE), Image.BILINEAR)
    if crop == "authors":
        return image.resize((64, 78), Image.BILINEAR).crop((0, 7, 64, 71))
    raise DataError(f"celeba_crop {crop!r}: expected one of {', '.join(CELEBA_CROPS)}")


def _celeba_sources(src: str, limit: int | None, crop: str) -> dict[str, _SplitSource]:
    root = storage.local_path(src)
    images_dir = os.path.join(root, "img_align_celeba")
    partition_path = os.path.join(root, "list_eval_partition.txt")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{src}: no such directory; {_CELEBA_LAYOUT}")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{images_dir}: missing image directory; {_CELEBA_LAYOUT}")
    if not os.path.isfile(partition_path):
        raise FileNotFoundError(f"{partition_path}: missing partition file; {_CELEBA_LAYOUT}")

    by_split: dict[str, list[str]] = {name: [] for name in _CELEBA_PARTITIONS.values()}
    with open(partition_path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(f"{partition_path}:{line_number}: cannot parse {line.strip()!r}; {_CELEBA_LAYOUT}")
            by_split[_CELEBA_PARTITIONS[int(fields[1])]].append(fields[0])
    listed = [name for names in by_split.values() for name in names]
    if not listed:
        raise DataError(f"{partition_path}: lists no images; {_CELEBA_LAYOUT}")
    present = set(os.listdir(images_dir))
    missing = [name for name in listed if name not in present]
    if missing:
        raise FileNotFoundError(
            f"{images_dir}: {len(missing)} image(s) listed in {partition_path} are missing, e.g. "
            f"{', '.join(missing[:3])}; {_CELEBA_LAYOUT}"
        )

    geometry = {"height": CELEBA_SIZE, "width": CELEBA_SIZE, "channels": 3}
    if crop == "center178":
        preprocessing = {"celeba_crop": crop, "ops": ["CenterCrop(178)", "Resize(64, bilinear)"]}
    else:
        preprocessing = {"celeba_crop": crop, "ops": ["Resize((78, 64), bilinear)", "rows[7:71]"]}

    def samples(names: list[str]) -> Iterator[_Sample]:
        for name in names:
            path = os.path.join(images_dir, name)
            try:
                with Image.open(path) as picture:
                    cropped = crop_celeba(picture, crop)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read image ({exc}); re-extract img_align_celeba") from exc
            number = int(os.path.splitext(name)[0]) if os.path.splitext(name)[0].isdigit() else -1
            yield _Sample(index=number, label=None, image=np.asarray(cropped), extra={"file": name})

    return {
        name: _SplitSource(name, _limited(samples(names), limit), geometry, preprocessing)
        for name, names in by_split.items()
        if names
    }


# --------------------------------------------------------------------------- swiss-roll


def _swissroll_sources(kind: str, train_samples: int, seed: int, limit: int | None) -> dict[str, _SplitSource]:
    if train_samples < 1:
        raise DataError(f"swissroll_samples {train_samples}: expected a positive number")
    geometry = swissroll.roll_geometry(kind)
    preprocessing = {
        "generator": "sklearn.datasets.make_swiss_roll",
        "roll": kind,  # pipeline.data.swissroll documents the noise, projection and scaling of each
        "seed": {"train": seed, "test": seed + 1},
    }

    def samples(count: int, random_state: int) -> Iterator[_Sample]:
        # t is drawn uniformly over the roll's parameter range by scikit-learn.
        points, t = geometry.sample(count, random_state)
        for i in range(count):
            yield _Sample(index=i, point=points[i].numpy(), extra={"t": float(t[i])})

    return {
        "train": _SplitSource("train", _limited(samples(train_samples, seed), limit), None, preprocessing,
                              geometry.dimension),
        "test": _SplitSource("test", _limited(samples(SWISSROLL_TEST_SAMPLES, seed + 1), limit), None,
                             preprocessing, geometry.dimension),
    }
