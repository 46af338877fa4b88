import sys
from pathlib import Path

import pytest

# Tests import the reference helpers as a plain module.
sys.path.insert(0, str(Path(__file__).parent))

import mlx_qwenvl  # noqa: E402,F401  (binds the BLAS before any test imports mlx.core)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "qwen2_tokenizer"


def pytest_configure(config):
    # `python -m pytest` runs everything (CI does); `-m "not slow"` is the quick loop.
    config.addinivalue_line(
        "markers", "slow: among the tests that take most of the suite's time (deselect with -m 'not slow')"
    )


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """A random tiny transformers Qwen2.5-VL (float32) and its folder in the hub layout."""
    from reference import make_reference, save_reference, tiny_config

    config = tiny_config()
    model = make_reference(config)
    path = save_reference(model, tmp_path_factory.mktemp("tiny"), config)
    return model, path, config


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_reference, tmp_path_factory):
    """The tiny random model as a complete model folder: weights, config, real tokenizer,
    chat template and the hub's preprocessor config."""
    import shutil

    from processor_fixtures import make_model_dir

    path = tmp_path_factory.mktemp("tiny_model") / "model"
    shutil.copytree(tiny_reference[1], path)
    return make_model_dir(path)


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    """The tiny model folder loaded once, in float32: ``(model, processor)``."""
    import mlx.core as mx

    from mlx_qwenvl.loading import load

    return load(tiny_model_dir, dtype=mx.float32)
