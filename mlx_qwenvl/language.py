"""The Qwen2 decoder with multimodal rotary embedding (M-RoPE), in mlx-lm's style.

Across several processes (``mlx.core.distributed``) the decoder is split as mlx-lm splits its
Qwen2: :meth:`LanguageModel.shard` for tensor parallelism (``shard_linear``), and
:meth:`LanguageModel.pipeline` for contiguous layer ranges (mlx-lm's ``PipelineMixin``). In both,
the token embedding and the output head are split by vocabulary (:class:`VocabParallelEmbedding`,
:class:`VocabParallelHead`), so that no rank holds the 0.3-1.2 G-parameter matrix whole.
"""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import TextArgs

try:
    from mlx_lm.models.pipeline import PipelineMixin
except ImportError:  # mlx-lm before 0.28.4: one process works as ever, pipeline() says why not

    class PipelineMixin:
        def __init__(self):
            super().__init__()
            self.pipeline_rank, self.pipeline_size, self.start_idx, self.end_idx = 0, 1, 0, None

        @property
        def pipeline_layers(self):
            return self.layers[self.start_idx : self.end_idx]

        def pipeline(self, group):
            raise ValueError("pipeline parallelism needs mlx-lm 0.28.4 or later (pip install -U mlx-lm)")


def rope_kernel_is_fused() -> bool:
    """``mx.fast.rope`` is one kernel on Metal and CUDA; the CPU backend composes it from ops."""
    return mx.default_device() != mx.cpu


def rotate_half(x: mx.array) -> mx.array:
    """The NeoX rotation's partner of ``x`` (last axis): (-second half, first half), as the
    reference's ``rotate_half``; the decoder's and the vision tower's rotary both use it."""
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


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
            return x * cos + rotate_half(x) * sin
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
    """The SwiGLU feed-forward block: the decoder's without biases, the vision tower's with them."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

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


def _gather_last_axis(x: mx.array, group) -> mx.array:
    """(..., n) on each of N ranks -> (..., N * n), rank r's part at [r * n, (r + 1) * n): every
    rank gets the same array. ``all_gather`` concatenates along axis 0, hence the moves."""
    return mx.moveaxis(mx.distributed.all_gather(mx.moveaxis(x, -1, 0), group=group), 0, -1)


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary over a group: rank r holds rows
    ``[r * V / N, (r + 1) * V / N)`` (``inner``: an Embedding or QuantizedEmbedding of V / N rows).

    A lookup takes each id from the rank holding its row, zeros elsewhere, and sums over the
    group: x + 0 is exact, so the embeddings equal the whole matrix's bit for bit, on every rank.
    ``as_linear`` (tied output head) gives each rank's V / N logits gathered into all V.
    """

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group
        self.rows = inner.weight.shape[0]
        self.start = group.rank() * self.rows

    def __call__(self, ids: mx.array) -> mx.array:
        """ids (B, L) int -> (B, L, hidden) in the embedding's dtype.

        Raises InputError when a prompt's ids (L > 1) differ between ranks: the sum below must
        never run with different shapes (see distributed.check_same_prompt)."""
        if ids.shape[-1] > 1:
            from .distributed import check_same_prompt

            check_same_prompt(self.group, ids.shape[-1], ids=ids)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        x = self.inner(mx.where(inside, local, 0))
        x = mx.where(inside[..., None], x, mx.zeros((), dtype=x.dtype))
        return mx.distributed.all_sum(x, group=self.group)

    def as_linear(self, h: mx.array) -> mx.array:
        """h (B, L, hidden) -> logits (B, L, V), the same on every rank."""
        return _gather_last_axis(self.inner.as_linear(h), self.group)


class VocabParallelHead(nn.Module):
    """An untied output head split by vocabulary: ``inner`` (Linear or QuantizedLinear) holds
    rank r's V / N rows; the logits are gathered so every rank has all V (and samples alike)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, h: mx.array) -> mx.array:
        """h (B, L, hidden) -> logits (B, L, V), the same on every rank."""
        return _gather_last_axis(self.inner(h), self.group)


class Qwen2Model(PipelineMixin, nn.Module):
    """The decoder stack. ``group`` is set by ``LanguageModel.shard``/``pipeline``; with one
    process (the default) ``pipeline_size`` is 1 and every distributed branch below is skipped."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._rotary = MRoPE(args.head_dim, args.rope_theta, args.mrope_section)
        self.group = None

    def __call__(self, embeddings, cache=None, position_ids=None, position_offset=0) -> mx.array:
        """position_ids (3, B, L) for M-RoPE; without them every row is ``position_offset + i``.

        ``cache`` holds one entry per layer this rank runs (``pipeline_layers``). With a group,
        a prompt call (more than one token, or position ids) first checks that every rank was
        given the same prompt (``distributed.check_same_prompt``: InputError otherwise).
        """
        if cache is None:
            cache = [None] * len(self.pipeline_layers)
        h = embeddings
        if self.group is not None:
            from . import distributed

            distributed.beat()  # progress, for the stall watchdog
            if position_ids is not None or h.shape[1] > 1:  # a prompt: checked (and settled)
                distributed.check_same_prompt(self.group, h.shape[1], position_offset,
                                              position_ids=position_ids)
            else:
                distributed.settle_unless_decoding()
        if position_ids is not None:
            rope: Any = self._rotary.cos_sin(position_ids, h.dtype)
        else:
            rope = self._rotary.text_rope(position_offset, h.shape[1], h.dtype)
        mask = create_attention_mask(h, cache[0])
        rank, size = self.pipeline_rank, self.pipeline_size
        if size > 1 and rank < size - 1:
            # This stage starts from the activations of the next rank (mlx-lm's order: the last
            # rank runs the first layers). The vocabulary-split embedding above is a collective
            # that this rank's graph no longer uses: it is queued here, ahead of the receive, or
            # the first stage would wait for this rank in it while this rank waits for the first
            # stage's send. Queued, not awaited: the host goes on building the step (mlx-lm's
            # decode overlaps the next step's graph with this one's computation).
            if isinstance(self.embed_tokens, VocabParallelEmbedding):
                mx.async_eval(h)
            h = mx.distributed.recv_like(h, rank + 1, group=self.group)
        for layer, layer_cache in zip(self.pipeline_layers, cache):
            h = layer(h, self._rotary, rope, mask, layer_cache)
        if size > 1 and rank != 0:
            h = mx.distributed.send(h, rank - 1, group=self.group)
            if cache[-1] is not None:
                # Evaluating the cache (as prefill does) must also perform the send.
                keys = cache[-1].keys
                cache[-1].keys = (tuple(mx.depends(list(keys), h)) if isinstance(keys, tuple)
                                  else mx.depends(keys, h))
        if size > 1:
            # Rank 0 ran the last layers: its activations go to every rank (kept in the graph).
            h = mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]
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
        """The layers this process runs (all of them unless ``pipeline`` split them): the
        caches (``Model.make_cache``) hold exactly these."""
        return self.model.pipeline_layers

    def shard(self, group) -> None:
        """Tensor parallelism over ``group``, as mlx-lm's ``qwen2.Model.shard``: q/k/v and
        gate/up all-to-sharded, o/down sharded-to-all (one ``all_sum`` each), every rank keeping
        n_heads / N query and n_kv_heads / N key/value heads (so its KV cache holds only those).
        Embedding and head are split by vocabulary. Works on quantized layers too.

        With fewer key/value heads than ranks (N a multiple of them), every query head of a rank
        uses the same key/value head: the rank keeps that one (ranks r with equal r * kv // N
        share it) instead of a split.

        Raises:
            ValueError: a head count, width or quantization group that N does not divide
                (one line naming it).
        """
        from mlx.nn.layers.distributed import shard_linear

        size = group.size()
        args = self.args
        kv_heads = args.num_key_value_heads
        _check_divides(size, {"attention heads": args.num_attention_heads,
                              "intermediate size": args.intermediate_size}, "tensor parallelism")
        if kv_heads % size and size % kv_heads:
            raise ValueError(f"tensor parallelism over {size} ranks needs the key/value heads ({kv_heads}) to "
                             f"divide by {size} or {size} by them; use pipeline parallelism (parallel='pipeline', "
                             "--parallel pipeline) or another number of ranks")
        first = self.model.layers[0]
        for name, layer in (("o_proj", first.self_attn.o_proj), ("down_proj", first.mlp.down_proj)):
            if hasattr(layer, "scales") and layer.scales.shape[-1] % size:
                raise ValueError(
                    f"tensor parallelism over {size} ranks cannot split {name}'s {layer.scales.shape[-1]} "
                    f"quantization groups evenly; use pipeline parallelism (parallel='pipeline', --parallel pipeline)"
                )
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
            if kv_heads % size == 0:
                attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
                attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
                attn.n_kv_heads //= size
            else:
                keep = group.rank() * kv_heads // size
                for proj in (attn.k_proj, attn.v_proj):  # rows of weight, bias, scales, biases
                    proj.update(tree_map(lambda w: w[keep * args.head_dim:(keep + 1) * args.head_dim],
                                         proj.parameters()))
                attn.n_kv_heads = 1
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= size
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        self.model.group = group
        self._split_vocabulary(group)

    def pipeline(self, group) -> None:
        """Pipeline parallelism over ``group`` with mlx-lm's ``PipelineMixin``: contiguous layer
        ranges, rank N-1 running the first layers and rank 0 the last; the activations go from
        rank to rank with ``send``/``recv_like``, and rank 0's reach every rank (``all_gather``).
        Layers of other ranks become None (their weights are never read). Embedding and head are
        split by vocabulary.

        Raises:
            ValueError: fewer layers than ranks, or an mlx-lm whose split leaves layers out.
        """
        layers = self.args.num_hidden_layers
        if layers < group.size():
            raise ValueError(f"pipeline parallelism needs at least one layer per rank: "
                             f"{layers} layers, {group.size()} ranks")
        self.model.pipeline(group)
        # mlx-lm's split has changed between releases: check that the ranks' ranges, in rank
        # order N-1 ... 0, cover every layer exactly once before any weight is read.
        mine = mx.array([self.model.start_idx, self.model.end_idx or layers], dtype=mx.int32)
        ranges = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu).tolist()
        if (ranges[-1][0] != 0 or ranges[0][1] != layers or any(start >= end for start, end in ranges)
                or any(ranges[r][0] != ranges[r + 1][1] for r in range(len(ranges) - 1))):
            raise ValueError(f"this mlx-lm splits the {layers} layers over {group.size()} ranks as {ranges} "
                             f"(start, end per rank), leaving some out; upgrade mlx-lm or use tensor parallelism")
        self.model.group = group
        self._split_vocabulary(group)

    def _split_vocabulary(self, group) -> None:
        """Embedding (and an untied head) split by vocabulary, when N divides it; otherwise each
        rank keeps them whole (correct, only larger)."""
        from mlx.nn.layers.distributed import shard_inplace

        if self.args.vocab_size % group.size():
            return
        embed = self.model.embed_tokens
        shard_inplace(embed, "all-to-sharded", group=group)  # rows of weight, scales, biases
        self.model.embed_tokens = VocabParallelEmbedding(embed, group)
        if not self.args.tie_word_embeddings:
            shard_inplace(self.lm_head, "all-to-sharded", group=group)
            self.lm_head = VocabParallelHead(self.lm_head, group)


def _check_divides(size: int, counts: dict, what: str) -> None:
    for name, count in counts.items():
        if count % size:
            raise ValueError(f"{what} over {size} ranks needs the {name} ({count}) to divide by {size}; use "
                             "pipeline parallelism (parallel='pipeline', --parallel pipeline) or another number of ranks")
