"""How much memory a model takes once loaded, and how much this process can still use.

The estimates work on a model skeleton and its stored tensors (``StoredTensor``, from the
safetensors headers), before any weight is read; the system's figure is the least of
MemAvailable and every cgroup limit's headroom (v1 and v2), None where neither can be read.
The choice of dtype from these figures (and its test hook) is the loader's: loading.choose_dtype.
"""

import math
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import mlx.nn as nn

from .model import Model
from .safetensors_io import StoredTensor

# Memory needed beyond the weights. A prompt with an image: the vision tower's full-attention
# blocks hold heads x patches^2 float32 scores (16 x 4096^2 x 4 B, about 1 GB, for an image of
# ~1000 tokens); the KV cache takes ~0.1 MB a token in float32 (7B: 28 layers x 2 x 4 heads x
# 128 x 4 B), ~0.4 GB for 4000 tokens; Python, MLX and the tokenizer ~0.5 GB. 2 GiB covers a
# typical prompt; a much larger image or context can still need more.
RUNTIME_MARGIN = 2 << 30
GB = 1e9

# cgroup controllers: (mount under the root, limit file, usage file, reclaimable-cache key in
# memory.stat). Page cache counts as used in a cgroup, but its inactive part (the weight files
# just read, say) is reclaimed before the kernel kills anything, as kubelet reckons it too.
CGROUP_V2 = ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
CGROUP_V1 = ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def quantized_modules(model: nn.Module) -> dict:
    """Module path -> module of every quantized layer of ``model``."""
    return {path: module for path, module in model.named_modules()
            if "scales" in module and hasattr(module, "bits")}


def _dequantized_bits(model: nn.Module, dequantize: bool) -> dict:
    """Module path -> bits of every layer that loading makes dense (none unless ``dequantize``)."""
    return {path: module.bits for path, module in quantized_modules(model).items()} if dequantize else {}


def _loaded(tensor: StoredTensor, leaf: str, dtype, bits: Optional[int]) -> int:
    """Bytes of one stored tensor once loaded: in ``dtype`` if floating point (None: as stored);
    with ``bits`` (its layer dequantized) a weight unpacked to ``dtype``, scales and biases gone."""
    elements = math.prod(tensor.shape)
    if bits is not None:
        return elements * 32 // bits * dtype.size if leaf == "weight" else 0
    if dtype is not None and tensor.floating:
        return elements * dtype.size
    return tensor.nbytes


def loaded_bytes(model: Model, tensors: dict, dtype=None, dequantize: bool = False) -> int:
    """Bytes the stored ``tensors`` take once loaded into ``model`` (a skeleton) as ``dtype``,
    quantized layers made dense with ``dequantize`` (which needs a ``dtype``)."""
    bits = _dequantized_bits(model, dequantize)
    total = 0
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        total += _loaded(tensor, leaf, dtype, bits.get(path))
    return total


def conversion_overhead(model: Model, tensors: dict, dtype=None, dequantize: bool = False) -> int:
    """The most memory one module holds beside the loaded model while it is converted (_fill
    converts one at a time): its stored tensors, and when it is dequantized, its scales and
    biases in ``dtype`` plus an intermediate the size of its dense weight (MLX's dequantize
    peaks at twice its output)."""
    bits = _dequantized_bits(model, dequantize)
    per_module = Counter()
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        per_module[path] += tensor.nbytes
        if path in bits:
            per_module[path] += _loaded(tensor, leaf, dtype, bits[path] if leaf == "weight" else None)
    return max(per_module.values(), default=0)


def stored_kind(model: Model, tensors: dict) -> str:
    """The checkpoint's weights in a word: '4-bit', '4/8-bit' (mixed) or their float dtype."""
    bits = sorted({module.bits for module in quantized_modules(model).values()})
    if bits:
        return "/".join(map(str, bits)) + "-bit"
    sizes = Counter()
    for tensor in tensors.values():
        if tensor.floating:
            sizes[tensor.dtype] += tensor.nbytes
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    return names.get(sizes.most_common(1)[0][0], "stored") if sizes else "stored"


def _read_int(file: Path) -> Optional[int]:
    """The number in a one-number file; None when absent or not a number ("max": no limit)."""
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(file: Path, key: str) -> int:
    """A ``key value`` line of a memory.stat file; 0 when absent."""
    try:
        lines = file.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _meminfo_available(root: Path) -> Optional[int]:
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    return None


def _own_cgroups(root: Path) -> dict:
    """{"v2": path, "v1": path} of this process's memory cgroups, from /proc/self/cgroup."""
    groups = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return groups
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            groups["v2"] = parts[2]
        elif "memory" in parts[1].split(","):
            groups["v1"] = parts[2]
    return groups


def _cgroup_headroom(root: Path) -> Iterator[int]:
    """What each limited cgroup holding this process has left: its own group and every ancestor
    (a parent's limit binds its children), in cgroup v2 and v1."""
    groups = _own_cgroups(root)
    for version, (mount, limit_file, usage_file, cache_key) in (("v2", CGROUP_V2), ("v1", CGROUP_V1)):
        base = root / mount
        relative = Path(groups.get(version, "/").lstrip("/"))
        for folder in [base / relative, *(base / parent for parent in relative.parents)]:
            limit = _read_int(folder / limit_file)
            if limit is None:
                continue
            used = (_read_int(folder / usage_file) or 0) - _stat_value(folder / "memory.stat", cache_key)
            yield limit - max(0, used)


def system_available_memory(root: Path = Path("/")) -> Optional[int]:
    """Bytes this process can still allocate: the least of MemAvailable and every cgroup limit's
    headroom; None where none of them can be read (macOS, for one)."""
    root = Path(root)
    figures = [figure for figure in (_meminfo_available(root), *_cgroup_headroom(root)) if figure is not None]
    return max(0, min(figures)) if figures else None
