"""One sample of a shard -> its pixels (uint8, H x W x C) or its point (float32): what the
streaming reader does to every sample that leaves its shuffle buffer (shard_reader), and what
the evaluation paths that read labelled images use (pipeline/eval/features.py).

Three kinds of image member, fastest first:

* ``.npy`` of a raw-pixel shard set (``gapm shards --image-format raw``): the manifest's
  ``image`` gives the shape, so the member must be exactly the ``.npy`` header that shape
  implies followed by ``H*W*C`` bytes; the pixels are used as they are (``np.frombuffer``), no
  decode at all. A member of any other size or header is a corrupt sample, refused before an
  array is made; without a manifest the header is parsed and checked against the member's
  size first, so a header promising gigabytes costs nothing.
* ``.png`` of the usual kind (8-bit grayscale or RGB, not interlaced, no chunks but IHDR, IDAT
  and IEND: what ``gapm shards`` writes): its IDAT data go straight to Pillow's own zlib
  decoder, which writes into a numpy array. ``Image.open`` + ``load`` + ``np.asarray`` runs the
  same C decoder under some 50 us of Python per image (plugin lookup, chunk parsing, tile
  setup, a copy out); at 28x28 that was most of the decode-only time (issue 23). The output is
  bit-identical (tests/unit/test_sample_decode.py compares them, and a check at import turns
  this path off if this Pillow disagrees).
* anything else (JPEG, WebP, palette or 16-bit PNG, a PNG with other chunks, and every PNG the
  fast path does not finish cleanly: truncated, bad checksum...): ``Image.open``, which also
  says what is wrong with a damaged one.

Hostile input is refused by its header before its pixels cost memory: an image of another size
than the manifest's (or, without one, over PIL's decompression-bomb limit) is not decoded.
"""

from __future__ import annotations

import io
import re
import struct
from typing import Any
from zlib import crc32

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "RAW_EXTENSION", "SampleDecoder", "failure_reason", "npy_header"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
RAW_EXTENSION = "npy"  # raw pixels (image shard sets) or a point (point shard sets)
GRAY_MODES = ("L", "1", "I;16", "I", "F")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_START = b"\x00\x00\x00\x0dIHDR"  # the first chunk: 13 bytes of IHDR
_IHDR = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, filter, interlace
_GRAY, _RGB = 0, 2  # PNG colour types


def npy_header(shape: tuple[int, ...], dtype: Any = np.uint8) -> bytes:
    """The bytes ``np.save`` writes before the data of a C-ordered array of this shape and dtype."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(side) for side in shape)})
    return buffer.getvalue()


class SampleDecoder:
    """Decodes the samples of one shard set: ``decoder(sample)`` -> an (H, W, C) uint8 image or a
    float32 point; raises (DataError, or the decoder's own error) for a corrupt sample.

    ``image_shape`` (H, W, C) and ``image_format`` ("png", "jpg", "raw") come from the manifest;
    None where there is none (a brace pattern without one): each image then keeps its own
    channels, and a ``.npy`` member is an image if it holds 2-D or 3-D uint8, else a point.
    """

    def __init__(self, image_shape: tuple[int, int, int] | None, image_format: str | None = None) -> None:
        self.image_shape = image_shape
        self.image_format = image_format
        self._raw_header = npy_header(image_shape) if image_shape is not None else b""
        self._raw_size = len(self._raw_header) + int(np.prod(image_shape)) if image_shape is not None else -1

    def __call__(self, sample: dict[str, Any]) -> np.ndarray:
        payload = sample.get(RAW_EXTENSION)
        if payload is not None:
            return self._array(payload)
        for extension in IMAGE_EXTENSIONS:
            data = sample.get(extension)
            if data is not None:
                if _FAST_PNG and data[:8] == _PNG_SIGNATURE:
                    pixels = plain_png_pixels(data, self.image_shape)
                    if pixels is not None:
                        return pixels
                return self._picture(data)
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) or {RAW_EXTENSION} member, only {members}")

    def _array(self, payload: bytes) -> np.ndarray:
        shape = self.image_shape
        if shape is not None and len(payload) == self._raw_size and payload.startswith(self._raw_header):
            return np.ndarray(shape, np.uint8, payload, len(self._raw_header))  # a read-only view of the member
        array = npy_array(payload)
        if shape is None:
            if array.dtype == np.uint8 and array.ndim in (2, 3):
                return array[:, :, None] if array.ndim == 2 else array
            return np.asarray(array, dtype=np.float32).reshape(-1)
        if array.dtype != np.uint8 or array.shape not in (shape, shape[:2] if shape[2] == 1 else shape):
            raise DataError(f"raw image of {array.dtype} {array.shape}, the manifest's is uint8 {shape}")
        return array.reshape(shape)

    def _picture(self, data: bytes) -> np.ndarray:
        shape = self.image_shape
        with Image.open(io.BytesIO(data)) as picture:  # reads the header only
            _check_size_before_decoding(picture.size, shape)
            picture.load()  # decode now so truncated data fails here, not later
            want_gray = shape[2] == 1 if shape else picture.mode in GRAY_MODES
            mode = "L" if want_gray else "RGB"
            if picture.mode != mode:  # convert() to the same mode would only copy the pixels
                picture = picture.convert(mode)
            array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        if shape is not None and array.shape != shape:
            raise DataError(f"image shape {array.shape} differs from the manifest's {shape}")
        return array


def npy_array(payload: bytes) -> np.ndarray:
    """The array of a ``.npy`` member, its header checked against its size before anything is
    allocated (``np.load`` allocates what the header promises before reading); no pickles."""
    stream = io.BytesIO(payload)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise DataError("the .npy member holds Python objects (a pickle); not loaded")
    count = int(np.prod(shape, dtype=np.int64))
    data = len(payload) - stream.tell()
    if data != count * dtype.itemsize:
        raise DataError(f"the .npy member holds {data} bytes of data, its header promises {count * dtype.itemsize} "
                        f"({dtype} {shape})")
    return np.frombuffer(payload, dtype, count, stream.tell()).reshape(shape, order="F" if fortran_order else "C")


def plain_png_pixels(data: bytes, image_shape: tuple[int, int, int] | None) -> np.ndarray | None:
    """The (H, W, C) pixels of a plain PNG (see the module docstring), decoded by Pillow's zlib
    decoder straight into a numpy array; None when the PNG is of another kind, another shape than
    ``image_shape``, or anything about it is not as it should be (``Image.open`` then decides)."""
    if len(data) < 45 or data[8:16] != _IHDR_START:
        return None
    width, height, depth, colour, compression, filter_method, interlace = _IHDR.unpack_from(data, 16)
    if depth != 8 or colour not in (_GRAY, _RGB) or compression or filter_method or interlace:
        return None
    if crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    channels = 1 if colour == _GRAY else 3
    if image_shape is None:
        if not 0 < width * height <= (Image.MAX_IMAGE_PIXELS or width * height):
            return None
    elif (height, width, channels) != image_shape:
        return None
    pieces = []
    position = 33
    while True:  # IDAT chunks, then IEND; any other chunk goes to Image.open
        if position + 8 > len(data):
            return None
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"IDAT":
            pieces.append(data[position + 8:position + 8 + length])
            position += 12 + length
        elif kind == b"IEND" and pieces:
            break
        else:
            return None
    if channels == 1:
        pixels = np.empty((height, width, 1), np.uint8)
        mode = rawmode = "L"
    else:  # Pillow keeps RGB as 4 bytes a pixel: decode into RGBX, hand back a view of RGB
        pixels = np.empty((height, width, 4), np.uint8)
        mode, rawmode = "RGBX", "RGB"
    image = Image.core.map_buffer(pixels, (width, height), "raw", 0, (mode, 0, 1))
    decoder = Image.core.zip_decoder(mode, rawmode, 0)
    try:
        decoder.setimage(image, (0, 0, width, height))
        consumed, error = decoder.decode(pieces[0] if len(pieces) == 1 else b"".join(pieces))
    finally:
        decoder.cleanup()
    if consumed >= 0 or error < 0:  # wants more data (truncated), or damaged
        return None
    return pixels if channels == 1 else pixels[:, :, :3]


def _fast_png_agrees() -> bool:
    """Whether this Pillow's decoder, called as plain_png_pixels calls it, gives what
    ``Image.open`` gives (the calls are Pillow's internals: a new version may change them)."""
    try:
        gradient = np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3) * 3
        for pixels in (gradient, gradient[:, :, 1]):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            fast = plain_png_pixels(buffer.getvalue(), None)
            if fast is None or not np.array_equal(fast.reshape(pixels.shape), pixels):
                return False
        return True
    except Exception:  # noqa: BLE001 - any failure means: use Image.open
        return False


_FAST_PNG = _fast_png_agrees()


def _check_size_before_decoding(size: tuple[int, int], image_shape: tuple[int, int, int] | None) -> None:
    """Refuses an image by its header, before its pixels cost memory: one of another size than
    the manifest's, or (without a manifest shape) one over PIL's decompression-bomb limit, which
    PIL itself only warns about below twice that."""
    width, height = size
    if image_shape is not None:
        if (height, width) != image_shape[:2]:
            raise DataError(f"image of {width}x{height} pixels, the manifest's are {image_shape[1]}x{image_shape[0]}; "
                            "not decoded")
    elif Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise DataError(f"image of {width}x{height} pixels, over PIL's decompression-bomb limit of "
                        f"{Image.MAX_IMAGE_PIXELS:,}; not decoded")


def failure_reason(exc: Exception, sample: dict[str, Any]) -> str:
    """Why a sample failed to decode, in words (PIL names its input as ``<_io.BytesIO object at
    0x...>``, which says nothing)."""
    if isinstance(exc, DataError):
        return str(exc)
    extension = next((ext for ext in (RAW_EXTENSION, *IMAGE_EXTENSIONS) if ext in sample), "?")
    size = len(sample.get(extension, b""))
    if isinstance(exc, UnidentifiedImageError):
        return f"the {size}-byte .{extension} member is not a readable image"
    message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))
    return f"the {size}-byte .{extension} member failed to decode ({type(exc).__name__}: {message})"
