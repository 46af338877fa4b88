"""A multi-turn conversation about an image: later turns reuse the KV cache.

python examples/multi_turn_chat.py --model MODEL photo.jpg
"""

import argparse

from mlx_qwenvl import ChatSession, load

parser = argparse.ArgumentParser()
parser.add_argument("image")
parser.add_argument("--model", default="mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
args = parser.parse_args()

model, processor = load(args.model)
chat = ChatSession(model, processor, system="You are a concise assistant.")
questions = [
    ("What is in this picture?", [args.image]),
    ("What colours dominate it?", []),
    ("Write a one-line caption for it.", []),
]
for question, images in questions:
    answer = chat.send(question, images=images, max_tokens=150)
    print(f">> {question}\n{answer.text}")
    print(f"   [prefilled {chat.last_prefill_tokens} new tokens]\n")
