from PIL import Image

from mlx_qwenvl.grounding import draw_boxes, parse_boxes, to_original
from mlx_qwenvl.image_processing import smart_resize


def test_boxes_map_from_the_resized_image_to_the_original():
    answer = 'Here:\n```json\n[{"bbox_2d": [28, 56, 280, 476], "label": "cat"}]\n```'
    boxes = parse_boxes(answer)
    assert boxes == [{"bbox_2d": [28, 56, 280, 476], "label": "cat"}]
    height, width = smart_resize(480, 640)  # the size the model saw: (476, 644)
    mapped = to_original(boxes, (640, 480), (width, height))
    x1, y1, x2, y2 = mapped[0]["bbox_2d"]
    assert (x1, x2) == (round(28 * 640 / 644, 1), round(280 * 640 / 644, 1))
    assert (y1, y2) == (round(56 * 480 / 476, 1), 480.0)  # clipped to the image
    drawn = draw_boxes(Image.new("RGB", (640, 480), "white"), mapped)
    assert drawn.getpixel((int(x1), 200)) != (255, 255, 255)
    assert drawn.getpixel((320, 20)) == (255, 255, 255)


def test_answers_without_boxes():
    assert parse_boxes("I see no cat.") == []
    assert parse_boxes('[{"label": "cat"}]') == []
    assert parse_boxes('{"bbox_2d": [1, 2, 3, 4]}') == [{"bbox_2d": [1, 2, 3, 4]}]
