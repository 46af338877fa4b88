"""Package a trained demo checkpoint (tools/train_demo.py) for shipping.

1. Zero the embedding rows of tokens the demo never sees (the 151,936-row tied embedding is
   almost all of the model's size); the accuracy on held-out questions is printed before and
   after, so the step is checked rather than assumed.
2. Store that hub-layout checkpoint, gzip-compressed, under tests/assets/demo_checkpoint/: the
   reference the tests run transformers on.
3. Convert it with our own converter (6-bit language model, float16 vision tower) into
   mlx_qwenvl/demo_model/, which ``--model demo`` loads.
4. Write the README's demo picture.

    python tools/package_demo.py --checkpoint /tmp/demo-hf
"""

import argparse
import gzip
import itertools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from demo_tasks import COLORS, POSITIONS, SHAPES, Question, make_question, one_shape  # noqa: E402
from train_demo import evaluate, messages_for, write_folder_files  # noqa: E402

ASSET = ROOT / "tests" / "assets" / "demo_checkpoint"
PACKAGE = ROOT / "mlx_qwenvl" / "demo_model"
PICTURE = ROOT / "examples" / "images" / "red_circle.png"


def used_tokens(processor) -> set:
    """Every id a demo prompt or answer can contain: the template, all question texts, answers,
    and the special tokens."""
    tokenizer = processor.tokenizer
    ids = set(range(151643, 151665))
    rng = random.Random(0)
    texts = set()
    for _ in range(3000):
        question = make_question(rng)
        texts.add(question.text)
        texts.add(question.answer)
    texts |= set(COLORS) | set(SHAPES) | set(POSITIONS) | {"first", "second"} | set("12345")
    for text in texts:
        q = Question("any", text, "", [])
        ids |= set(tokenizer.encode(processor.apply_chat_template(messages_for(q))))
        ids |= set(tokenizer.encode(text))
    return ids


def zero_unused_rows(model, keep: set) -> None:
    import torch

    embedding = model.model.language_model.embed_tokens.weight
    mask = torch.ones(embedding.shape[0], dtype=torch.bool)
    mask[sorted(keep)] = False
    with torch.no_grad():
        embedding[mask] = 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    args = parser.parse_args()

    from transformers import Qwen2_5_VLForConditionalGeneration

    from demo_tasks import questions
    from mlx_qwenvl.convert import convert
    from mlx_qwenvl.processor import Processor

    processor = Processor.from_pretrained(args.checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.checkpoint).float().eval()
    held_out = questions(seed=777, count=250)
    print("before:", evaluate(model, processor, held_out))
    keep = used_tokens(processor)
    zero_unused_rows(model, keep)
    print(f"kept {len(keep)} embedding rows;", "after:", evaluate(model, processor, held_out))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "demo-hf"
        write_folder_files(folder)
        model.save_pretrained(folder)
        shutil.copy(args.checkpoint / "config.json", folder / "config.json")
        shutil.rmtree(ASSET, ignore_errors=True)
        ASSET.mkdir(parents=True)
        for file in folder.iterdir():
            if file.name == "model.safetensors":
                with open(file, "rb") as src, gzip.open(ASSET / "model.safetensors.gz", "wb", 9) as dst:
                    shutil.copyfileobj(src, dst)
            elif file.name in ("config.json", "generation_config.json", "preprocessor_config.json"):
                shutil.copy(file, ASSET / file.name)
        convert(folder, PACKAGE, dtype="float16", quantize=True, q_bits=6, q_group_size=64, force=True)

    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2024)
    while True:  # a clear, centred-ish red circle
        image = one_shape(rng, "circle", "red")
        if image.size[0] >= 200 and image.size[1] >= 160:
            break
    image.save(PICTURE)
    for path in (ASSET, PACKAGE):
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path.relative_to(ROOT)}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
