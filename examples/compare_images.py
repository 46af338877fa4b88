"""Compare two images.  python examples/compare_images.py --model MODEL before.jpg after.jpg"""

import argparse

from mlx_qwenvl import load, stream_generate

parser = argparse.ArgumentParser()
parser.add_argument("first")
parser.add_argument("second")
parser.add_argument("--model", default="mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
args = parser.parse_args()

model, processor = load(args.model)
messages = [{"role": "user", "content": [
    {"type": "image", "image": args.first},
    {"type": "image", "image": args.second},
    {"type": "text", "text": "What are the differences between these two pictures?"},
]}]
for piece in stream_generate(model, processor, messages, max_tokens=300, max_pixels=602112):
    print(piece.text, end="", flush=True)
print()
