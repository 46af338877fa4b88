"""Videos: the qwen-vl-utils sampling rule on synthetic files, folders of frames, lists, patch rows, errors."""

import math

import numpy as np
import pytest
from PIL import Image
from processor_fixtures import (  # noqa: F401
    closed_port_url,
    http_folder,
    local_network,
    frame_index,
    index_frame,
    ref_sampling,
    ref_smart_nframes,
    ref_video_frame_size,
    ref_video_patches,
    random_image,
    textured_frame,
    write_frame_folder,
    write_video,
)

from mlx_qwenvl.errors import InputError
from mlx_qwenvl.image_processing import CLIP_MEAN, CLIP_STD, smart_resize
from mlx_qwenvl.video_processing import (
    fetch_video,
    frame_indices,
    frame_max_pixels,
    probe_video,
    process_videos,
    smart_nframes,
)

# (frame count, frame rate): short clips hit the 4-frame minimum, others the fps rule, odd
# counts and non-integer rates included.
VIDEOS = [(9, 30), (10, 25), (37, 12), (95, 30), (121, 30000 / 1001), (300, 24), (61, 60), (250, 5)]
SMALL = {"min_pixels": 3136}  # keep frames 56x56 so long clips stay cheap


@pytest.mark.parametrize("total,fps", VIDEOS)
def test_file_sampling_follows_qwen_vl_utils(tmp_path, total, fps):
    path = write_video(tmp_path / "clip.mp4", (index_frame(i) for i in range(total)), fps)
    frames, sample_fps = fetch_video(str(path), **SMALL)
    indices, expected_fps = ref_sampling(total, fps)
    assert [frame_index(f) for f in frames] == indices
    assert sample_fps == pytest.approx(expected_fps, rel=1e-9)
    size = ref_video_frame_size(48, 64, len(indices), min_pixels=3136)
    assert frames.shape == (len(indices), *size, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("options", [{"fps": 4.0}, {"fps": 0.5}, {"nframes": 7}, {"max_frames": 6}, {"min_frames": 9}])
def test_file_sampling_options(tmp_path, options):
    total, rate = 180, 24
    path = write_video(tmp_path / "clip.mp4", (index_frame(i) for i in range(total)), rate)
    frames, sample_fps = fetch_video(path, **SMALL, **options)
    indices, expected_fps = ref_sampling(total, rate, **options)
    assert [frame_index(f) for f in frames] == indices
    assert sample_fps == pytest.approx(expected_fps, rel=1e-9)


def test_smart_nframes_matches_the_rule_on_a_grid():
    for total in (2, 3, 4, 5, 8, 31, 100, 767, 768, 769, 1600, 100000):
        for rate in (1, 2, 7.5, 24, 29.97, 60, 240):
            for kwargs in ({}, {"fps": 1.0}, {"fps": 8.0}, {"max_frames": 64}, {"min_frames": 3}):
                assert smart_nframes(total, rate, **kwargs) == ref_smart_nframes(total, rate, **kwargs)
    assert smart_nframes(100000, 30) == 768  # the cap
    assert smart_nframes(10, 30) == 4  # the floor
    np.testing.assert_array_equal(frame_indices(95, 6), [0, 19, 38, 56, 75, 94])


def test_frame_pixel_budget_follows_the_rule():
    for n in (2, 4, 150, 300, 768):
        for height, width in ((48, 64), (720, 1280), (1080, 1920), (2160, 3840), (100, 2000)):
            from mlx_qwenvl.video_processing import video_frame_size

            assert video_frame_size(height, width, n) == ref_video_frame_size(height, width, n)
    assert frame_max_pixels(4) == 768 * 28 * 28
    assert frame_max_pixels(768) == 235200
    assert frame_max_pixels(768, max_pixels=50000) == 50000


def test_frame_size_default_budget(tmp_path):
    path = write_video(tmp_path / "clip.mp4", (textured_frame(i) for i in range(20)), 10)
    frames, _ = fetch_video(path)
    assert frames.shape[1:3] == ref_video_frame_size(48, 64, 4) == (280, 392)


@pytest.mark.parametrize("total,fps", [(95, 30), (40, 8)])
def test_folder_of_frames_equals_the_same_frames_in_a_file(tmp_path, total, fps):
    source = [textured_frame(i) for i in range(total)]
    path = write_video(tmp_path / "clip.mp4", source, fps)
    folder = write_frame_folder(tmp_path / "frames", source)
    from_file, fps_file = fetch_video(path)
    from_folder, fps_folder = fetch_video(folder, frame_rate=fps)
    np.testing.assert_array_equal(from_folder, from_file)
    assert fps_folder == pytest.approx(fps_file, rel=1e-12)


def test_folder_is_read_in_natural_order_and_defaults_to_frames_at_2_fps(tmp_path):
    folder = write_frame_folder(tmp_path / "frames", [index_frame(i) for i in range(12)])
    (folder / "notes.txt").write_text("ignored")
    frames, sample_fps = fetch_video(str(folder), **SMALL)
    assert [frame_index(f) for f in frames] == list(range(12))  # frame_10 after frame_9
    assert sample_fps == 2.0


def test_list_of_images_uses_the_image_path_and_pads_to_even():
    images = [random_image(300, 500, seed=i) for i in range(3)]
    frames, sample_fps = fetch_video(images)
    assert sample_fps == 2.0
    assert frames.shape == (4, *smart_resize(300, 500), 3)
    np.testing.assert_array_equal(frames[3], frames[2])
    np.testing.assert_array_equal(frames[0], np.asarray(images[0].resize((504, 308), Image.BICUBIC)))
    _, fps = fetch_video(images, fps=1.5)
    assert fps == 1.5
    frames, _ = fetch_video(images, max_pixels=28 * 28 * 16)
    assert frames.shape[1] * frames.shape[2] <= 28 * 28 * 16


def test_list_with_a_frame_rate_is_sampled_like_a_file(tmp_path):
    source = [index_frame(i) for i in range(50)]
    frames, sample_fps = fetch_video(np.stack(source), frame_rate=25, **SMALL)
    indices, expected_fps = ref_sampling(50, 25)
    assert [frame_index(f) for f in frames] == indices
    assert sample_fps == pytest.approx(expected_fps)


def test_patch_rows_follow_the_reference_layout():
    rng = np.random.default_rng(5)
    videos = [rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8), rng.integers(0, 256, (3, 28, 56, 3), dtype=np.uint8)]
    pixel_values, grid = process_videos(videos)
    np.testing.assert_array_equal(grid, [[2, 4, 6], [2, 2, 4]])
    expected = []
    for video in videos:
        x = (video.astype(np.float64) / 255).astype(np.float32)
        x = ((x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(0, 3, 1, 2)
        if len(x) % 2:
            x = np.concatenate([x, x[-1:]])
        expected.append(ref_video_patches(x))
    np.testing.assert_allclose(pixel_values, np.concatenate(expected), rtol=0, atol=1e-6)


def test_video_url_is_downloaded(http_folder, tmp_path):
    folder, url = http_folder
    source = [index_frame(i) for i in range(20)]
    path = write_video(folder / "clip.mp4", source, 10)
    frames, sample_fps = fetch_video(f"{url}/{path.name}", **SMALL)
    local, local_fps = fetch_video(path, **SMALL)
    np.testing.assert_array_equal(frames, local)
    assert sample_fps == local_fps
    assert probe_video(f"{url}/{path.name}") == (20, pytest.approx(10.0))
    with pytest.raises(InputError, match=r"gone\.mp4.*HTTP error 404"):
        fetch_video(f"{url}/gone.mp4")


def test_probe_and_errors(tmp_path, local_network):
    path = write_video(tmp_path / "clip.mp4", (index_frame(i) for i in range(6)), 3)
    assert probe_video(path) == (6, pytest.approx(3.0))
    one = write_video(tmp_path / "one.mp4", [index_frame(0)], 3)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    (tmp_path / "blank").mkdir()
    cases = [
        (tmp_path / "missing.mp4", r"missing\.mp4.*file not found"),
        (text, r"notes\.mp4.*not a readable video"),
        (empty, r"empty\.mp4.*empty \(0 bytes\)"),
        (tmp_path / "blank", r"blank.*no frame images"),
        ([], r"has no frames"),
        (closed_port_url("clip.mp4"), r"clip\.mp4.*unreachable"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message):
            fetch_video(source)
        with pytest.raises(InputError, match=message):
            probe_video(source)
    with pytest.raises(InputError, match=r"one\.mp4.*has 1 frame\(s\), a video needs at least 2"):
        fetch_video(one)
    with pytest.raises(InputError, match="frames resize to different sizes"):
        fetch_video([random_image(100, 100), random_image(200, 500)])
    assert math.isclose(fetch_video(path, **SMALL)[1], 4 / 6 * 3)
