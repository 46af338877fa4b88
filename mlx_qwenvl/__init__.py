"""Qwen2.5-VL on Apple MLX."""

import importlib
import sys
import types

# Must run before anything imports mlx.core: on a Linux CPU it binds an optimized
# BLAS so float32 matrix products do not fall back to the wheel's reference BLAS.
from ._blas import bind_optimized_blas

bind_optimized_blas()

__version__ = "0.1.0"

# The public names, imported on first use so that `mlx-qwenvl --help` and `import mlx_qwenvl`
# do not pay for mlx-lm and transformers (about 2 s) before they are needed.
_EXPORTS = {
    "ChatSession": "chat",
    "GenerationResponse": "generate",
    "GenerationResult": "generate",
    "generate": "generate",
    "stream_generate": "generate",
    "load": "loading",
    "load_model": "loading",
    "Processor": "processor",
    "convert": "convert",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package under its name; where that name is also a
    public function (``generate``, ``convert``), the function keeps the name, as it did when
    this file imported everything eagerly."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
