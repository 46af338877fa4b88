"""Issue 17: the commands and calls people copy from mlx-lm and mlx-vlm work here unchanged."""

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pexpect
import pytest
import torch
from PIL import Image

import mlx_qwenvl
from mlx_qwenvl.chat import ChatSession
from mlx_qwenvl.cli import expand_multi_value
from mlx_qwenvl.generate import generate, make_cache, stream_tokens
from mlx_qwenvl.loading import load
from reference import STOP, reference_inputs

COMMAND = str(Path(sys.executable).parent / "mlx-qwenvl")


def run(*args, input=None, timeout=120):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (h, w) in enumerate([(84, 112), (112, 56), (56, 56)]):
        rng = np.random.default_rng(30 + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        paths.append(str(folder / f"p{i}.png"))
    return paths


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """4 s of video at 8 fps: 2 fps samples 8 frames, 1 fps samples 4."""
    from processor_fixtures import write_video

    rng = np.random.default_rng(40)
    frames = rng.integers(0, 256, (32, 56, 84, 3), dtype=np.uint8)
    return str(write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, 8))


def answer(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- CLI forms

def test_multi_value_flags_expand_until_the_next_option():
    args = ["--image", "a", "b", "--video", "v", "--image", "c", "-p", "q", "--prompt", "-"]
    assert expand_multi_value(args, ("--image", "--video")) == [
        "--image", "a", "--image", "b", "--video", "v", "--image", "c", "-p", "q", "--prompt", "-"]


def test_several_images_after_one_flag(tiny_model_dir, photos, loaded):
    model, processor = loaded
    expected = generate(model, processor, "Which picture has more shapes?", images=photos,
                        max_tokens=6, temperature=0.0).text + "\n"
    base = ["generate", "--model", str(tiny_model_dir), "--max-tokens", "6", "--temp", "0",
            "--prompt", "Which picture has more shapes?"]
    assert answer(run(*base, "--image", *photos)) == expected
    assert answer(run(*base[:3], "--image", photos[0], "--image", photos[1], photos[2], *base[3:])) == expected


def test_aliases_and_stdin_prompt(tiny_model_dir, loaded):
    model, processor = loaded
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name a colour"}]}]
    expected = generate(model, processor, messages, max_tokens=5, temperature=0.0).text + "\n"
    model_args = ["generate", "--model", str(tiny_model_dir)]
    assert answer(run(*model_args, "--system", "Be brief.", "--prompt", "Name a colour", "--max-tokens", "5",
                      "--temp", "0")) == expected
    assert answer(run(*model_args, "--system-prompt", "Be brief.", "-p", "Name a colour", "-m", "5",
                      "--temperature", "0")) == expected
    assert answer(run(*model_args, "--system-prompt", "Be brief.", "--prompt", "-", "-m", "5",
                      "--temperature", "0", input="Name a colour")) == expected


def test_stop_option(tiny_model_dir, loaded):
    model, processor = loaded
    full = generate(model, processor, "Tell me a story", max_tokens=12, temperature=0.0).text
    stop = full[4:6]
    expected = generate(model, processor, "Tell me a story", max_tokens=12, temperature=0.0, stop=[stop, "zzz"])
    assert expected.finish_reason == "stop" and stop not in expected.text
    out = answer(run("generate", "--model", str(tiny_model_dir), "-p", "Tell me a story", "-m", "12",
                     "--temp", "0", "--stop", stop, "--stop", "zzz"))
    assert out == expected.text + "\n"


def test_fps_and_video_max_frames(tiny_model_dir, video, loaded):
    model, processor = loaded
    counts = {}
    for options in ([], ["--fps", "1"], ["--video-max-frames", "4"]):
        out = answer(run("generate", "--model", str(tiny_model_dir), "--video", video, "-p", "What happens?",
                         "-m", "2", "--temp", "0", "--verbose", *options))
        counts[tuple(options)] = int(re.search(r"^Prompt: (\d+) tokens", out, re.M).group(1))
    # 8 frames at the folder's 2 fps are 4 s of video: 2 fps keeps 8, 1 fps and a 4-frame cap keep 4.
    for options, fps, most in (([], None, None), (["--fps", "1"], 1.0, None), (["--video-max-frames", "4"], None, 4)):
        inputs = processor("What happens?", videos=[video], video_fps=fps, video_max_frames=most)
        assert counts[tuple(options)] == inputs["input_ids"].shape[1]
    assert counts[("--fps", "1")] < counts[()] and counts[("--video-max-frames", "4")] < counts[()]


def test_verbose_prints_mlx_lm_statistics(tiny_model_dir, loaded):
    model, processor = loaded
    expected = generate(model, processor, "Hello", max_tokens=4, temperature=0.0)
    out = answer(run("generate", "--model", str(tiny_model_dir), "-p", "Hello", "-m", "4", "--temp", "0",
                     "--verbose"))
    pattern = (r"^==========\n(.*)\n==========\nPrompt: (\d+) tokens, [\d.]+ tokens-per-sec\n"
               r"Generation: (\d+) tokens, [\d.]+ tokens-per-sec\nPeak memory: [\d.]+ GB\n$")
    match = re.match(pattern, out, re.S)
    assert match, out
    assert match.group(1) == expected.text
    assert int(match.group(2)) == expected.prompt_tokens and int(match.group(3)) == expected.generation_tokens


def test_kv_cache_is_quantized_during_prefill(tmp_path):
    """As mlx-lm's prefill: the KV cache is quantized after the prefill chunk that takes it to
    quantized_kv_start tokens, not only once decoding starts (a long image prompt would
    otherwise peak at full precision)."""
    from processor_fixtures import make_model_dir
    from reference import make_reference, save_reference, tiny_config

    from mlx_lm.models.cache import QuantizedKVCache

    config = tiny_config(num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    folder = make_model_dir(save_reference(make_reference(config, seed=4), tmp_path / "m", config))
    model, processor = load(folder, dtype=mx.float32)
    inputs = processor("Tell me a long story about a red circle")
    cache, seen = make_cache(model), []

    def progress(done, total):
        if done < total:  # the prefill's chunks (the last call comes after the first decoding step)
            seen.append((done, isinstance(cache[0], QuantizedKVCache)))

    list(stream_tokens(model, processor, inputs, cache, max_tokens=2, temperature=0.0, kv_bits=8, kv_group_size=32,
                       quantized_kv_start=12, prefill_step_size=4, prompt_progress_callback=progress))
    chunks = [(done, quantized) for done, quantized in seen if done > 0]
    assert len(chunks) >= 5, seen
    assert all(quantized == (done >= 12) for done, quantized in chunks), chunks


def test_quantized_kv_start(tmp_path):
    from processor_fixtures import make_model_dir
    from reference import make_reference, save_reference, tiny_config

    from mlx_lm.models.cache import QuantizedKVCache

    config = tiny_config(num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    folder = make_model_dir(save_reference(make_reference(config, seed=4), tmp_path / "m", config))
    model, processor = load(folder, dtype=mx.float32)
    inputs = processor("Tell me a story")
    kv = dict(max_tokens=6, temperature=0.0, kv_bits=8, kv_group_size=32)
    caches = {}
    for start in (None, 0, 10):
        cache = make_cache(model)
        options = kv if start is None else dict(kv, quantized_kv_start=start)
        list(stream_tokens(model, processor, inputs, cache, **options))
        caches[start] = cache
    # mlx-lm's default (5000) leaves a short conversation unquantized; 0 quantizes at once;
    # 10 once the cache holds more than 10 tokens (the prompt alone does).
    assert not isinstance(caches[None][0], QuantizedKVCache)
    assert isinstance(caches[0][0], QuantizedKVCache) and isinstance(caches[10][0], QuantizedKVCache)
    plain = generate(model, processor, "Tell me a story", max_tokens=6, temperature=0.0)
    out = answer(run("generate", "--model", str(folder), "-p", "Tell me a story", "-m", "6", "--temp", "0",
                     "--kv-bits", "8", "--kv-group-size", "32"))
    assert out == plain.text + "\n"  # below --quantized-kv-start: the exact float cache
    out = answer(run("generate", "--model", str(folder), "-p", "Tell me a story", "-m", "6", "--temp", "0",
                     "--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"))
    quantized = generate(model, processor, "Tell me a story", max_tokens=6, temperature=0.0, kv_bits=8,
                         kv_group_size=32, quantized_kv_start=0)
    assert out == quantized.text + "\n"


def test_prefill_progress_in_a_terminal_only(tiny_model_dir, tmp_path):
    big = tmp_path / "big.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(big)
    args = ["generate", "--model", str(tiny_model_dir), "--image", str(big), "-p", "What is this?",
            "-m", "3", "--temp", "0", "--prefill-step-size", "512"]
    child = pexpect.spawn(COMMAND, args, encoding="utf-8", timeout=120)
    child.expect(r"prefill (\d+)/(\d+) tokens, \d+ tok/s")
    done, total = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < done < total and total > 2048
    child.expect(r"\r\x1b\[K")  # erased when the answer starts
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    piped = run(*args)
    assert piped.returncode == 0 and "prefill" not in piped.stderr and piped.stderr == ""


# ---- Python API

def test_mlx_vlm_call_forms(loaded, photos, capsys):
    model, processor = loaded
    ours = generate(model, processor, "What is this?", images=[photos[0]], max_tokens=5, temperature=0.0)
    theirs = generate(model, processor, "What is this?", image=photos[0], max_tokens=5, temp=0.0)
    assert theirs.tokens == ours.tokens
    # mlx-vlm users pass a prompt already rendered by the chat template.
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}])
    assert generate(model, processor, rendered, [photos[0]], max_tokens=5, temperature=0.0).tokens == ours.tokens
    capsys.readouterr()
    result = generate(model, processor, "What is this?", image=[photos[0]], max_tokens=5, temperature=0.0,
                      verbose=True)
    out = capsys.readouterr().out
    assert result.tokens == ours.tokens
    assert out.startswith("==========\n" + ours.text + "\n==========\nPrompt: ")
    assert re.search(r"^Generation: 5 tokens, [\d.]+ tokens-per-sec$", out, re.M)
    assert re.search(r"^Peak memory: [\d.]+ GB$", out, re.M)
    with pytest.raises(mlx_qwenvl.errors.InputError, match="either images= or image="):
        generate(model, processor, "Hi", images=[photos[0]], image=photos[0])


def test_package_exports():
    from mlx_qwenvl import GenerationResponse, GenerationResult, convert, generate as top  # noqa: F401

    assert top is generate and callable(convert)
    assert {"GenerationResponse", "GenerationResult", "convert", "load", "ChatSession"} <= set(mlx_qwenvl.__all__)


def test_logprobs_equal_the_reference_log_softmax(loaded, tiny_reference, photos):
    model, processor = loaded
    inputs = processor("Describe this picture.", images=[photos[0]])
    responses = list(stream_tokens(model, processor, inputs, make_cache(model), max_tokens=8, temperature=0.0))
    with torch.no_grad():
        out = tiny_reference[0].generate(**reference_inputs(inputs), max_new_tokens=8, do_sample=False,
                                         eos_token_id=STOP, pad_token_id=151643, output_logits=True,
                                         return_dict_in_generate=True)
    expected = [torch.log_softmax(step[0].double(), -1).cpu().numpy() for step in out.logits]
    assert [r.token for r in responses] == out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    for response, ref in zip(responses, expected):
        ours = np.array(response.logprobs, dtype=np.float64)
        assert ours.shape == ref.shape
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4
        assert response.from_draft is False


def test_cached_tokens_of_a_second_chat_turn(loaded, photos):
    model, processor = loaded
    session = ChatSession(model, processor)
    first = session.send("What is this?", images=[photos[0]], max_tokens=6, temperature=0.0)
    assert first.cached_tokens == 0
    held = len(session.tokens)
    assert held == first.prompt_tokens + first.generation_tokens
    second = session.send("And now?", max_tokens=4, temperature=0.0)
    assert second.cached_tokens == held


def test_prompt_progress_callback(loaded, photos):
    model, processor = loaded
    calls = []
    result = generate(model, processor, "What is this?", images=[photos[1]], max_tokens=2, temperature=0.0,
                      prefill_step_size=8, prompt_progress_callback=lambda done, total: calls.append((done, total)))
    total = result.prompt_tokens
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) >= total // 8 and all(t == total for _, t in calls)


# ---- what the CLI says about loading (issues 15 and 16)

def test_cli_notes_a_float32_that_does_not_fit():
    import os

    env = dict(os.environ, MLX_QWENVL_AVAILABLE_MEMORY=str(10**6))
    result = subprocess.run([COMMAND, "generate", "--model", "demo", "--image", "examples/images/red_circle.png",
                             "--prompt", "What color is the circle?"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout == "red\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"note: float32 needs about [\d.]+ GB of memory, only [\d.]+ GB is "
                                        r"available: keeping the checkpoint's 6-bit weights", lines[0]), result.stderr


def test_verbose_names_the_config_values_taken_from_defaults(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "sparse")
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "4.49.0"
    del config["vision_config"]["window_size"], config["vision_config"]["temporal_patch_size"]
    (folder / "config.json").write_text(json.dumps(config))
    result = run("generate", "--model", str(folder), "-p", "Hi", "-m", "1", "--verbose")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[config]")]
    assert lines == ["[config] not in config.json, defaults taken: vision_config.temporal_patch_size=2, "
                     "vision_config.window_size=112"] or lines == [
                     "[config] not in config.json, defaults taken: vision_config.window_size=112, "
                     "vision_config.temporal_patch_size=2"], result.stderr
    quiet = run("generate", "--model", str(folder), "-p", "Hi", "-m", "1")
    assert "[config]" not in quiet.stderr


def test_generation_runs_inside_mlx_lm_wired_limit(loaded, monkeypatch):
    """As mlx-lm's stream_generate: on a Mac the weights stay wired while tokens are produced,
    and a model near the recommended working set gets mlx-lm's warning (wired_limit's own)."""
    import contextlib

    generation = sys.modules["mlx_qwenvl.generate"]  # the package's ``generate`` is the function

    model, processor = loaded
    entered = []

    @contextlib.contextmanager
    def recording(target, streams=None):
        entered.append((target, streams))
        yield

    monkeypatch.setattr(generation, "wired_limit", recording)
    generate(model, processor, "Hi", max_tokens=2, temperature=0.0)
    assert len(entered) == 1 and entered[0][0] is model and entered[0][1]


# ---- what a new user tried (README trial)

def test_usage_errors_are_one_line_and_version(tiny_model_dir):
    for args, pattern in (
        (["generate", "--model", str(tiny_model_dir), "-p", "hi", "-m", "0"],
         r"^error: Invalid value for '--max-tokens' / '-m': 0 is not in the range x>=1\. \(see mlx-qwenvl generate --help\)$"),
        (["generate", "--model", str(tiny_model_dir), "--image", "-p", "hi"],
         r"^error: Option '--image' needs at least one value\."),
        (["generate", "--model", str(tiny_model_dir), "-p", "hi", "--video"],
         r"^error: Option '--video' needs at least one value\."),
        (["nonsense"], r"^error: No such command 'nonsense'"),
    ):
        result = run(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mlx-qwenvl {mlx_qwenvl.__version__}"


def test_verbose_takes_mlx_lm_true_false(tiny_model_dir):
    base = ["generate", "--model", str(tiny_model_dir), "-p", "Hi", "-m", "2", "--temp", "0"]
    quiet, loud = answer(run(*base, "--verbose", "False")), answer(run(*base, "--verbose", "True"))
    assert "Prompt:" not in quiet and loud.startswith("==========\n") and "Prompt:" in loud
    assert quiet == answer(run(*base))


def test_api_accepts_what_users_pass(loaded, photos, capsys):
    model, processor = loaded
    with pytest.raises(mlx_qwenvl.errors.InputError, match=r"seed \(--seed\) must be a whole number"):
        generate(model, processor, "Hi", max_tokens=2, seed=-1)
    with pytest.raises(TypeError, match="stream_generate\\(\\) got an unexpected keyword argument 'bogus'"):
        generate(model, processor, "Hi", max_tokens=2, bogus=1)
    # ChatSession takes one image as it is, and mlx-vlm's names, as generate does.
    expected = generate(model, processor, "What is this?", images=[photos[0]], max_tokens=4, temperature=0.0)
    for kwargs in (dict(images=photos[0]), dict(image=photos[0]), dict(images=[photos[0]])):
        session = ChatSession(model, processor)
        assert session.send("What is this?", max_tokens=4, temp=0.0, **kwargs).tokens == expected.tokens
    capsys.readouterr()
    ChatSession(model, processor).send("What is this?", images=photos[0], max_tokens=4, temperature=0.0,
                                       verbose=True)
    assert capsys.readouterr().out.startswith("==========\n" + expected.text + "\n==========\nPrompt: ")
    with pytest.raises(TypeError, match="stream\\(\\) got an unexpected keyword argument 'bogus'"):
        ChatSession(model, processor).send("Hi", bogus=2)


def test_load_takes_dtype_names(tiny_model_dir):
    model, _ = load(tiny_model_dir, dtype="float16")
    assert model.language_model.model.norm.weight.dtype == mx.float16
    with pytest.raises(mlx_qwenvl.errors.ModelLoadError, match="dtype 'float8' is not one of auto, checkpoint"):
        load(tiny_model_dir, dtype="float8")


def test_kv_group_size_follows_the_head_size(tmp_path, loaded):
    """kv_bits without a group size uses 64, or the largest size dividing the head size."""
    from processor_fixtures import make_model_dir
    from reference import make_reference, save_reference, tiny_config

    config = tiny_config(num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})  # head size 32
    folder = make_model_dir(save_reference(make_reference(config, seed=4), tmp_path / "m", config))
    model, processor = load(folder, dtype=mx.float32)
    options = dict(max_tokens=4, temperature=0.0, kv_bits=8, quantized_kv_start=0)
    assert (generate(model, processor, "Hi", **options).tokens
            == generate(model, processor, "Hi", kv_group_size=32, **options).tokens)
    with pytest.raises(mlx_qwenvl.errors.InputError, match="groups of kv_group_size \\(--kv-group-size\\) 64"):
        generate(model, processor, "Hi", kv_group_size=64, **options)
    tiny, tiny_processor = loaded  # head size 16: no group size fits
    with pytest.raises(mlx_qwenvl.errors.InputError, match="head size 16: this model cannot use a quantized"):
        generate(tiny, tiny_processor, "Hi", **options)


def test_a_picture_given_as_a_video(loaded, photos):
    model, processor = loaded
    with pytest.raises(mlx_qwenvl.errors.InputError, match=r"has 1 frame\(s\), a video needs at least 2"):
        generate(model, processor, "Hi", videos=[photos[0]], max_tokens=2)
