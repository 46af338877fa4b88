"""Numerical parity of the MLX model with transformers' Qwen2_5_VLForConditionalGeneration.

Both sides get the same pixel values and token ids. Tolerances:
- float32: relative error ||ours - ref|| / ||ref|| <= 1e-4 (observed ~1e-6: the only
  differences are summation order and transcendental implementations).
- bfloat16: <= 3e-2 (see BF16_TOLERANCE).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models.cache import make_prompt_cache

from mlx_qwenvl import language
from mlx_qwenvl.loading import load_model
import reference
from reference import make_reference, reference_device, rel_error, tiny_config, to_torch

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
FP32_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Each side rounds every matmul
# output, norm and residual to bf16 in a different order, and those independent roundings
# accumulate over the layers; the observed relative errors are ~7e-3, so 3e-2 (4x) flags a
# systematic error (a wrong rotary dtype, a bf16 softmax) while tolerating rounding.
BF16_TOLERANCE = 3e-2

CASES = {
    # name: ([(kind, grid)], second_per_grid_ts)
    "merged-grid-divides-by-4": ([("image", (1, 16, 16))], None),
    "merged-grid-not-divisible": ([("image", (1, 10, 14))], None),
    "non-square-several-windows": ([("image", (1, 12, 36))], None),
    "two-images": ([("image", (1, 10, 14)), ("image", (1, 16, 8))], None),
    "large-and-small-images": ([("image", (1, 16, 16)), ("image", (1, 4, 4)), ("image", (1, 4, 8))], None),
    "video-t3": ([("video", (3, 8, 12))], [1.0]),
    "image-and-video": ([("image", (1, 8, 12)), ("video", (4, 8, 8))], [0.75]),
}


def build_prompt(items):
    """Token ids and v5 mm_token_type_ids for a chat prompt holding ``items``."""
    ids = [151644, 8948, 198, 2610, 525, 151645, 198, 151644, 872, 198]
    for kind, grid in items:
        token = IMAGE if kind == "image" else VIDEO
        ids += [START] + [token] * (int(np.prod(grid)) // 4) + [END]
    ids += [74785, 419, 13, 151645, 198, 151644, 77091, 198]
    ids = np.array([ids])
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    return ids, types


def original_rule_positions(ids, items, seconds, tokens_per_second=2):
    """An independent, token-by-token implementation of the original Qwen2.5-VL rule."""
    rows, position, i = [], 0, 0
    grids = iter(items)
    seconds = iter(seconds or [])
    ids = ids.reshape(-1)
    while i < len(ids):
        if ids[i] not in (IMAGE, VIDEO):
            rows.append((position, position, position))
            position += 1
            i += 1
            continue
        kind, (t, h, w) = next(grids)
        interval = next(seconds) * tokens_per_second if kind == "video" else 0
        block = []
        for k in range(t):
            for r in range(h // 2):
                for c in range(w // 2):
                    block.append((position + int(k * interval), position + r, position + c))
        rows += block
        position = max(max(b) for b in block) + 1
        i += len(block)
    return np.array(rows).T


def make_inputs(items, seed=0):
    rng = np.random.default_rng(seed)
    inputs = {}
    for kind in ("image", "video"):
        grids = [grid for k, grid in items if k == kind]
        if grids:
            count = int(sum(np.prod(g) for g in grids))
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            inputs[key] = rng.standard_normal((count, 1176)).astype(np.float32)
            inputs[f"{kind}_grid_thw"] = np.array(grids)
    return inputs


@pytest.fixture(scope="module")
def bf16_pair(tiny_reference):
    _, path, config = tiny_reference
    return make_reference(config, dtype=torch.bfloat16), load_model(path, dtype=mx.bfloat16)


@pytest.fixture(scope="module")
def fp32_model(tiny_reference):
    return load_model(tiny_reference[1], dtype=mx.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_vision_tower_fp32(case, tiny_reference, fp32_model):
    ref = tiny_reference[0]
    items, _ = CASES[case]
    inputs = make_inputs(items)
    for kind in ("image", "video"):
        if f"{kind}_grid_thw" not in inputs:
            continue
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        grid = inputs[f"{kind}_grid_thw"]
        with torch.no_grad():
            expected = ref.model.visual(to_torch(pixels), grid_thw=to_torch(grid)).pooler_output
        ours = fp32_model.vision_tower(mx.array(pixels), grid)
        assert rel_error(ours, expected.cpu().numpy()) <= FP32_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_logits_fp32(case, tiny_reference, fp32_model):
    ref = tiny_reference[0]
    items, seconds = CASES[case]
    ids, _ = build_prompt(items)
    inputs = make_inputs(items)
    positions = original_rule_positions(ids, items, seconds)
    expected = reference.reference_logits(ref, ids, positions, inputs, seconds, torch.float32)
    ours = fp32_model(ids, second_per_grid_ts=seconds, **inputs)
    error = rel_error(ours, expected)
    print(f"{case}: fp32 logits rel error {error:.2e}")
    assert error <= FP32_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_logits_bf16(case, bf16_pair):
    ref, model = bf16_pair
    items, seconds = CASES[case]
    ids, _ = build_prompt(items)
    inputs = make_inputs(items)
    positions = original_rule_positions(ids, items, seconds)
    expected = reference.reference_logits(ref, ids, positions, inputs, seconds, torch.bfloat16)
    ours = model(ids, second_per_grid_ts=seconds, **inputs).astype(mx.float32)
    error = rel_error(ours, expected)
    print(f"{case}: bf16 logits rel error {error:.2e}")
    assert error <= BF16_TOLERANCE


def test_chunked_attention_for_large_images(tiny_reference, fp32_model, monkeypatch):
    """Huge images attend in query chunks (bounded memory); the result must not change."""
    import mlx_qwenvl.vision as vision

    monkeypatch.setattr(vision, "MAX_SCORE_ELEMENTS", 4 * 64 * 100)  # ~100-query chunks
    items = [("image", (1, 22, 18)), ("image", (1, 10, 14))]
    inputs = make_inputs(items)
    with torch.no_grad():
        expected = tiny_reference[0].model.visual(
            to_torch(inputs["pixel_values"]), grid_thw=to_torch(inputs["image_grid_thw"])
        ).pooler_output
    ours = fp32_model.vision_tower(mx.array(inputs["pixel_values"]), inputs["image_grid_thw"])
    assert rel_error(ours, expected.cpu().numpy()) <= FP32_TOLERANCE


def test_segment_layouts():
    from mlx_qwenvl.vision import SegmentLayout

    padded = SegmentLayout.from_lengths([140, 128])  # similar sizes: one padded call
    assert len(padded.batches) == 1 and padded.batches[0].key_mask is not None
    grouped = SegmentLayout.from_lengths([256, 16, 32, 16])  # one large image: grouped by size
    assert [b.length for b in grouped.batches] == [16, 32, 256]
    assert all(b.key_mask is None for b in grouped.batches)


def test_greedy_decode_matches_reference_generate(tiny_reference, fp32_model):
    ref = tiny_reference[0]
    items = [("image", (1, 10, 14))]
    ids, types = build_prompt(items)
    inputs = make_inputs(items, seed=3)
    with torch.no_grad():
        generated = ref.generate(
            input_ids=to_torch(ids),
            mm_token_type_ids=to_torch(types),
            pixel_values=to_torch(inputs["pixel_values"]),
            image_grid_thw=to_torch(inputs["image_grid_thw"]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = generated[0, ids.shape[1]:].cpu().tolist()
    assert len(expected) == 32

    cache = make_prompt_cache(fp32_model)
    logits = fp32_model(ids, cache, **inputs)
    tokens = []
    for _ in range(32):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(int(token.item()))
        logits = fp32_model(token[None], cache)
    assert cache.rope_delta < 0
    assert tokens == expected


@pytest.mark.parametrize("fused_rope", [False, True], ids=["cos-sin", "fast-rope"])
def test_text_prompt_and_cached_steps_fp32(tiny_reference, fp32_model, monkeypatch, fused_rope):
    """Text-only positions take plain RoPE by either path (``mx.fast.rope``'s offset where it is
    one kernel, cos/sin computed once per call on the CPU): a prompt, then one token at a time
    on the cache, against the reference's logits for the whole sequence."""
    monkeypatch.setattr(language, "rope_kernel_is_fused", lambda: fused_rope)
    ids, _ = build_prompt([])
    with torch.no_grad():
        expected = tiny_reference[0](input_ids=to_torch(ids)).logits.float().cpu().numpy()
    cache = make_prompt_cache(fp32_model)
    split = 10
    ours = [fp32_model(ids[:, :split], cache)]
    ours += [fp32_model(mx.array(ids[:, i : i + 1]), cache) for i in range(split, ids.shape[1])]
    error = rel_error(mx.concatenate(ours, axis=1), expected)
    print(f"text, {'fast rope' if fused_rope else 'cos/sin'}: fp32 logits rel error {error:.2e}")
    assert error <= FP32_TOLERANCE


def test_image_position_ids_match_reference(tiny_reference, fp32_model):
    ref = tiny_reference[0]
    for items in ([("image", (1, 10, 14))], [("image", (1, 28, 42)), ("image", (1, 8, 8))]):
        ids, types = build_prompt(items)
        grids = np.array([g for _, g in items])
        expected, delta = ref.model.get_rope_index(to_torch(ids), to_torch(types), to_torch(grids))
        ours, next_position = fp32_model.position_ids(ids, grids)
        np.testing.assert_array_equal(ours, expected[:, 0].cpu().numpy())
        assert next_position - ids.shape[1] == int(delta)


def test_text_position_ids_are_sequential(tiny_reference, fp32_model):
    ids = np.array([[151644, 872, 198, 9707, 1879, 151645]])
    ours, next_position = fp32_model.position_ids(ids)
    np.testing.assert_array_equal(ours, np.tile(np.arange(6), (3, 1)))
    assert next_position == 6


def test_video_position_ids_hand_computed(fp32_model):
    # 3 text tokens, then a video of merged grid (3, 2, 3) sampled at 2 fps:
    # second_per_grid_t = 2 / 2 = 1.0 s, interval = 1.0 * tokens_per_second(2) = 2.
    ids = np.array([1, 2, 3] + [VIDEO] * 18 + [4, 5])
    ours, next_position = fp32_model.position_ids(ids, video_grid_thw=[(3, 4, 6)], second_per_grid_ts=[1.0])
    t = [3] * 6 + [5] * 6 + [7] * 6
    h = [3, 3, 3, 4, 4, 4] * 3
    w = [3, 4, 5] * 6
    expected = np.array([[0, 1, 2] + t + [8, 9], [0, 1, 2] + h + [8, 9], [0, 1, 2] + w + [8, 9]])
    np.testing.assert_array_equal(ours, expected)
    assert next_position == 10

    # Sampled at 1.5 fps: second_per_grid_t = 2 / 1.5, interval 8/3 -> t offsets 0, 2, 5, 8.
    ids = np.array([7] + [VIDEO] * 4 + [8])
    ours, next_position = fp32_model.position_ids(ids, video_grid_thw=[(4, 2, 2)], second_per_grid_ts=[2 / 1.5])
    np.testing.assert_array_equal(ours[0], [0, 1, 3, 6, 9, 10])
    np.testing.assert_array_equal(ours[1], [0, 1, 1, 1, 1, 10])
    assert next_position == 11

    # The temporal extent decides where text resumes, not max(h, w) as in transformers 5.x.
    ids = np.array([1, 2, 3] + [VIDEO] * 128 + [4])
    ours, _ = fp32_model.position_ids(ids, video_grid_thw=[(8, 8, 8)], second_per_grid_ts=[1.0])
    assert ours[0, 3:131].max() == 17 and ours[0, -1] == 18


def test_placeholder_feature_mismatch_is_an_error(fp32_model):
    from mlx_qwenvl.errors import InputError

    items = [("image", (1, 8, 8))]
    ids, _ = build_prompt(items)
    inputs = make_inputs([("image", (1, 8, 12))])
    with pytest.raises(InputError, match="16 image placeholder tokens but the images give 24"):
        fp32_model(ids, **inputs)


def test_tied_checkpoint_with_the_flag_only_in_text_config(tmp_path):
    """Some re-saves write tie_word_embeddings only in text_config, next to every other text key
    of transformers 5's nested layout, and the weights without lm_head. transformers ties such
    a folder; so must the loader, and its logits equal the reference's."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from safetensors import safe_open

    config = tiny_config(tie_word_embeddings=True)
    folder = tmp_path / "tied"
    make_reference(config, seed=8).save_pretrained(folder, safe_serialization=True)
    written = json.loads((folder / "config.json").read_text())
    written["text_config"]["tie_word_embeddings"] = written.pop("tie_word_embeddings")
    assert written["text_config"]["tie_word_embeddings"] is True and "tie_word_embeddings" not in written
    (folder / "config.json").write_text(json.dumps(written, indent=2))
    with safe_open(folder / "model.safetensors", "np") as weights:
        assert not any("lm_head" in name for name in weights.keys())

    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).float().eval().to(reference_device())
    assert ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()
    model = load_model(folder, dtype=mx.float32)
    assert model.args.text.tie_word_embeddings
    items = [("image", (1, 10, 14))]
    ids, _ = build_prompt(items)
    inputs = make_inputs(items, seed=4)
    expected = reference.reference_logits(ref, ids, original_rule_positions(ids, items, None), inputs)
    error = rel_error(model(ids, **inputs), expected)
    print(f"tied, flag in text_config: fp32 logits rel error {error:.2e}")
    assert error <= FP32_TOLERANCE
