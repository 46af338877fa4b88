"""The installed ``mlx-qwenvl`` command, run as a user would: real subprocesses and a pseudo-terminal."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pexpect
import pytest
from PIL import Image

from mlx_qwenvl.generate import generate
from mlx_qwenvl.loading import load

COMMAND = str(Path(sys.executable).parent / "mlx-qwenvl")


def run(*args, timeout=120):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, pattern):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_streams_the_same_answer_as_the_api(tiny_model_dir, photo):
    result = run("generate", "--model", str(tiny_model_dir), "--image", str(photo),
                 "--prompt", "What is this?", "--max-tokens", "12", "--temp", "0", "--verbose")
    assert result.returncode == 0, result.stderr
    model, processor = load(tiny_model_dir)
    expected = generate(model, processor, "What is this?", images=[str(photo)], max_tokens=12,
                        temperature=0.0)
    # --verbose frames the answer and adds the statistics as mlx-lm prints them.
    assert result.stdout.startswith("==========\n" + expected.text + "\n==========\n")
    assert "[blas] OpenBLAS" in result.stderr
    assert f"Prompt: {expected.prompt_tokens} tokens, " in result.stdout
    assert f"Generation: {expected.generation_tokens} tokens, " in result.stdout


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "mlx_qwenvl", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("generate", "chat"))


def test_unknown_model_folder(tmp_path):
    assert_one_line_error(run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"),
                          r"model folder .*missing does not exist")


def test_folder_of_another_model_type(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    assert_one_line_error(run("generate", "--model", str(folder), "--prompt", "hi"),
                          r"model_type 'llama', not 'qwen2_5_vl'")


def test_missing_image(tiny_model_dir, tmp_path):
    result = run("generate", "--model", str(tiny_model_dir), "--image", str(tmp_path / "nope.jpg"),
                 "--prompt", "hi")
    assert_one_line_error(result, r"nope\.jpg")


def test_corrupt_image(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert_one_line_error(run("generate", "--model", str(tiny_model_dir), "--image", str(bad),
                              "--prompt", "hi"), r"bad\.png")


def test_prompt_over_the_context(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=40)))
    result = run("generate", "--model", str(folder), "--prompt", "word " * 60)
    assert_one_line_error(result, r"needs \d+ tokens of context but the model holds 40")


def test_debug_shows_the_traceback(tmp_path):
    result = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr


def default_sigint():
    """A shell that runs the tests in the background starts them with SIGINT ignored, and
    children inherit that: give the chat the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_chat_in_a_terminal(tiny_model_dir, photo, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2400, 2000), "white").save(big)
    child = pexpect.spawn(COMMAND, ["chat", "--model", str(tiny_model_dir), "--max-tokens", "400",
                                    "--temp", "0"], encoding="utf-8", timeout=90, preexec_fn=default_sigint)
    try:
        child.expect("Commands:")
        child.expect(">> ")
        child.sendline("Hello there")
        child.expect(r"\[prompt: \d+ tokens.*generation: \d+ tokens")  # stats after the answer
        child.expect(">> ")

        child.sendline(f"/image {big}")
        child.expect(r"note: .*big\.png becomes \d+ vision tokens; --max-pixels caps it")
        child.expect(">> ")
        child.sendline("/clear")  # forget the conversation and the large image
        child.expect(r"conversation cleared")
        child.expect(">> ")
        child.sendline(f"/image {photo}")
        child.expect(r"added .*photo\.png")
        child.expect(">> ")
        child.sendline("/image " + str(tmp_path / "missing.png"))
        child.expect(r"error: .*missing\.png")
        child.expect(">> ")

        child.sendline("Describe this image at length")
        child.expect("at length\r\n")  # the terminal's echo of the question
        child.expect(r"\S{5}")  # the answer has started streaming
        child.sendintr()  # Ctrl-C stops the answer, not the session
        child.expect(r"\(stopped\)")
        child.expect(">> ")

        child.sendline("Thanks")
        child.expect(r"\[prompt: (\d+) tokens")
        assert int(child.match.group(1)) < 40  # only the new turn was prefilled
        child.expect(">> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_exits_on_ctrl_d(tiny_model_dir):
    child = pexpect.spawn(COMMAND, ["chat", "--model", str(tiny_model_dir)], encoding="utf-8", timeout=60)
    child.expect(">> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_hub_id_offline_and_not_cached(tmp_path):
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([COMMAND, "generate", "--model", "someone/not-a-model", "--prompt", "hi"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(result, r"someone/not-a-model is neither a local folder nor in the hub cache")


def test_chat_survives_a_failed_turn(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=60)))
    child = pexpect.spawn(COMMAND, ["chat", "--model", str(folder), "--max-tokens", "4", "--temp", "0"],
                          encoding="utf-8", timeout=60)
    child.expect(">> ")
    child.sendline("word " * 80)  # over the 60-token context: this turn fails, the chat goes on
    child.expect(r"error: the prompt needs \d+ tokens of context but the model holds 60")
    child.expect(">> ")
    child.sendline("Hi")
    child.expect(r"\[prompt: \d+ tokens")
    child.expect(">> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_checks_its_options_before_the_first_question(tiny_model_dir):
    for args, pattern in ((["--temp", "-1"], r"temperature \(--temp\) must be 0"),
                          (["--kv-bits", "4"], r"head size 16: this model cannot use a quantized KV cache"),
                          (["--kv-bits", "4", "--max-kv-size", "64"], r"head size 16")):
        result = run("chat", "--model", str(tiny_model_dir), *args)
        assert_one_line_error(result, pattern)
