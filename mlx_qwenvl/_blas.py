def bind_optimized_blas():
    """Placeholder: implemented for issue 7."""
    return None
