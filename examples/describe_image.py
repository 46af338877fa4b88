"""Describe an image.  python examples/describe_image.py --model MODEL photo.jpg"""

import argparse

from mlx_qwenvl import generate, load

parser = argparse.ArgumentParser()
parser.add_argument("image")
parser.add_argument("--model", default="mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
parser.add_argument("--max-pixels", type=int, default=1003520, help="caps the vision tokens")
args = parser.parse_args()

model, processor = load(args.model)
result = generate(model, processor, "Describe this image in detail.", images=[args.image],
                  max_tokens=300, max_pixels=args.max_pixels)
print(result.text)
print(f"\n[{result.prompt_tokens} prompt tokens, {result.generation_tps:.1f} tokens/s]")
