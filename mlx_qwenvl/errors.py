"""The exceptions users see: each carries a one-line message naming the input and the problem."""


class QwenVLError(Exception):
    """Base class for the errors mlx_qwenvl raises on bad input or bad model folders."""


class InputError(QwenVLError, ValueError):
    """An image, video or prompt that cannot be used (missing, unreadable, too large, malformed)."""


class ModelLoadError(QwenVLError):
    """A model folder or config that cannot be loaded (missing files, weights, wrong model type)."""
