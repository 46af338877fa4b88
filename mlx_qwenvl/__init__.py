"""Qwen2.5-VL on Apple MLX."""

# Must run before anything imports mlx.core: on a Linux CPU it binds an optimized
# BLAS so float32 matrix products do not fall back to the wheel's reference BLAS.
from ._blas import bind_optimized_blas

bind_optimized_blas()

__version__ = "0.1.0"

from .chat import ChatSession  # noqa: E402
from .generate import GenerationResult, generate, stream_generate  # noqa: E402
from .loading import load, load_model  # noqa: E402
from .processor import Processor  # noqa: E402

__all__ = ["ChatSession", "GenerationResult", "Processor", "generate", "load", "load_model",
           "stream_generate"]
