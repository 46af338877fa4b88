"""Synthetic visual questions for the offline demo model: colours, shapes, counts, positions,
and two-image comparisons, on pictures of varied sizes and aspect ratios.

Every question has a one-word answer. ``make_question(rng)`` draws one; the same seed always
gives the same questions, so training (seed 0) and the held-out evaluation (another seed) are
reproducible and disjoint in practice.
"""

import random
from dataclasses import dataclass, field
from typing import List, Tuple

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top", "bottom", "left", "right")
KINDS = ("color", "shape", "count", "position", "two_images")


@dataclass
class Question:
    kind: str
    text: str
    answer: str
    images: List[Image.Image] = field(default_factory=list)
    # More (question, answer) turns about the same pictures: training asks them as follow-ups,
    # so one encoded picture teaches several answers.
    followups: List[Tuple[str, str]] = field(default_factory=list)


def canvas(rng: random.Random) -> Image.Image:
    """A light background of a random size (112-280 px a side, aspect up to 3:1)."""
    width, height = rng.randint(112, 280), rng.randint(112, 280)
    if max(width, height) / min(width, height) > 3:
        height = max(height, width // 3)
        width = max(width, height // 3)
    shade = rng.randint(235, 255)
    return Image.new("RGB", (width, height), (shade, shade, shade))


def draw_shape(image: Image.Image, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def one_shape(rng: random.Random, shape: str, color: str, region: str = None) -> Image.Image:
    image = canvas(rng)
    w, h = image.size
    # Large enough that a circle and a square differ in whole patches, not a few corner pixels.
    r = rng.uniform(0.32, 0.45) * min(w, h)
    if region is None:
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    else:
        # Clearly inside one side's band, centred along the other axis (with jitter).
        near, far = rng.uniform(0.14, 0.24), rng.uniform(0.4, 0.6)
        cx, cy = {
            "top": (far * w, near * h),
            "bottom": (far * w, (1 - near) * h),
            "left": (near * w, far * h),
            "right": ((1 - near) * w, far * h),
        }[region]
        r = min(r, 0.12 * min(w, h))
    draw_shape(image, shape, color, cx, cy, r)
    return image


def many_shapes(rng: random.Random, shape: str, count: int) -> Image.Image:
    """``count`` non-overlapping shapes of one kind, in random colours."""
    for _ in range(100):
        image = canvas(rng)
        w, h = image.size
        # Sized by the picture's area, which the processor scales into a narrow band, so every
        # object covers about the same number of patches; and a radius apart, so two objects
        # never share one patch.
        r = rng.uniform(0.075, 0.085) * (w * h) ** 0.5
        centres = []
        for _ in range(400):
            if len(centres) == count:
                break
            c = (rng.uniform(r, w - r), rng.uniform(r, h - r))
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (3 * r) ** 2 for x, y in centres):
                centres.append(c)
        if len(centres) == count:
            for cx, cy in centres:
                draw_shape(image, shape, rng.choice(list(COLORS)), cx, cy, r)
            return image
    raise RuntimeError("could not place the shapes")


def make_question(rng: random.Random, kind: str = None) -> Question:
    kind = kind or rng.choice(KINDS)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    ask_color, ask_shape = (f"What color is the {shape}?", color), ("What shape is in the picture?", shape)
    # Follow-ups never ask what an earlier turn's text already names: "What shape is in the
    # picture?" after "What color is the circle?" teaches copying from the prompt, not looking.
    if kind == "color":
        return Question(kind, *ask_color, [one_shape(rng, shape, color)])
    if kind == "shape":
        return Question(kind, *ask_shape, [one_shape(rng, shape, color)], [ask_color])
    if kind == "count":
        count = rng.randint(1, 5)
        noun = shape if count == 1 else shape + "s"
        return Question(kind, f"How many {noun} are there?", str(count), [many_shapes(rng, shape, count)])
    if kind == "position":
        region = rng.choice(POSITIONS)
        return Question(kind, f"Where is the {shape}: top, bottom, left or right?", region,
                        [one_shape(rng, shape, color, region)], [ask_color])
    # two_images: the asked-for object is in exactly one of them.
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    other_color = rng.choice([c for c in COLORS if c != color])
    images = [one_shape(rng, shape, color), one_shape(rng, other_shape, other_color)]
    answer = "first"
    if rng.random() < 0.5:
        images.reverse()
        answer = "second"
    return Question(kind, f"Which picture shows the {color} {shape}, the first or the second?",
                    answer, images)


def questions(seed: int, count: int) -> List[Question]:
    rng = random.Random(seed)
    return [make_question(rng, KINDS[i % len(KINDS)]) for i in range(count)]
