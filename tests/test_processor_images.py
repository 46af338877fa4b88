"""Images: pixel parity with transformers' Pillow path, smart_resize, sources, mode policy, bad inputs."""

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processor_fixtures import closed_port_url, http_folder, local_network, random_image, ref_smart_resize  # noqa: F401

from mlx_qwenvl.errors import InputError
from mlx_qwenvl.image_processing import (
    MAX_PIXELS,
    MIN_PIXELS,
    image_token_count,
    load_image,
    process_images,
    smart_resize,
)

HUB = (MIN_PIXELS, MAX_PIXELS)
# (height, width, min_pixels, max_pixels): sides under 14 px, multiples of 28, aspect exactly 200,
# images above max_pixels, odd sizes, an upscale by min_pixels.
PARITY_CASES = [
    (1, 1, *HUB),
    (5, 1000, *HUB),
    (10, 1000, *HUB),
    (13, 2000, *HUB),
    (13, 13, *HUB),
    (20, 20, *HUB),
    (28, 28, *HUB),
    (56, 56, *HUB),
    (70, 70, *HUB),
    (84, 140, *HUB),
    (280, 560, *HUB),
    (28, 5600, *HUB),
    (5600, 28, *HUB),
    (14, 2800, *HUB),
    (1, 200, *HUB),
    (300, 500, *HUB),
    (480, 640, *HUB),
    (333, 517, *HUB),
    (1001, 777, *HUB),
    (1080, 1920, 3136, 1003520),
    (2000, 3000, 3136, 200704),
    (1500, 4500, 3136, 100352),
    (97, 1, *HUB),
    (100, 100, 200704, 12845056),
    (641, 479, 3136, 50000),
]


@pytest.fixture(scope="module")
def reference_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cache = {}

    def get(min_pixels, max_pixels):
        key = (min_pixels, max_pixels)
        if key not in cache:
            cache[key] = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        return cache[key]

    return get


@pytest.mark.parametrize("height,width,min_pixels,max_pixels", PARITY_CASES)
def test_pixel_values_match_transformers_pil_path(reference_image_processor, height, width, min_pixels, max_pixels):
    image = random_image(height, width)
    expected = reference_image_processor(min_pixels, max_pixels)([image], return_tensors="np")
    pixel_values, grid = process_images([image], min_pixels, max_pixels)
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    assert pixel_values.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


def test_several_images_concatenate_in_order(reference_image_processor):
    images = [random_image(300, 500), random_image(56, 84, seed=1), random_image(1000, 30, seed=2)]
    expected = reference_image_processor(*HUB)(images, return_tensors="np")
    pixel_values, grid = process_images(images, *HUB)
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width", [(1, 201), (28, 5628), (5629, 28), (3, 1000)])
def test_aspect_ratio_above_200_raises_a_clear_error(height, width):
    with pytest.raises(InputError, match=r"aspect ratio .* above the limit of 200"):
        smart_resize(height, width)
    with pytest.raises(InputError, match=f"{height}x{width}"):
        process_images([random_image(height, width)])


@pytest.mark.parametrize(
    "size,expected",
    [
        ((20, 20), (56, 56)), ((1, 1), (56, 56)), ((70, 70), (56, 56)), ((480, 640), (476, 644)),
        ((300, 500), (308, 504)), ((1080, 1920), (1092, 1932)), ((4000, 6000), (2912, 4368)),
        ((27, 5400), (28, 5404)), ((10, 1000), (28, 560)), ((13, 2000), (28, 700)),
    ],
)
def test_smart_resize_known_values(size, expected):
    """REFERENCE.md 4.1 values (hub min/max), including banker's rounding (70 -> 56) and sides under 14 px."""
    assert smart_resize(*size) == expected
    assert ref_smart_resize(*size) == expected


def test_smart_resize_agrees_with_reference_on_many_sizes():
    rng = np.random.default_rng(3)
    for height, width in rng.integers(1, 5000, (400, 2)).tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        for bounds in (HUB, (3136, 1003520), (200704, 401408)):
            assert smart_resize(height, width, 28, *bounds) == ref_smart_resize(height, width, 28, *bounds)


def test_image_token_count():
    assert image_token_count(480, 640) == 391
    assert image_token_count(300, 500) == 198
    assert image_token_count(1080, 1920) == 2691
    assert image_token_count(1080, 1920, max_pixels=1003520) == 1222
    assert image_token_count(10, 10) == 4
    assert image_token_count(100000, 100000) <= 16384


# --------------------------------------------------------------------------------------------
# Sources


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_every_source_kind_gives_the_same_pixels(tmp_path):
    image = random_image(40, 60)
    data = _png_bytes(image)
    path = tmp_path / "a b.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [
        str(path), path, f"file://{path}", "file://" + str(path).replace(" ", "%20"),
        f"data:image/png;base64,{b64}", b64, data, bytearray(data), io.BytesIO(data),
        image, np.asarray(image), np.asarray(image).transpose(2, 0, 1),
    ]
    expected = np.asarray(image)
    for source in sources:
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_http_url_is_downloaded(http_folder):
    folder, url = http_folder
    (folder / "x.png").write_bytes(_png_bytes(random_image(30, 31)))
    np.testing.assert_array_equal(np.asarray(load_image(f"{url}/x.png")), np.asarray(random_image(30, 31)))
    with pytest.raises(InputError, match=r"missing\.png.*HTTP error 404"):
        load_image(f"{url}/missing.png")


# --------------------------------------------------------------------------------------------
# Mode policy


def test_exif_orientation_is_applied(tmp_path):
    image = random_image(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # width, height swapped
    with Image.open(path) as opened:
        assert load_image(opened).size == (20, 40)  # PIL objects get the same policy


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_on_white(mode):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    image = Image.fromarray(rgba)
    image = image.convert(mode) if mode != "PA" else image.convert("RGBA").convert("PA")
    out = np.asarray(load_image(image))
    assert (out[4:] == 255).all()
    assert (out[:4] != 255).any()


def test_palette_with_transparency_and_array_alpha_are_composited():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    assert (np.asarray(load_image(palette)) == 255).all()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), np.full((4, 4, 3), 127, np.uint8))


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    out = np.asarray(load_image(path)).astype(float)
    assert abs(out.mean() - 127.5) < 1.5  # not ~254 as convert("RGB") would give
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(np.asarray(load_image(ramp)), np.asarray(load_image(path)))


def test_float_and_int32_images_are_scaled():
    unit = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    out = np.asarray(load_image(Image.fromarray(unit)))  # mode F in [0, 1]
    assert out.max() == 255 and abs(out.mean() - 127.5) < 1
    np.testing.assert_array_equal(np.asarray(load_image(unit)), out)
    np.testing.assert_array_equal(np.asarray(load_image(unit.astype(np.float64) * 255)), out)
    wide = Image.fromarray(np.full((4, 4), 1000, dtype=np.int32))  # mode I, a 16-bit-range value
    assert (np.asarray(load_image(wide)) == 4).all()
    small = Image.fromarray(np.full((4, 4), 100, dtype=np.int32))  # mode I holding 8-bit values
    assert (np.asarray(load_image(small)) == 100).all()


def test_grayscale_palette_cmyk_and_bilevel_are_converted():
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    out = np.asarray(load_image(gray))
    assert out.shape == (4, 4, 3) and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(out[..., 1], np.asarray(gray))
    np.testing.assert_array_equal(np.asarray(load_image(np.asarray(gray))), out)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    np.testing.assert_array_equal(np.asarray(load_image(cmyk))[0, 0], [255, 0, 0])
    palette = random_image(8, 8).convert("P")
    np.testing.assert_array_equal(np.asarray(load_image(palette)), np.asarray(palette.convert("RGB")))
    assert load_image(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Bad inputs: one exception type, the input named, the problem said


def _bomb_png(width=30000, height=30000) -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_image_inputs(tmp_path, local_network):
    missing = tmp_path / "nope.png"
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(random_image(64, 64))[:300])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    cases = [
        (str(missing), r"nope\.png.*file not found"),
        (text, r"notes\.png.*not a recognized image"),
        (empty, r"empty\.png.*empty \(0 bytes\)"),
        (b"", r"bytes \(0 bytes\).*empty"),
        (truncated, r"truncated\.png.*(corrupt|truncated)"),
        (bomb, r"bomb\.png.*decompression bomb"),
        (closed_port_url("x.png"), r"127\.0\.0\.1:\d+/x\.png.*unreachable"),
        ("A" * 64, r"neither an existing file nor base64 image data"),
        ("photos/holiday/2024/IMG_0001.jpg", r"IMG_0001\.jpg.*file not found"),
        (tmp_path, r"is a directory"),
        ("data:image/png;base64,!!!!", r"data URI.*invalid base64"),
        (np.zeros((5, 5, 7), np.uint8), r"array \(shape \(5, 5, 7\).*1-4 channels"),
        (12345, r"int object.*unsupported image source"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message):
            load_image(source)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)
    with pytest.raises(ValueError):
        smart_resize(1, 500)


def test_source_path_object_and_str_name_the_file(tmp_path):
    with pytest.raises(InputError) as info:
        load_image(Path(tmp_path / "x" / "y.jpg"))
    assert "y.jpg" in str(info.value) and "\n" not in str(info.value)
