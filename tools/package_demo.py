"""Package a trained demo checkpoint (tools/train_demo.py) for shipping.

1. Zero the embedding rows of tokens the demo never sees (the 151,936-row tied embedding is
   almost all of the model's size; training already keeps them zero, this checks it).
2. Convert it with our own converter (6-bit language model, float16 vision tower) into
   mlx_qwenvl/demo_model/, which ``--model demo`` loads.
3. Write the released hub-layout checkpoint, gzip-compressed, to tests/assets/demo_checkpoint/:
   the trained weights with exactly the values the shipped folder holds (float16-rounded, and
   the 6-bit layers dequantized), as a quantization-aware release would. The reference
   (transformers) and the port then run the same numbers, so the tests compare the port, not
   the rounding. Accuracy on held-out questions is printed at each step, and the port on the
   shipped folder is checked against the port on the released checkpoint.
4. Write the README's demo pictures (examples/images).

    python tools/package_demo.py --checkpoint /tmp/demo-hf
"""

import argparse
import gzip
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from demo_tasks import many_shapes, one_shape  # noqa: E402
from train_demo import evaluate, messages_for, used_tokens, write_folder_files  # noqa: E402

ASSET = ROOT / "tests" / "assets" / "demo_checkpoint"
PACKAGE = ROOT / "mlx_qwenvl" / "demo_model"
PICTURES = ROOT / "examples" / "images"


def zero_unused_rows(model, keep: set) -> None:
    import torch

    embedding = model.model.language_model.embed_tokens.weight
    mask = torch.ones(embedding.shape[0], dtype=torch.bool)
    mask[sorted(keep)] = False
    with torch.no_grad():
        embedding[mask] = 0.0


BITS, GROUP = 6, 64
MODEL_CARD = """# The mlx-qwenvl demo model

A tiny Qwen2.5-VL (the real architecture, tokenizer and chat template; a 4-block vision tower
and a 3-layer decoder) trained by tools/train_demo.py on synthetic pictures of circles, squares
and triangles, to answer one-word questions about their colour, shape, number and position.
It knows nothing else. Converted by tools/package_demo.py: 6-bit language model (group size 64),
float16 vision tower. `mlx-qwenvl generate --model demo ...` loads it.
"""


def shipped_values(state: dict, package: Path) -> dict:
    """``state`` (transformers names) with the values the converted folder holds, as the port
    computes with them on a CPU: float16 for every tensor, and each quantized layer dequantized
    from its float32-cast scales and biases, as load() does."""
    import mlx.core as mx
    import numpy as np
    import torch

    stored = {}
    for file in package.glob("*.safetensors"):
        stored.update(mx.load(str(file)))
    values = {name: tensor.half().float() for name, tensor in state.items()}
    for name in stored:
        if not name.endswith(".scales"):
            continue
        base = name[: -len(".scales")]
        weight = mx.dequantize(stored[base + ".weight"], stored[name].astype(mx.float32),
                               stored[base + ".biases"].astype(mx.float32), group_size=GROUP, bits=BITS)
        target = "model.language_model." + base.removeprefix("language_model.model.") + ".weight"
        values[target] = torch.from_numpy(np.array(weight))
    values["lm_head.weight"] = values["model.language_model.embed_tokens.weight"]
    return values


def check_port(release: Path, sample) -> None:
    """The port on the shipped folder and on the released checkpoint: the same logits."""
    import mlx.core as mx
    import numpy as np

    from mlx_qwenvl import load

    (shipped, processor), (released, _) = load(PACKAGE), load(release)
    worst = 0.0
    for question in sample:
        inputs = processor(messages_for(question))
        a, b = (np.array(model(mx.array(inputs["input_ids"]), pixel_values=mx.array(inputs["pixel_values"]),
                                 image_grid_thw=mx.array(inputs["image_grid_thw"]))) for model in (shipped, released))
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"port: shipped folder vs released checkpoint, largest logit difference {worst:.2e}")
    assert worst < 1e-4, worst


def write_pictures() -> None:
    """The README's demo pictures: one per kind of question, drawn by the training's own generator."""
    PICTURES.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2024)
    while True:  # a clear, centred-ish red circle
        image = one_shape(rng, "circle", "red")
        if image.size[0] >= 200 and image.size[1] >= 160:
            break
    image.save(PICTURES / "red_circle.png")
    many_shapes(rng, "circle", 3).save(PICTURES / "three_circles.png")
    one_shape(rng, "square", "green", "left").save(PICTURES / "green_square_left.png")


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
        trained, release = Path(tmp) / "trained", Path(tmp) / "release"
        for folder in (trained, release):
            write_folder_files(folder)
        model.save_pretrained(trained)
        shutil.copy(args.checkpoint / "config.json", trained / "config.json")
        convert(trained, PACKAGE, dtype="float16", quantize=True, q_bits=BITS, q_group_size=GROUP, force=True)
        (PACKAGE / "README.md").write_text(MODEL_CARD)

        model.load_state_dict(shipped_values(model.state_dict(), PACKAGE))
        print("released (shipped values):", evaluate(model, processor, held_out))
        model.save_pretrained(release)
        shutil.copy(args.checkpoint / "config.json", release / "config.json")
        check_port(release, held_out[:10])
        shutil.rmtree(ASSET, ignore_errors=True)
        ASSET.mkdir(parents=True)
        with open(release / "model.safetensors", "rb") as src, \
                gzip.GzipFile(ASSET / "model.safetensors.gz", "wb", 9, mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
            shutil.copy(release / name, ASSET / name)

    write_pictures()
    for path in (ASSET, PACKAGE):
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path.relative_to(ROOT)}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
