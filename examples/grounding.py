"""Ask for boxes, map them from the resized image back to the original's pixels, draw them.

python examples/grounding.py --model MODEL photo.jpg "every person" --out boxes.png
"""

import argparse

from mlx_qwenvl import generate, load
from mlx_qwenvl.grounding import draw_boxes, parse_boxes, to_original
from mlx_qwenvl.image_processing import load_image

parser = argparse.ArgumentParser()
parser.add_argument("image")
parser.add_argument("target", help="what to locate, e.g. 'the red car'")
parser.add_argument("--model", default="mlx-community/Qwen2.5-VL-7B-Instruct-4bit")
parser.add_argument("--out", default="boxes.png")
args = parser.parse_args()

model, processor = load(args.model)
prompt = f"Locate {args.target} in the image and output the bounding boxes in JSON format."
inputs = processor(prompt, images=[args.image])
result = generate(model, processor, prompt, images=[args.image], max_tokens=400)
print(result.text)

original = load_image(args.image)
# The model's coordinates refer to the resized image it saw: grid (1, h, w) patches of 14 px.
_, grid_h, grid_w = inputs["image_grid_thw"][0]
resized_size = (int(grid_w) * 14, int(grid_h) * 14)
boxes = to_original(parse_boxes(result.text), original.size, resized_size)
draw_boxes(original, boxes).save(args.out)
print(f"{len(boxes)} box(es) drawn on {args.out}: {[b['bbox_2d'] for b in boxes]}")
