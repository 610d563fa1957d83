"""Dataset readers: each source format (CIFAR-10 pickle batches, MNIST / Fashion-MNIST IDX
files, CelebA's image directory and partition file, the generated swiss rolls) read into
`SplitSource`s of `Sample`s, validated before anything is written. `pipeline.data.shards` writes
them as shards.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data import storage, swissroll
from pipeline.data.settings import SWISSROLL_TEST_SAMPLES
from pipeline.errors import DataError

DATASETS = ("cifar10", "celeba", "mnist", "fashion-mnist", "swissroll", "swissroll3d")
CELEBA_CROPS = ("center178", "authors")
CELEBA_SIZE = 64


@dataclass
class Sample:
    """One source sample before encoding: an image (H, W) / (H, W, 3) uint8 or a 2-D point."""

    index: int
    label: int | None = None
    image: np.ndarray | None = None
    point: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitSource:
    """A lazily read split: validated up front, decoded while shards are written."""

    split: str
    samples: Iterator[Sample]
    image: dict[str, int] | None  # height, width, channels; None for point data
    preprocessing: dict[str, Any]
    point_dim: int | None = None  # coordinates per point, for point data
    count: int | None = None  # samples in the split (after `limit`) when known up front: progress


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def read_source(dataset: str, src: str, *, limit: int | None, celeba_crop: str, seed: int,
                swissroll_samples: int) -> dict[str, "SplitSource"]:
    """The splits of `dataset` at `src` (ignored for the swiss rolls), validated up front."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "cifar10":
        return _cifar10_sources(src, limit)
    if dataset in ("mnist", "fashion-mnist"):
        return _idx_sources(src, limit)
    if dataset == "celeba":
        return _celeba_sources(src, limit, celeba_crop)
    return _swissroll_sources(dataset, swissroll_samples, seed, limit)


def _limited(samples: Iterator[Sample], limit: int | None) -> Iterator[Sample]:
    for count, sample in enumerate(samples):
        if limit is not None and count >= limit:
            return
        yield sample


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_LAYOUT = (
    "expected the CIFAR-10 python version: a directory with data_batch_1 ... data_batch_5 and "
    "test_batch (as unpacked from cifar-10-python.tar.gz, i.e. cifar-10-batches-py/)"
)


def _cifar10_sources(src: str, limit: int | None) -> dict[str, SplitSource]:
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
        name: SplitSource(name, _limited(_cifar_samples(paths), limit), geometry, {"resize": None})
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


def _cifar_samples(paths: list[str]) -> Iterator[Sample]:
    index = 0
    for path in paths:
        images, labels = _load_cifar_batch(path)
        for image, label in zip(images, labels):
            yield Sample(index=index, label=label, image=image)
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


def _idx_sources(src: str, limit: int | None) -> dict[str, SplitSource]:
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
        sources[split] = SplitSource(split, _limited(_idx_samples(images, labels), limit), geometry, {"resize": None},
                                     count=_capped(len(images), limit))
    return sources


def _idx_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[Sample]:
    for i in range(len(images)):
        yield Sample(index=i, label=int(labels[i]), image=images[i])


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


def _celeba_sources(src: str, limit: int | None, crop: str) -> dict[str, SplitSource]:
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

    def samples(names: list[str]) -> Iterator[Sample]:
        for name in names:
            path = os.path.join(images_dir, name)
            try:
                with Image.open(path) as picture:
                    cropped = crop_celeba(picture, crop)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read image ({exc}); re-extract img_align_celeba") from exc
            number = int(os.path.splitext(name)[0]) if os.path.splitext(name)[0].isdigit() else -1
            yield Sample(index=number, label=None, image=np.asarray(cropped), extra={"file": name})

    return {
        name: SplitSource(name, _limited(samples(names), limit), geometry, preprocessing,
                          count=_capped(len(names), limit))
        for name, names in by_split.items()
        if names
    }


# --------------------------------------------------------------------------- swiss-roll


def _swissroll_sources(kind: str, train_samples: int, seed: int, limit: int | None) -> dict[str, SplitSource]:
    if train_samples < 1:
        raise DataError(f"swissroll_samples {train_samples}: expected a positive number")
    geometry = swissroll.roll_geometry(kind)
    preprocessing = {
        "generator": "sklearn.datasets.make_swiss_roll",
        "roll": kind,  # pipeline.data.swissroll documents the noise, projection and scaling of each
        "seed": {"train": seed, "test": seed + 1},
    }

    def samples(count: int, random_state: int) -> Iterator[Sample]:
        # t is drawn uniformly over the roll's parameter range by scikit-learn.
        points, t = geometry.sample(count, random_state)
        for i in range(count):
            yield Sample(index=i, point=points[i].numpy(), extra={"t": float(t[i])})

    return {
        "train": SplitSource("train", _limited(samples(train_samples, seed), limit), None, preprocessing,
                              geometry.dimension, count=_capped(train_samples, limit)),
        "test": SplitSource("test", _limited(samples(SWISSROLL_TEST_SAMPLES, seed + 1), limit), None,
                             preprocessing, geometry.dimension, count=_capped(SWISSROLL_TEST_SAMPLES, limit)),
    }
