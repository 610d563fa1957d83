"""pipeline.data.sample_decode: the plain-PNG path gives what Image.open gives, bit for bit, and
is the one taken; every other image goes to Image.open; raw-pixel members are taken as they
are when they match the manifest and refused, unallocated, when they do not."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data import sample_decode
from pipeline.data.sample_decode import SampleDecoder, failure_reason, npy_header, plain_png_pixels
from pipeline.errors import DataError

RNG = np.random.default_rng(23)


def png(pixels: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def pil_pixels(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as picture:
        array = np.asarray(picture.convert(mode))
    return array[:, :, None] if array.ndim == 2 else array


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a PNG."""
    found, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        found.append((kind, data[position + 8:position + 8 + length]))
        position += 12 + length
    return found


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in parts)


def random_images():
    for height, width, channels in ((28, 28, 1), (32, 32, 3), (64, 64, 3), (1, 1, 1), (7, 300, 3)):
        noise = RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)
        smooth = np.broadcast_to((np.arange(width, dtype=np.uint8) * 3)[None, :, None], noise.shape).copy()
        for pixels in (noise, smooth):  # incompressible, and rows that PNG's filters predict well
            yield pixels


def test_the_fast_path_is_on_for_this_pillow():
    """The speed of the reader rests on it (issue 23): if this Pillow's internals changed, the
    check at import turns it off, and this says so."""
    assert sample_decode._FAST_PNG


@pytest.mark.parametrize("index", range(10))
def test_plain_png_gives_image_opens_pixels_and_is_the_path_taken(index, monkeypatch):
    pixels = list(random_images())[index]
    data = png(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    shape = pixels.shape
    fast = plain_png_pixels(data, shape)
    assert fast is not None and fast.shape == shape and fast.dtype == np.uint8
    assert np.array_equal(fast, pil_pixels(data, "L" if shape[2] == 1 else "RGB"))
    assert np.array_equal(fast, pixels)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("Image.open used for a plain PNG"))
    assert np.array_equal(SampleDecoder(shape, "png")({"png": data}), pixels)
    assert np.array_equal(SampleDecoder(None)({"png": data}), pixels)  # no manifest: the PNG's own channels


def test_idat_split_into_several_chunks():
    pixels = RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    parts = chunks(png(pixels))
    idat = b"".join(payload for kind, payload in parts if kind == b"IDAT")
    pieces = [(b"IDAT", idat[i:i + 100]) for i in range(0, len(idat), 100)]
    data = assemble([parts[0], *pieces, (b"IEND", b"")])
    assert np.array_equal(plain_png_pixels(data, (40, 40, 3)), pixels)


@pytest.mark.parametrize("kind", ["palette", "rgba", "16-bit", "interlaced", "text-chunk", "gray-as-rgb",
                                  "rgb-as-gray", "jpeg"])
def test_other_images_go_to_image_open_and_decode_as_before(kind):
    rgb = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = {
        "palette": lambda: _bytes(Image.fromarray(rgb).convert("P"), "PNG"),
        "rgba": lambda: png(np.dstack([rgb, rgb[:, :, :1]])),
        "16-bit": lambda: _bytes(Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)), "PNG"),
        "interlaced": lambda: adam7_png(rgb),
        "text-chunk": lambda: assemble([chunks(png(rgb))[0], (b"tEXt", b"Comment\x00hi"), *chunks(png(rgb))[1:]]),
        "gray-as-rgb": lambda: png(rgb[:, :, 0]),
        "rgb-as-gray": lambda: png(rgb),
        "jpeg": lambda: _bytes(Image.fromarray(rgb), "JPEG"),
    }[kind]()
    channels = 1 if kind in ("rgb-as-gray", "16-bit") else 3
    shape = (16, 16, channels)
    if kind != "jpeg":
        assert plain_png_pixels(data, shape) is None
    extension = "jpg" if kind == "jpeg" else "png"
    if kind == "interlaced":
        assert np.array_equal(pil_pixels(data, "RGB"), rgb)
    decoded = SampleDecoder(shape)({extension: data})
    assert np.array_equal(decoded, pil_pixels(data, "L" if channels == 1 else "RGB"))


def adam7_png(rgb: np.ndarray) -> bytes:
    """An interlaced RGB PNG (Pillow writes none): the seven Adam7 passes, rows unfiltered."""
    height, width, _ = rgb.shape
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            rows += b"".join(b"\0" + row.tobytes() for row in sub)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return assemble([(b"IHDR", header), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])


def _bytes(picture: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "bad-ihdr-crc", "zlib-garbage", "no-iend", "other-size"])
def test_damaged_pngs_are_left_to_image_open_which_says_why(damage):
    pixels = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    good = png(pixels)
    parts = chunks(good)
    data = {
        "truncated": good[:60],
        "bad-ihdr-crc": good[:29] + bytes([good[29] ^ 1]) + good[30:],
        "zlib-garbage": assemble([parts[0], (b"IDAT", b"\x78\x9c" + bytes(range(200))), (b"IEND", b"")]),
        "no-iend": good[:-12],
        "other-size": png(RNG.integers(0, 256, (30, 28), dtype=np.uint8)),
    }[damage]
    assert plain_png_pixels(data, (28, 28, 1)) is None
    sample = {"__key__": "k", "png": data}
    if damage == "no-iend":  # Image.open reads a PNG without its end marker: so does the reader
        assert np.array_equal(SampleDecoder((28, 28, 1))(sample)[:, :, 0], pixels)
        return
    with pytest.raises(Exception) as failure:
        SampleDecoder((28, 28, 1))(sample)
    reason = failure_reason(failure.value, sample)
    assert f"the {len(data)}-byte .png member" in reason or "manifest" in reason
    if damage == "truncated":
        assert "truncated" in reason
    if damage == "other-size":
        assert "28x30 pixels, the manifest's are 28x28; not decoded" in reason


def test_npy_header_is_what_np_save_writes():
    for shape in ((28, 28, 1), (32, 32, 3), (64, 64, 3), (218, 178, 3)):
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, np.uint8))
        assert buffer.getvalue() == npy_header(shape) + bytes(int(np.prod(shape)))


def test_raw_pixels_are_taken_as_they_are():
    pixels = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    member = npy_header(pixels.shape) + pixels.tobytes()
    assert np.array_equal(np.load(io.BytesIO(member)), pixels)  # any tool reads the member
    assert np.array_equal(SampleDecoder((28, 28, 1), "raw")({"npy": member}), pixels)
    assert np.array_equal(SampleDecoder(None)({"npy": member}), pixels)  # no manifest: the header says
    gray_2d = io.BytesIO()
    np.save(gray_2d, pixels[:, :, 0])  # written by another tool without the channel axis
    assert np.array_equal(SampleDecoder((28, 28, 1), "raw")({"npy": gray_2d.getvalue()}), pixels)


def test_points_stay_points():
    buffer = io.BytesIO()
    np.save(buffer, np.array([0.5, -1.25], np.float32))
    point = SampleDecoder(None)({"npy": buffer.getvalue()})
    assert point.dtype == np.float32 and point.tolist() == [0.5, -1.25]


@pytest.mark.parametrize("damage", ["short", "long", "other-shape", "other-dtype", "pickle", "huge-header"])
def test_raw_members_that_do_not_match_are_refused_before_an_array_is_made(damage):
    pixels = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    header = npy_header(pixels.shape)
    member = {
        "short": header + pixels.tobytes()[:-1],
        "long": header + pixels.tobytes() + b"\0",
        "other-shape": npy_header((28, 27, 1)) + bytes(28 * 27),
        "other-dtype": npy_header((28, 28, 1), np.int16) + bytes(28 * 28 * 2),
        "pickle": _saved(np.array([{"a": 1}], dtype=object)),
        # a header promising 10^12 bytes over a few hundred: refused from the header, nothing allocated
        "huge-header": npy_header((1_000_000, 1_000_000, 1)) + pixels.tobytes(),
    }[damage]
    # without a manifest another shape or dtype is no contradiction: only what breaks the format is
    manifest_only = damage in ("other-shape", "other-dtype")
    for decoder in (SampleDecoder((28, 28, 1), "raw"),) + (() if manifest_only else (SampleDecoder(None),)):
        with pytest.raises((DataError, ValueError)) as refused:
            decoder({"npy": member})
        reason = failure_reason(refused.value, {"npy": member})
        assert reason and "\n" not in reason
    if damage == "huge-header":
        assert "promises 1000000000000" in str(refused.value)


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_a_sample_without_an_image_says_what_it_has():
    with pytest.raises(DataError, match=r"no image .* or npy member, only \['cls', 'json'\]"):
        SampleDecoder((28, 28, 1))({"__key__": "k", "cls": b"1", "json": b"{}"})
