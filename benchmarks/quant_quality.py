"""How much each quantization mode and mixed recipe changes the model (issue 20, item 4).

For every setting in CONFIGS the source checkpoint is converted with ``convert`` and compared
with the source's own weights computed in float32:

- ``demo``: the shipped demo model's released (unconverted) hub-layout checkpoint,
  tests/assets/demo_checkpoint (float32 files holding float16-exact values; its language model
  holds the dequantized 6-bit group-64 values the shipped folder was made with), converted with
  ``--dtype float16``.
  Logits over the whole prompt of fixed held-out questions (image + question), relative error
  ||q - ref|| / ||ref|| over all of them; greedy answers (4 tokens) to the demo's held-out
  questions: agreement with the float answers, and accuracy.
- ``3b``: a random Qwen2.5-VL-3B-shaped checkpoint (benchmarks/convert_memory.py: real widths
  and depth, bfloat16, normal(0, 0.02) weights, unit norms); ``--text-layers`` scales the depth
  down. Text-only chat prompts (the vision tower is not quantized in any setting here), run
  through the language model one decoder layer at a time with each layer's weights read and
  dequantized to float32 just before it, so the 3B fits in a few GB; the same arithmetic as
  ``load_model(dtype=float32)``. Relative error of the logits at every prompt position, and
  top-1 agreement (the greedy next token) at every position.

Bits per weight are those of the quantized layers (weights, scales and biases); size is the
folder's safetensors bytes.

    python benchmarks/quant_quality.py demo --questions 200
    python benchmarks/quant_quality.py 3b --workdir /tmp/q3b [--checkpoint /tmp/q3b/checkpoint]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

import mlx_qwenvl  # noqa: E402,F401  (binds the BLAS before mlx.core is imported)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_qwenvl.convert import convert  # noqa: E402
from mlx_qwenvl.language import DecoderLayer, MRoPE  # noqa: E402
from mlx_qwenvl.loading import model_args, read_config, sanitize, weight_files  # noqa: E402

# (label, convert options); None is the source itself.
CONFIGS = [
    ("float (reference)", None),
    ("affine 8-bit, g64", dict(q_bits=8)),
    ("affine 6-bit, g64", dict(q_bits=6)),
    ("affine 5-bit, g64", dict(q_bits=5)),
    ("affine 4-bit, g32", dict(q_bits=4, q_group_size=32)),
    ("affine 4-bit, g64 (default)", dict(q_bits=4)),
    ("affine 4-bit, g128", dict(q_bits=4, q_group_size=128)),
    ("affine 3-bit, g64", dict(q_bits=3)),
    ("affine 2-bit, g64", dict(q_bits=2)),
    ("mxfp8 (8-bit, g32)", dict(q_mode="mxfp8")),
    ("mxfp4 (4-bit, g32)", dict(q_mode="mxfp4")),
    ("nvfp4 (4-bit, g16)", dict(q_mode="nvfp4")),
    *[(f"{recipe}", dict(quant_predicate=recipe))
      for recipe in ("mixed_2_6", "mixed_3_4", "mixed_3_5", "mixed_3_6", "mixed_3_8", "mixed_4_6", "mixed_4_8")],
]
HELD_OUT_SEED = 20261128  # tests/test_demo.py: a seed the training never used
PROMPTS = [
    "Describe the picture in one sentence.",
    "What is the capital of France, and why is it famous?",
    "Write a haiku about quantization of neural network weights.",
    "List three colours and three shapes.",
    "Explain, step by step, how to make a cup of tea.",
    "Translate 'good morning' into German, French and Spanish.",
]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def converted(source: Path, out: Path, options, dtype=None):
    """(folder, bits per quantized weight) for one setting; the source itself for None."""
    if options is None:
        return source, None
    logs = []
    convert(source, out, quantize=True, force=True, log=logs.append, dtype=dtype, **options)
    bpw = next((float(line.split(", ")[-1].split()[0]) for line in logs if "bits per quantized" in line), None)
    return out, bpw


# --------------------------------------------------------------------------- demo


def demo_source(workdir: Path) -> Path:
    from train_demo import unpack_released_checkpoint

    return unpack_released_checkpoint(workdir / "demo-release")


def demo_measure(folder: Path, questions, logit_questions) -> dict:
    from train_demo import messages_for

    from mlx_qwenvl import generate, load

    model, processor = load(folder)  # "auto": float32, quantized layers dequantized (Linux CPU)
    logits = []
    for question in logit_questions:
        inputs = processor(messages_for(question))
        logits.append(np.array(model(mx.array(inputs["input_ids"]), pixel_values=mx.array(inputs["pixel_values"]),
                                     image_grid_thw=mx.array(inputs["image_grid_thw"]))))
    answers = [generate(model, processor, messages_for(q), max_tokens=4, temperature=0.0).text.strip()
               for q in questions]
    return {"logits": logits, "answers": answers}


def run_demo(args) -> list:
    from demo_tasks import questions as make_questions

    workdir = Path(tempfile.mkdtemp(prefix="quant-quality-demo-", dir=args.workdir))
    source = demo_source(workdir)
    questions = make_questions(HELD_OUT_SEED, args.questions)
    logit_questions = questions[: args.logit_prompts]
    rows, reference = [], None
    for label, options in CONFIGS:
        if args.only and label not in args.only and options is not None:
            continue
        start = time.time()
        # float16: as the shipped demo folder; the release holds float16-exact values, so the
        # cast adds no error and the scales and biases are 16-bit as in any real conversion.
        folder, bpw = converted(source, workdir / "out", options, dtype="float16")
        result = demo_measure(folder, questions, logit_questions)
        if reference is None:
            reference = result
        ref_logits = np.concatenate([x.reshape(-1) for x in reference["logits"]])
        ours = np.concatenate([x.reshape(-1) for x in result["logits"]])
        agree = np.mean([a == b for a, b in zip(result["answers"], reference["answers"])])
        right = np.mean([a == q.answer for a, q in zip(result["answers"], questions)])
        row = {"model": "demo", "setting": label, "logits_rel_error": rel(ours, ref_logits),
               "answer_agreement": float(agree), "accuracy": float(right), "bits_per_weight": bpw,
               "bytes": folder_bytes(folder), "questions": len(questions), "logit_prompts": len(logit_questions),
               "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- 3B


def prompt_ids() -> list:
    from mlx_qwenvl.processor import Processor

    processor = Processor.from_pretrained(REPO / "tests" / "assets" / "qwen2_tokenizer")
    tokenizer = processor.tokenizer
    out = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        out.append(tokenizer.encode(processor.apply_chat_template(messages)))
    return out


def stream_logits(folder: Path, prompts: list) -> list:
    """Logits [L, vocab] (float32) of each text prompt through the language model, reading and
    dequantizing one decoder layer at a time (the vision tower is never read)."""
    config = read_config(folder)
    args = model_args(config, str(folder))
    text, quantization = args.text, args.quantization or {}
    weights = {}
    for file in weight_files(folder):
        weights.update(sanitize(mx.load(str(file)), args))  # lazy

    def dense(path):
        weight = weights.pop(f"{path}.weight")
        scales = weights.pop(f"{path}.scales", None)
        if scales is None:
            return weight.astype(mx.float32)
        biases = weights.pop(f"{path}.biases", None)
        # As load() does: 16-bit scales and biases in float32 first, else the dense weight would
        # be rounded to 16 bits (uint8 scales of the floating-point modes stay as they are).
        if scales.dtype != mx.uint8:
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        own = quantization.get(path) if isinstance(quantization.get(path), dict) else quantization
        return mx.dequantize(weight, scales, biases, group_size=own["group_size"], bits=own["bits"],
                             mode=own.get("mode", quantization.get("mode", "affine"))).astype(mx.float32)

    def params(prefix):
        names = sorted({name[len(prefix) + 1:].rpartition(".")[0] for name in weights if name.startswith(prefix + ".")})
        out = []
        for module in names:
            path = f"{prefix}.{module}"
            if f"{path}.weight" in weights:
                out.append((f"{module}.weight", dense(path)))
            if f"{path}.bias" in weights:
                out.append((f"{module}.bias", weights.pop(f"{path}.bias").astype(mx.float32)))
        return out

    embed = dense("language_model.model.embed_tokens")
    mx.eval(embed)
    hidden = [embed[mx.array(ids)][None] for ids in prompts]
    rotary = MRoPE(text.head_dim, text.rope_theta, text.mrope_section)
    layer = DecoderLayer(text)
    for i in range(text.num_hidden_layers):
        layer.load_weights(params(f"language_model.model.layers.{i}"))
        mx.eval(layer.parameters())
        hidden = [layer(h, rotary, rotary.text_rope(0, h.shape[1], mx.float32), "causal") for h in hidden]
        mx.eval(hidden)
    norm = weights.pop("language_model.model.norm.weight").astype(mx.float32)
    head = embed if text.tie_word_embeddings else dense("language_model.lm_head")
    logits = []
    for h in hidden:
        h = mx.fast.rms_norm(h, norm, text.rms_norm_eps)
        logits.append(np.array(h[0] @ head.T))
    return logits


def run_3b(args) -> list:
    from convert_memory import config_for, create_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="quant-quality-3b-", dir=args.workdir))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = workdir / "checkpoint"
        create_checkpoint(checkpoint, config_for("3B", args.text_layers, args.vision_depth))
        shutil.copytree(REPO / "tests" / "assets" / "qwen2_tokenizer", checkpoint, dirs_exist_ok=True)
    layers = read_config(checkpoint).get("num_hidden_layers")
    prompts = prompt_ids()
    rows, reference = [], None
    for label, options in CONFIGS:
        if args.only and label not in args.only and options is not None:
            continue
        start = time.time()
        folder, bpw = converted(checkpoint, workdir / "out", options)
        converted_at = time.time()
        logits = stream_logits(folder, prompts)
        if reference is None:
            reference = logits
        ours, ref = np.concatenate([x.reshape(-1) for x in logits]), np.concatenate([x.reshape(-1) for x in reference])
        top1 = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, reference)]))
        row = {"model": f"3B-shaped random bf16, {layers} text layers", "setting": label,
               "logits_rel_error": rel(ours, ref), "top1_agreement": float(top1), "bits_per_weight": bpw,
               "bytes": folder_bytes(folder), "positions": int(sum(len(p) for p in prompts)),
               "convert_seconds": round(converted_at - start, 1),
               "measure_seconds": round(time.time() - converted_at, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if options is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def table(rows: list) -> str:
    lines = ["| setting | bits/weight | size | logits rel. error | " +
             ("answers = float | accuracy |" if rows[0]["model"] == "demo" else "top-1 = float |"),
             "|---|---|---|---|" + ("---|---|" if rows[0]["model"] == "demo" else "---|")]
    for r in rows:
        bpw = "—" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        cells = [r["setting"], bpw, f"{r['bytes'] / 1e6:.1f} MB" if r["bytes"] < 1e9 else f"{r['bytes'] / 1e9:.2f} GB",
                 f"{r['logits_rel_error']:.2e}" if r["logits_rel_error"] else "0"]
        if r["model"] == "demo":
            cells += [f"{100 * r['answer_agreement']:.1f}%", f"{100 * r['accuracy']:.1f}%"]
        else:
            cells += [f"{100 * r['top1_agreement']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["demo", "3b"])
    parser.add_argument("--questions", type=int, default=200, help="demo: held-out questions answered")
    parser.add_argument("--logit-prompts", type=int, default=20, help="demo: questions whose logits are compared")
    parser.add_argument("--checkpoint", type=Path, default=None, help="3b: an existing 3B-shaped checkpoint")
    parser.add_argument("--text-layers", type=int, default=36)
    parser.add_argument("--vision-depth", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=None, help="these settings only (labels; the reference always)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    rows = run_demo(args) if args.model == "demo" else run_3b(args)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
