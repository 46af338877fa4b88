"""Summarise a video (a file with the [video] extra, or a folder of frames).

python examples/summarize_video.py --model MODEL clip.mp4 --fps 1
"""

import argparse

from mlx_qwenvl import generate, load

parser = argparse.ArgumentParser()
parser.add_argument("video")
parser.add_argument("--model", default="mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
parser.add_argument("--max-frames", type=int, default=64)
args = parser.parse_args()

model, processor = load(args.model)
messages = [{"role": "user", "content": [
    {"type": "video", "video": args.video, "fps": args.fps, "max_frames": args.max_frames},
    {"type": "text", "text": "Summarise what happens in this video, in order."},
]}]
result = generate(model, processor, messages, max_tokens=400)
print(result.text)
print(f"\n[{result.prompt_tokens} prompt tokens, peak memory {result.peak_memory:.1f} GB]")
