"""What a converted folder tells the hub: its model card (README.md, with the metadata the hub
and mlx-community's listings read) and the upload itself."""

from pathlib import Path
from typing import Optional

from .convert_plan import Plan, dtype_name, quantization_words
from .errors import ConversionError, first_line
from .hub import hub_repo_id


def model_card(hf_path: str, plan: Plan, upload_repo: Optional[str], quantize_vision: bool):
    """The folder's ``huggingface_hub.ModelCard``: what it was converted from and to, and how to
    run it (``card.save(folder / "README.md")``)."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    base_model = hub_repo_id(hf_path)
    data = ModelCardData(library_name="mlx", pipeline_tag="image-text-to-text", tags=["mlx", "qwen2_5_vl"],
                         base_model=base_model)
    dtype = dtype_name(plan.dtype) if plan.dtype is not None else "the source's dtype"
    if plan.quantization:
        tower = "quantized too" if quantize_vision else f"kept in {dtype}"
        what = f"{quantization_words(plan)} language model; vision tower {tower}"
    else:
        what = f"{dtype} weights"
    source = f"[`{hf_path}`](https://huggingface.co/{hf_path})" if base_model else f"`{hf_path}`"
    name = upload_repo or "<this folder>"
    return ModelCard("\n".join([
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {upload_repo or Path(hf_path).name}",
        "",
        f"Qwen2.5-VL converted to MLX from {source} with mlx-qwenvl {__version__}: {what}.",
        "",
        "The folder uses the mlx-vlm / mlx-community layout, so mlx-vlm loads it as well.",
        "",
        "```bash",
        "pip install mlx-qwenvl",
        f'mlx-qwenvl generate --model {name} --image photo.jpg --prompt "Describe this image."',
        "```",
        "",
    ]))


def check_login(repo: str) -> None:
    """ConversionError (one line) when there is no Hugging Face login to upload to ``repo`` with."""
    from huggingface_hub import get_token

    if not get_token():
        raise ConversionError(f"uploading to {repo} needs a Hugging Face login (`hf auth login`)")


def upload(folder: Path, repo: str) -> None:
    """``folder`` uploaded to the model repo ``repo`` (created when absent). Raises
    ConversionError (one line, naming the folder, which is kept) when it fails or is interrupted."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except KeyboardInterrupt:
        raise ConversionError(f"upload to {repo} interrupted; the converted folder is at {folder}") from None
    except Exception as error:  # offline, not logged in, no rights
        raise ConversionError(
            f"upload to {repo} failed ({first_line(error)}); the converted folder is at {folder}") from None
