"""Where a model comes from: a local folder, ``demo`` (the small model shipped with the package),
or a Hugging Face hub repo id, downloaded once (only the files a model needs) and taken from the
hub cache when offline."""

import json
from pathlib import Path
from typing import Optional

from .errors import ModelLoadError, first_line

# What a model folder needs: weights, configs, tokenizer and templates (no PyTorch .bin files).
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
DEMO_MODEL = Path(__file__).parent / "demo_model"


def hub_repo_id(path_or_repo) -> Optional[str]:
    """The hub repo id (``owner/name``) that ``path_or_repo`` names; None for ``demo``, an
    existing path, and anything written as a path (starting with ``.``, ``/`` or ``~``)."""
    name = str(path_or_repo)
    if name == "demo" or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def resolve_model_path(path_or_repo, revision: Optional[str] = None) -> Path:
    """A local folder as is; ``demo`` for the small model shipped with the package; a hub repo
    id downloaded (only the files needed) or taken from the local cache when offline."""
    if str(path_or_repo) == "demo":
        if not (DEMO_MODEL / "config.json").is_file():
            raise ModelLoadError(f"the demo model is missing from this installation ({DEMO_MODEL})")
        return DEMO_MODEL
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    repo_id = hub_repo_id(path_or_repo)
    if repo_id is None:
        raise ModelLoadError(f"model folder {path_or_repo} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as download_error:  # offline, unknown repo, gated: try the cache
        try:
            return Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"{repo_id} is neither a local folder nor in the hub cache, and downloading it "
                f"failed: {first_line(download_error)}"
            ) from None


def hub_config(path_or_repo) -> Optional[dict]:
    """A hub repo's config.json alone (a small download), so that what it says can be checked
    before the weights are fetched; None for anything that is not a hub id, and when the file
    cannot be had (offline, unknown, gated: resolve_model_path says which)."""
    repo_id = hub_repo_id(path_or_repo)
    if repo_id is None:
        return None
    try:
        from huggingface_hub import snapshot_download  # (hf_hub_download retries for ~25 s offline)

        config = json.loads((Path(snapshot_download(repo_id, allow_patterns=["config.json"])) / "config.json").read_text())
    except Exception:  # noqa: BLE001 - offline, unknown, gated
        return None
    return config if isinstance(config, dict) else None
