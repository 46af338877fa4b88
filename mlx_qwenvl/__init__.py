"""Qwen2.5-VL on Apple MLX."""

# Must run before anything imports mlx.core: on a Linux CPU it binds an optimized
# BLAS so float32 matrix products do not fall back to the wheel's reference BLAS.
from ._blas import bind_optimized_blas

bind_optimized_blas()

__version__ = "0.1.0"
