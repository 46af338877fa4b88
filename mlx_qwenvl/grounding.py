"""Boxes in Qwen2.5-VL answers: parse them and map them back to the original image.

Qwen2.5-VL answers grounding questions with absolute pixel coordinates of the image *as the
model saw it*, i.e. after the processor resized it to multiples of 28. Drawing them on the
original picture needs a scale by original/resized size on each axis.
"""

import json
import re
from typing import List

from PIL import Image, ImageDraw

_JSON_BLOCK = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_boxes(text: str) -> List[dict]:
    """``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}, ...]`` from an answer (fenced JSON or bare)."""
    match = _JSON_BLOCK.search(text)
    candidates = [match.group(1)] if match else [text, text[text.find("["): text.rfind("]") + 1]]
    items = None
    for candidate in candidates:
        try:
            items = json.loads(candidate)
            break
        except (json.JSONDecodeError, ValueError):
            continue
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and len(item.get("bbox_2d", ())) == 4]


def to_original(boxes: List[dict], original_size, resized_size) -> List[dict]:
    """Scale boxes from the resized (width, height) the model saw to the original (width, height)."""
    scale_x = original_size[0] / resized_size[0]
    scale_y = original_size[1] / resized_size[1]
    mapped = []
    for box in boxes:
        x1, y1, x2, y2 = box["bbox_2d"]
        coords = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
        coords = [min(max(0.0, c), limit) for c, limit in zip(coords, original_size * 2)]
        mapped.append({**box, "bbox_2d": [round(c, 1) for c in coords]})
    return mapped


def draw_boxes(image: Image.Image, boxes: List[dict], color="red") -> Image.Image:
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(box["bbox_2d"], outline=color, width=max(2, out.width // 300))
        if box.get("label"):
            draw.text((box["bbox_2d"][0] + 3, box["bbox_2d"][1] + 2), str(box["label"]), fill=color)
    return out
