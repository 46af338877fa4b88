"""The Qwen2 decoder with multimodal rotary embedding (M-RoPE), in mlx-lm's style."""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import TextArgs


def rope_kernel_is_fused() -> bool:
    """``mx.fast.rope`` is one kernel on Metal and CUDA; the CPU backend composes it from ops."""
    return mx.default_device() != mx.cpu


class MRoPE:
    """Rotary embedding whose frequencies are split into (time, height, width) sections.

    Frequency i of the 64 uses the temporal id for i < 16, the row id for i < 40, else the
    column id ([16, 24, 24]), duplicated over the two NeoX halves. When the three ids are
    equal (text, and every decoding step) it is ordinary RoPE: see :meth:`text_rope`.
    """

    def __init__(self, head_dim: int, base: float, sections):
        self.head_dim = head_dim
        self.base = base
        self.inv_freq = 1.0 / (base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        # Evaluated now: a lazy array runs on the stream of the thread that made it, so a model
        # loaded on one thread and used on another (a server, an app) would fail on first use.
        mx.eval(self.inv_freq)
        bounds = [0]
        for size in sections:
            bounds.append(bounds[-1] + size)
        self.bounds = bounds

    def cos_sin(self, position_ids: mx.array, dtype) -> tuple:
        """position_ids (3, B, L) -> cos, sin of shape (B, 1, L, head_dim)."""
        freqs = position_ids.astype(mx.float32)[..., None] * self.inv_freq
        freqs = mx.concatenate(
            [freqs[axis, ..., lo:hi] for axis, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:]))],
            axis=-1,
        )
        return self._cos_sin(freqs[:, None], dtype)

    def text_rope(self, offset: int, length: int, dtype):
        """The rotation of text positions ``offset, offset + 1, ...``: an offset for
        ``mx.fast.rope`` where it is one kernel; on the CPU its fallback recomputes the angles
        in every call, so there the cos/sin are computed once for all layers (one rotation
        60 -> 21 us, a deep-thin decoding step 32 -> 21 ms in float32)."""
        if rope_kernel_is_fused():
            return offset
        positions = mx.arange(offset, offset + length, dtype=mx.float32)
        return self._cos_sin(positions[:, None] * self.inv_freq, dtype)

    @staticmethod
    def _cos_sin(freqs: mx.array, dtype) -> tuple:
        """Angles of the 64 frequencies -> cos, sin over both NeoX halves. As the reference:
        angles in float32, cos/sin cast to the activation dtype."""
        angles = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def __call__(self, x: mx.array, rope) -> mx.array:
        if isinstance(rope, tuple):
            cos, sin = rope
            half = self.head_dim // 2
            rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
            return x * cos + rotated * sin
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.base, scale=1.0, offset=rope
        )


class Attention(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)

    def __call__(self, x, rotary: MRoPE, rope, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = rotary(q, rope), rotary(k, rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, rotary, rope, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rotary, rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._rotary = MRoPE(args.head_dim, args.rope_theta, args.mrope_section)

    def __call__(self, embeddings, cache=None, position_ids=None, position_offset=0) -> mx.array:
        """position_ids (3, B, L) for M-RoPE; without them every row is ``position_offset + i``."""
        if cache is None:
            cache = [None] * len(self.layers)
        h = embeddings
        if position_ids is not None:
            rope: Any = self._rotary.cos_sin(position_ids, h.dtype)
        else:
            rope = self._rotary.text_rope(position_offset, h.shape[1], h.dtype)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, self._rotary, rope, mask, layer_cache)
        return self.norm(h)


class LanguageModel(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.args = args
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        embeddings: mx.array,
        cache: Optional[list] = None,
        position_ids: Optional[mx.array] = None,
        position_offset: int = 0,
    ) -> mx.array:
        h = self.model(embeddings, cache, position_ids, position_offset)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers
