"""Reading every image right (mtl_core/data/images.py): EXIF orientation, 16-bit and float scaling, each
8-bit mode; and ingest + preprocess using exactly that reading. Expected pixels are written by hand."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.config import config_from_dict
from mtl_core.data.images import ImageError, decode
from mtl_core.stages.ingest import run_ingest
from mtl_core.stages.preprocess import run_preprocess
from mtl_core.paths import SPLITS, ProjectPaths

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants() -> np.ndarray:
    """16 x 32 stored pixels: red | green over blue | yellow, so every flip and turn is told apart."""
    s = np.zeros((16, 32, 3), np.uint8)
    s[:8, :16], s[:8, 16:], s[8:, :16], s[8:, 16:] = RED, GREEN, BLUE, YELLOW
    return s


S = quadrants()
# What a viewer shows for each EXIF orientation (the EXIF 2.3 definitions, in numpy)
DISPLAYED = {
    1: S,
    2: S[:, ::-1],  # mirrored left-right
    3: S[::-1, ::-1],  # turned 180
    4: S[::-1],  # mirrored top-bottom
    5: S.transpose(1, 0, 2),  # mirrored about the main diagonal
    6: np.rot90(S, -1),  # turned 90 clockwise: the phone held upright
    7: S[::-1, ::-1].transpose(1, 0, 2),  # mirrored about the other diagonal
    8: np.rot90(S, 1),  # turned 90 counter-clockwise
}


def encoded(im: Image.Image, fmt: str, orientation: int | None = None, **kw) -> bytes:
    if orientation is not None:
        exif = im.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_a_jpeg(orientation: int):
    data = encoded(Image.fromarray(S), "JPEG", orientation, quality=100, subsampling=0)
    rgb, info = decode(data)
    expected = DISPLAYED[orientation]
    assert rgb.shape == expected.shape and info.orientation == orientation
    assert (info.width, info.height) == (expected.shape[1], expected.shape[0])
    assert np.abs(rgb.astype(int) - expected).max() <= 3  # JPEG rounding only
    assert info.mode == "RGB" and info.value_range is None


def test_16_bit_png_is_scaled_by_its_range_not_clipped():
    values = np.array([[1000, 3000], [5000, 2000]], dtype=np.uint16)
    rgb, info = decode(encoded(Image.fromarray(values), "PNG"))
    assert info.mode == "I;16" and info.value_range == (1000.0, 5000.0)
    # (v - 1000) * 255 / 4000: 0, 127.5 -> 128 (round half to even), 255, 63.75 -> 64
    expected = np.array([[0, 128], [255, 64]], np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))
    # the old reading: Pillow's convert("RGB") clips everything above 255 to white
    assert (np.asarray(Image.fromarray(values).convert("RGB")) == 255).all()


def test_16_bit_big_endian_and_32_bit_integer_and_float_images():
    be = Image.frombytes("I;16B", (3, 1), np.array([[0, 300, 600]], ">u2").tobytes())
    rgb, info = decode(encoded(be, "TIFF"))
    assert info.mode in ("I;16B", "I;16")  # TIFF may store it little-endian
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])  # 127.5 -> 128
    i32 = Image.fromarray(np.array([[-70000, 0, 70000]], np.int32))
    rgb, info = decode(encoded(i32, "TIFF"))
    assert info.mode == "I" and info.value_range == (-70000.0, 70000.0)
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 128, 255])
    f = Image.fromarray(np.array([[0.25, 0.5, 1.25]], np.float32))
    rgb, info = decode(encoded(f, "TIFF"))
    assert info.mode == "F" and info.value_range == (0.25, 1.25)
    np.testing.assert_array_equal(rgb[0, :, 2], [0, 64, 255])  # (0.25 / 1) * 255 = 63.75 -> 64


def test_images_that_cannot_be_scaled_faithfully_are_refused_with_the_reason():
    flat = Image.fromarray(np.full((4, 4), 700, np.uint16))
    with pytest.raises(ImageError, match=r"cannot scale to 8 bits: I;16 image with the single value 700 in every pixel"):
        decode(encoded(flat, "PNG"))
    nan = Image.fromarray(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32))
    with pytest.raises(ImageError, match=r"cannot scale to 8 bits: F image with 1 NaN or infinite pixel\(s\)"):
        decode(encoded(nan, "TIFF"))
    with pytest.raises(ImageError, match=r"image does not decode: not an image format"):
        decode(b"GIF89a but not really")


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("L", lambda: Image.fromarray(np.array([[0, 90, 255]], np.uint8)), [[0] * 3, [90] * 3, [255] * 3]),
        ("1", lambda: Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1"), [[0] * 3, [255] * 3, [0] * 3]),
        ("RGBA", lambda: Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255], [1, 2, 3, 128]]], np.uint8)),
         [[10, 20, 30], [40, 50, 60], [1, 2, 3]]),  # alpha dropped, colours kept
        ("LA", lambda: Image.fromarray(np.array([[[7, 0], [8, 255], [9, 9]]], np.uint8), mode="LA"), [[7] * 3, [8] * 3, [9] * 3]),
        ("P", lambda: _palette(), [[255, 0, 0], [0, 0, 255], [255, 0, 0]]),
    ],  # fmt: skip
)
def test_8_bit_modes_become_rgb(mode: str, make, expected):
    rgb, info = decode(encoded(make(), "PNG"))
    assert info.mode == mode and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], expected)


def _palette() -> Image.Image:
    im = Image.fromarray(np.array([[0, 1, 0]], np.uint8), mode="P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return im


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan/key, full magenta + yellow: red
    rgb, info = decode(encoded(cmyk, "JPEG", quality=100))
    assert info.mode == "CMYK"
    assert np.abs(rgb.astype(int) - RED).max() <= 3


def test_ingest_and_preprocess_read_orientation_and_depth_as_decode_does(tmp_path: Path):
    """A phone JPEG turned by EXIF, a 16-bit scan and a flat 16-bit image through both stages."""
    folder = tmp_path / "data" / "datasets" / "scans"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append((f"{i}.png", "ab"[i % 2]))
    (folder / "phone.jpg").write_bytes(encoded(Image.fromarray(S), "JPEG", 6, quality=100, subsampling=0))
    ramp = (np.arange(16 * 32, dtype=np.uint16).reshape(16, 32) * 100 + 4000)  # 4000..55100
    Image.fromarray(ramp).save(folder / "scan.png")
    Image.fromarray(np.full((8, 8), 9, np.uint16)).save(folder / "flat.png")
    rows += [("phone.jpg", "a"), ("scan.png", "b"), ("flat.png", "a")]
    pd.DataFrame(rows, columns=["path", "kind"]).to_csv(folder / "labels.csv", index=False)
    cfg = config_from_dict({
        "data": {"source": str(folder / "labels.csv"), "max_rejected_fraction": 0.1},
        "preprocess": {"image_size": 16, "augment": []},
    })  # fmt: skip
    result = run_ingest(cfg, tmp_path)
    rejected = pd.read_csv(result.rejected)
    assert rejected[["row", "path"]].values.tolist() == [[34, "flat.png"]]
    assert rejected.loc[0, "reason"] == "cannot scale to 8 bits: I;16 image with the single value 9 in every pixel (no range)"
    report = json.loads(result.report.read_text())
    assert report["images"] == {"modes": {"I;16": 1, "RGB": 31}, "exif_oriented": 1, "scaled_to_8bit": 1}

    run_preprocess(cfg, tmp_path)
    paths = ProjectPaths(tmp_path)
    manifest = pd.read_csv(paths.manifest)
    cached = {}
    for s in SPLITS:
        images = np.load(paths.images_cache(s))
        for k, p in enumerate(manifest.loc[manifest["split"] == s, "path"]):
            cached[Path(p).name] = images[k]
    phone = cached["phone.jpg"].astype(int)  # 32 x 16 displayed, squeezed to 16 x 16: turned clockwise
    assert np.abs(phone[2, 2] - BLUE).max() <= 8 and np.abs(phone[2, 13] - RED).max() <= 8
    assert np.abs(phone[13, 2] - YELLOW).max() <= 8 and np.abs(phone[13, 13] - GREEN).max() <= 8
    scan = cached["scan.png"]  # a ramp over its full range: dark top-left, bright bottom-right, not white
    assert scan[0, 0, 0] < 20 and scan[-1, -1, 0] > 235 and 100 < scan.mean() < 155
