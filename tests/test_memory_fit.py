"""float32 only when it fits: the memory this process can use (MemAvailable, cgroup v1 / v2
limits) against the float32 footprint estimated from the safetensors headers."""

import json
import re
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_qwenvl.loading as loading
from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import AVAILABLE_MEMORY_ENV, DtypeFallbackWarning, load_model, system_available_memory
from reference import make_reference, save_reference

GiB = 1 << 30
linux_cpu = pytest.mark.skipif(loading.default_dtype() != mx.float32,
                               reason="'auto' means float32 only on a Linux CPU")


# ---------------------------------------------------------------- reading the limits


def write(root, relative, text):
    file = root / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"


def test_meminfo_alone(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert system_available_memory(tmp_path) == 8_000_000 * 1024


def test_nothing_readable_is_unknown(tmp_path):
    """macOS and other systems without /proc: no figure, so no check."""
    assert system_available_memory(tmp_path) is None


def test_cgroup_v2_limit_of_own_group_and_ancestors(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/self/cgroup", "0::/user.slice/app\n")
    group = "sys/fs/cgroup/user.slice/app/"
    write(tmp_path, group + "memory.max", f"{4 * GiB}\n")
    write(tmp_path, group + "memory.current", f"{1 * GiB}\n")
    # Reclaimable page cache (the weights just read) does not count as used.
    write(tmp_path, group + "memory.stat", f"anon 123\nfile 999\ninactive_file {GiB // 2}\nactive_file 7\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.current", f"{5 * GiB}\n")
    assert system_available_memory(tmp_path) == 4 * GiB - GiB // 2
    # A parent's tighter limit applies to its children.
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", f"{6 * GiB}\n")
    assert system_available_memory(tmp_path) == 1 * GiB


def test_cgroup_v2_namespace_root(tmp_path):
    """In a container the process sees its own group as the root of /sys/fs/cgroup."""
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{8 * 10**9}\n")
    write(tmp_path, "sys/fs/cgroup/memory.current", f"{3 * 10**9}\n")
    assert system_available_memory(tmp_path) == 5 * 10**9


def test_cgroup_v1(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/self/cgroup", "5:devices:/\n4:memory:/process_api/abc\n0::/\n")
    group = "sys/fs/cgroup/memory/process_api/abc/"
    write(tmp_path, group + "memory.limit_in_bytes", f"{3 * GiB}\n")
    write(tmp_path, group + "memory.usage_in_bytes", f"{GiB}\n")
    write(tmp_path, group + "memory.stat", f"cache 5\ninactive_file 1\ntotal_inactive_file {GiB // 4}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # no limit
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{20 * GiB}\n")
    assert system_available_memory(tmp_path) == 3 * GiB - GiB + GiB // 4
    # Unlimited: MemAvailable decides.
    write(tmp_path, group + "memory.limit_in_bytes", "9223372036854771712\n")
    assert system_available_memory(tmp_path) == 8_000_000 * 1024


def test_a_full_cgroup_is_zero_not_negative(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "sys/fs/cgroup/memory.max", "1000\n")
    write(tmp_path, "sys/fs/cgroup/memory.current", "5000\n")
    assert system_available_memory(tmp_path) == 0


# ---------------------------------------------------------------- choosing the dtype


@pytest.fixture(scope="module")
def bf16_folder(tiny_reference, tmp_path_factory):
    config = tiny_reference[2]
    return save_reference(make_reference(config, dtype=torch.bfloat16), tmp_path_factory.mktemp("bf16"), config)


@pytest.fixture(scope="module")
def q4_folder(tiny_reference, tmp_path_factory):
    model = load_model(tiny_reference[1], dtype=mx.bfloat16)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and p.startswith("language_model"))
    folder = tmp_path_factory.mktemp("q4")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(dict(tiny_reference[2], quantization={"group_size": 32, "bits": 4})))
    return folder


def float32_bytes(model) -> int:
    """Parameters of the dense model in float32 (what 'auto' makes of the folder)."""
    return 4 * sum(v.size for _, v in tree_flatten(model.parameters()))


def dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


def small_memory(monkeypatch, nbytes=10**9):
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(nbytes))


def fallback_note(record) -> str:
    notes = [str(w.message) for w in record if issubclass(w.category, DtypeFallbackWarning)]
    assert len(notes) == 1, notes
    assert "\n" not in notes[0]
    return notes[0]


def check_figures(note: str, dense_float32_bytes: int, available="1.0"):
    """The note gives the float32 need (weights plus a margin of a few GB) and what is available."""
    needed = float(re.search(r"float32 needs about (\d+\.\d) GB", note).group(1))
    assert dense_float32_bytes / 1e9 < needed < dense_float32_bytes / 1e9 + 4, note
    assert f"only {available} GB is available" in note, note
    assert "--dtype" in note


@linux_cpu
def test_bf16_folder_keeps_its_dtype_when_float32_does_not_fit(bf16_folder, monkeypatch):
    small_memory(monkeypatch)
    with pytest.warns(DtypeFallbackWarning) as record:
        model = load_model(bf16_folder)
    note = fallback_note(record)
    print(note)
    assert dtypes(model) == {mx.bfloat16}
    check_figures(note, float32_bytes(model), available="1.0")
    assert "bfloat16" in note


@linux_cpu
def test_quantized_folder_stays_quantized_when_float32_does_not_fit(q4_folder, monkeypatch):
    small_memory(monkeypatch, 1_500_000_000)
    with pytest.warns(DtypeFallbackWarning) as record:
        model = load_model(q4_folder)
    note = fallback_note(record)
    print(note)
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(10**12))
    dense = load_model(q4_folder, dtype=mx.float32)
    from mlx_lm.utils import dequantize_model

    check_figures(note, float32_bytes(dequantize_model(dense)), available="1.5")
    assert "4-bit" in note


@linux_cpu
@pytest.mark.parametrize("folder", ["bf16_folder", "q4_folder"])
def test_float32_as_before_when_it_fits(folder, request, monkeypatch):
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(10**12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(request.getfixturevalue(folder))
    assert dtypes(model) == {mx.float32}
    assert not isinstance(model.language_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)


@linux_cpu
def test_unknown_available_memory_means_no_check(bf16_folder, monkeypatch):
    monkeypatch.delenv(AVAILABLE_MEMORY_ENV, raising=False)
    monkeypatch.setattr(loading, "system_available_memory", lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dtypes(load_model(bf16_folder)) == {mx.float32}


def test_explicit_float32_that_cannot_fit_fails_before_reading(bf16_folder, monkeypatch):
    small_memory(monkeypatch)

    def refuse(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_weights", refuse)
    with pytest.raises(ModelLoadError) as caught:
        load_model(bf16_folder, dtype=mx.float32)
    message = str(caught.value)
    print(message)
    assert "\n" not in message
    assert re.search(r"float32 needs about \d+\.\d GB of memory, only 1\.0 GB is available", message)
    assert "--dtype" in message


def test_other_dtypes_are_not_refused(bf16_folder, monkeypatch):
    """Only float32 is a choice made for speed; the checkpoint's dtype is what there is."""
    small_memory(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dtypes(load_model(bf16_folder, dtype=None)) == {mx.bfloat16}
        assert dtypes(load_model(bf16_folder, dtype=mx.float16)) == {mx.float16}


def test_casting_holds_the_checkpoint_once(bf16_folder, monkeypatch):
    """Weights are cast one layer at a time, so the peak is the float32 model plus one layer's
    checkpoint-dtype tensors, not float32 plus the whole checkpoint (what the estimate assumes)."""
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(10**12))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_model(bf16_folder, dtype=mx.float32)
    final = float32_bytes(model)
    largest = max(v.size for _, v in tree_flatten(model.parameters())) * 2  # one bf16 tensor
    peak = mx.get_peak_memory() - before
    print(f"peak {peak / 1e6:.1f} MB, float32 model {final / 1e6:.1f} MB, largest bf16 tensor {largest / 1e6:.1f} MB")
    assert peak <= final + largest + (1 << 20)


@linux_cpu
def test_dequantizing_holds_one_layer_twice(q4_folder, monkeypatch):
    """Dequantized one layer at a time: the peak is the float32 model plus about one dense
    layer (MLX's dequantize makes an intermediate of its output's size) and that layer's
    stored form, not plus the whole quantized model and every intermediate."""
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(10**12))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_model(q4_folder)
    final = float32_bytes(model)
    largest = max(v.nbytes for _, v in tree_flatten(model.parameters()))
    peak = mx.get_peak_memory() - before
    print(f"peak {peak / 1e6:.1f} MB, float32 model {final / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB")
    assert peak <= final + 1.3 * largest
