"""The one settings object of lora-rag.

Everything configurable is read here, from environment variables and `.env` (copy `.env.lora`),
and validated at start-up. Nothing else in the code base reads `os.environ`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BASE_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_EMBEDDING_MODEL = "embedded:all-MiniLM-L6-v2"
OLLAMA_EMBEDDING_PREFIX = "ollama:"


def parse_name_path_list(text: str) -> dict[str, Path]:
    """`sql=/path/a,code=/path/b` (lmdeploy style) as {name: path}."""
    entries: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, path = item.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(f"'{item}' is not name=path (expected e.g. sql=/path/a,code=/path/b)")
        entries[name.strip()] = Path(path.strip())
    return entries


class Settings(BaseSettings):
    """Service, model, retrieval and generation settings (see `.env.lora` for every variable)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Models
    base_model_name: str = Field(
        EMBEDDED_BASE_MODEL,
        description="HF hub id or local folder of the base model; the default is the embedded SmolLM2.",
    )
    lora_model_path: Path = Field(Path("./lora_adapters"), description="folder of the LoRA adapter")
    lora_adapters_dir: Path = Field(Path("./lora_adapters"), description="each sub-folder is a named adapter")
    lora_adapters: str = Field("", description="more named adapters: name=path,name=path")
    default_adapter: str = Field("", description="adapter used when a request names none")
    max_loaded_adapters: int = Field(8, ge=1, le=1000)
    merge_cache_mb: int = Field(256, ge=0, description="memory for merged weights of recently used adapters")
    adapter_allowed_roots: str = Field(
        "", description="more folders (comma-separated) run-time adapter loads may read from"
    )
    served_model_name: str = Field("", description="the base model's name in /v1/models (default: derived)")
    cache_dir: Path | None = Field(None, description="where models are downloaded / converted to")
    use_lora_default: bool = True
    default_backend: str = Field(
        "", description="the backend answering at start-up, a name in app/llm/manager.py: lora, ollama or remote; "
        "empty: USE_LORA_DEFAULT decides (true: lora, false: ollama)"
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    numeric_path: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto", description="what the model computes in, by name (app/llm/numerics/choice.py): auto measures a "
        "typical answer's cost in each candidate on this CPU and takes the fastest; int8 is weight-only int8"
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the design card's name for a float NUMERIC_PATH")
    enable_quantization: bool = Field(False, description="the design card's name for NUMERIC_PATH=int8")
    quantization_type: Literal["int8"] = "int8"
    num_threads: int = Field(0, ge=0, le=256, description="torch CPU threads; 0 = torch's default")
    # The design card's performance settings (003), honoured as documented rather than ignored.
    enable_fp16: bool = Field(
        False, description="CUDA: float16 weights (with TORCH_DTYPE auto or float16); on a CPU it does not apply "
        "(float16 is emulated there) and --config-check and /model_info say so"
    )
    cuda_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="CUDA: the share of the GPU's memory this process may take (torch's "
        "per-process memory fraction); on a CPU it does not apply"
    )
    preload_models: bool = Field(True, description="false: the active backend loads on its first request")

    # Generation
    max_new_tokens: int = Field(512, ge=1, le=8192)
    repetition_repeats: int = Field(
        3, ge=0, le=100, description="a local answer whose last tokens repeat one span this many times running is "
        "stopped (finish reason repetition); 0 turns the guard off"
    )
    repetition_min_span: int = Field(8, ge=2, le=64, description="tokens in the shortest span the guard counts")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)

    # Ollama
    ollama_base_url: str = "http://localhost:11434"
    ollama_model: str = "qwen3:4b"
    ollama_connect_timeout: float = Field(5.0, gt=0)
    ollama_read_timeout: float = Field(120.0, gt=0)

    # Remote OpenAI-compatible engine (vLLM, SGLang, LoRAX, llama.cpp's server, another lora-rag)
    remote_base_url: str = Field("", description="its API root, e.g. http://gpu-host:8000/v1; empty: no remote backend")
    remote_api_key: SecretStr = Field(SecretStr(""), description="sent as Bearer to the remote engine")
    remote_model: str = Field("", description="the base model's name there; empty: the first of its /v1/models")
    remote_connect_timeout: float = Field(5.0, gt=0, le=600)
    remote_read_timeout: float = Field(120.0, gt=0, le=86_400)
    remote_retries: int = Field(2, ge=0, le=10, description="retries, with backoff, when connecting fails")
    remote_models_ttl_seconds: float = Field(30.0, ge=0, le=86_400, description="how long its model list is cached")

    # Retrieval
    embedding_model: str = EMBEDDED_EMBEDDING_MODEL
    vector_store_path: Path = Path("./vector_store")
    vector_store_backend: str = Field(
        "faiss", description="where collections live, a name in app/rag/stores/registry.py: faiss (versioned folders "
        "in VECTOR_STORE_PATH, one machine) or milvus (MILVUS_URI, shared by replicas)"
    )
    milvus_uri: str = Field(
        "./milvus.db", description="VECTOR_STORE_BACKEND=milvus: a local path ending in .db runs the embedded Milvus "
        "Lite; http(s)://host:port is a Milvus server or cluster"
    )
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus credentials: user:password or an API key")
    milvus_timeout: float = Field(10.0, gt=0, le=600, description="seconds one Milvus call may take, retries included")
    sample_corpus_path: Path = Field(
        Path("./docs"), description="documents indexed at first start and by POST /admin/vector-store/rebuild"
    )
    embedding_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype of the local sentence-transformers embedder on the CPU; auto = bfloat16 where the CPU "
        "computes it natively (AVX512-BF16 / AMX), else float32",
    )
    retrieval_top_k: int = Field(4, ge=1, le=50)
    context_token_budget: int = Field(
        800, ge=0, le=1_000_000, description="tokens (the answering model's) the retrieved passages may take in a "
        "prompt, best passage first; the first that does not fit is cut at a sentence end, later ones are left out; "
        "0: no limit"
    )
    chunk_size: int = Field(500, ge=50, le=8000, description="characters per chunk")
    chunk_overlap: int = Field(80, ge=0, le=2000)
    retrieval_mode: str = Field(
        "hybrid",
        description="how chunks are found, a name in app/rag/retrieval/registry.py: hybrid (dense + BM25, fused), "
        "dense (embeddings only) or lexical (BM25 only)",
    )
    hybrid_fusion: str = Field(
        "calibrated", description="hybrid: how the two rankings are fused: calibrated (cosine plus BM25 as a share "
        "of the best the question could reach), relative (scores scaled 0..1 per question and summed) or rrf "
        "(reciprocal rank fusion); see app/rag/retrieval/hybrid.py"
    )
    hybrid_lexical_weight: float = Field(
        2.0, ge=0, le=100, allow_inf_nan=False,
        description="hybrid with HYBRID_FUSION=calibrated: the weight of the BM25 side against the cosine",
    )
    rrf_k: int = Field(60, ge=1, le=10_000, description="hybrid with HYBRID_FUSION=rrf: the constant k of the fusion")
    retrieval_candidates: int = Field(
        20, ge=1, le=1000, description="hybrid: candidates each side (dense, BM25) contributes to the fusion"
    )
    reranker_model: str = Field(
        "", description="sentence-transformers CrossEncoder (local folder or cached hub id) that re-orders the "
        "candidates; empty: no re-ranking"
    )
    reranker_candidates: int = Field(20, ge=1, le=1000, description="candidates the re-ranker scores per question")

    max_upload_mb: float = Field(20.0, gt=0, le=1024, description="largest document POST /documents accepts")
    max_document_chars: int = Field(
        2_000_000, ge=1_000, le=1_000_000_000, description="most characters of text an uploaded document may hold"
    )
    max_document_chunks: int = Field(5_000, ge=1, le=10_000_000, description="most chunks one uploaded document makes")
    upload_parse_seconds: float = Field(
        30.0, gt=0, le=3_600, description="longest time reading an upload's text may take (a child process)"
    )
    upload_parse_mb: int = Field(
        1024, ge=128, le=1_000_000, description="most memory reading an upload's text may take (a child process)"
    )

    # Classification (/api/v1/inference)
    classifier_models_path: Path = Field(
        Path("./classifiers"), description="each sub-folder is a trained classifier (LoRA adapter + head + labels)"
    )
    max_predict_texts: int = Field(256, ge=1, le=100_000, description="texts in one prediction request")

    # Server
    api_host: str = "127.0.0.1"
    api_port: int = Field(8001, ge=1, le=65535)
    workers: int = Field(
        1, ge=1, le=64, description="worker processes serving on API_PORT together (start_lora_rag.py --workers, as "
        "uvicorn --workers); each loads its own model, and run-time changes of what is served are refused (409)"
    )
    max_query_chars: int = Field(4000, ge=1, le=100_000, description="longest question or chat message")
    max_messages: int = Field(64, ge=1, le=10_000, description="messages in one chat completion request")
    max_concurrent_generations: int = Field(8, ge=1, le=256)
    max_batch_size: int = Field(8, ge=1, le=64, description="requests decoded together (the one prefilling counted)")
    batch_size: int | None = Field(None, ge=1, le=64, description="the design card's name for MAX_BATCH_SIZE")
    prefill_chunk_tokens: int = Field(
        128, ge=16, le=32_768, description="prompt tokens per prefill forward; one per running row between decode steps"
    )
    prefix_cache_mb: int = Field(
        256, ge=0, le=1_000_000, description="prompt KV kept for reuse by prompts that begin alike; 0 = none"
    )
    max_queued_requests: int = Field(16, ge=0, le=10_000, description="waiting beyond capacity before 503")
    max_concurrent_embeddings: int = Field(
        2, ge=1, le=256, description="/v1/embeddings and /api/embed requests embedding at once (MAX_QUEUED_REQUESTS "
        "more may wait); embedding is compute-bound, so more only share the same cores"
    )
    api_keys: SecretStr = Field(SecretStr(""), description="user API keys, comma-separated")
    admin_api_keys: SecretStr = Field(SecretStr(""), description="admin API keys, comma-separated")
    allow_unauthenticated: bool = False
    rate_limit_per_minute: int = Field(120, ge=0, le=1_000_000, description="per key; 0 = no limit")
    auth_failure_limit: int = Field(
        10, ge=0, le=1_000_000, description="invalid API keys one client address may send per window; 0 = no limit"
    )
    auth_failure_window_seconds: float = Field(60.0, gt=0, le=86_400, description="the window of AUTH_FAILURE_LIMIT")
    request_timeout_seconds: float = Field(300.0, gt=0, le=86_400, description="deadline of one generation")
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at GET /metrics")
    metrics_require_key: bool = Field(
        False, description="GET /metrics needs a user API key; off: open like the health probes, for scrapers"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    verbose: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device", "numeric_path", "torch_dtype", "quantization_type", "embedding_dtype",
                     "retrieval_mode", "hybrid_fusion", "vector_store_backend", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("lora_adapters")
    @classmethod
    def _name_path_list(cls, value: str) -> str:
        parse_name_path_list(value)
        return value

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]

    @property
    def admin_api_key_list(self) -> list[str]:
        return [key.strip() for key in self.admin_api_keys.get_secret_value().split(",") if key.strip()]

    @model_validator(mode="after")
    def _keys_or_loopback(self) -> Settings:
        if self.api_key_list or self.admin_api_key_list or self.allow_unauthenticated:
            return self
        if self.api_host != "localhost" and not _is_loopback(self.api_host):
            raise ValueError(
                f"API_HOST={self.api_host} with no API_KEYS: set API_KEYS and ADMIN_API_KEYS, "
                "or ALLOW_UNAUTHENTICATED=true to serve the network without keys"
            )
        return self

    @property
    def adapter_allowed_root_paths(self) -> list[Path]:
        return [Path(part.strip()) for part in self.adapter_allowed_roots.split(",") if part.strip()]

    @model_validator(mode="after")
    def _derive_served_model_name(self) -> Settings:
        if not self.served_model_name:
            name = self.base_model_name.removeprefix("embedded:")
            self.served_model_name = Path(name).name if Path(name).is_dir() else name
        return self

    @property
    def named_adapters(self) -> dict[str, Path]:
        """LORA_ADAPTERS as {name: path}."""
        return parse_name_path_list(self.lora_adapters)

    @field_validator("ollama_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("remote_base_url")
    @classmethod
    def _http_url_or_empty(cls, value: str) -> str:
        if not value.strip():
            return ""
        if urlsplit(value.strip()).username is not None:
            # The URL is shown in /health, /model_info and error messages; a key belongs in REMOTE_API_KEY.
            raise ValueError("must not hold credentials (user:password@): put the key in REMOTE_API_KEY")
        return cls._http_url(value.strip())

    @field_validator("milvus_uri")
    @classmethod
    def _milvus_uri(cls, value: str) -> str:
        value = value.strip()
        if value.startswith(("http://", "https://")):
            if urlsplit(value).username is not None:
                raise ValueError("must not hold credentials (user:password@): put them in MILVUS_TOKEN")
            return value.rstrip("/")
        if not value.endswith(".db"):
            raise ValueError(
                "must be http(s)://host:port (a Milvus server) or a local path ending in .db (Milvus Lite)"
            )
        return value

    @field_validator("default_backend", mode="before")
    @classmethod
    def _lower_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def start_backend(self) -> str:
        """The backend active at start-up: DEFAULT_BACKEND, else the one USE_LORA_DEFAULT names."""
        return self.default_backend or ("lora" if self.use_lora_default else "ollama")

    @model_validator(mode="after")
    def _design_names_agree(self) -> Settings:
        """BATCH_SIZE is MAX_BATCH_SIZE by another name; ENABLE_FP16 asks for float16, which another TORCH_DTYPE
        contradicts; a NUMERIC_PATH other than auto must agree with ENABLE_QUANTIZATION, TORCH_DTYPE and
        ENABLE_FP16."""
        if self.batch_size is not None:
            if "max_batch_size" in self.model_fields_set and self.max_batch_size != self.batch_size:
                raise ValueError(
                    f"BATCH_SIZE={self.batch_size} and MAX_BATCH_SIZE={self.max_batch_size} disagree: BATCH_SIZE is "
                    "the design card's name for MAX_BATCH_SIZE; set one of them"
                )
            self.max_batch_size = self.batch_size
        if self.enable_fp16 and self.torch_dtype not in ("auto", "float16"):
            raise ValueError(
                f"ENABLE_FP16=true asks for float16 but TORCH_DTYPE={self.torch_dtype}: set TORCH_DTYPE=auto (or "
                "float16), or ENABLE_FP16=false"
            )
        named = self.numeric_path
        if named != "auto":
            if self.enable_quantization and named != "int8":
                raise ValueError(f"ENABLE_QUANTIZATION=true asks for int8 but NUMERIC_PATH={named}: set one of them")
            if self.torch_dtype not in ("auto", named):
                raise ValueError(f"TORCH_DTYPE={self.torch_dtype} and NUMERIC_PATH={named} disagree: set one of them")
            if self.enable_fp16 and named != "float16":
                raise ValueError(f"ENABLE_FP16=true asks for float16 but NUMERIC_PATH={named}: set one of them")
        return self

    @property
    def numeric_path_request(self) -> tuple[str, str]:
        """The numeric path asked for (a name, or auto) and the setting that asked: NUMERIC_PATH, or the design
        card's ENABLE_QUANTIZATION (int8) or TORCH_DTYPE."""
        if self.enable_quantization:
            return "int8", f"ENABLE_QUANTIZATION=true (QUANTIZATION_TYPE={self.quantization_type})"
        if self.numeric_path != "auto":
            return self.numeric_path, f"NUMERIC_PATH={self.numeric_path}"
        if self.torch_dtype != "auto":
            return self.torch_dtype, f"TORCH_DTYPE={self.torch_dtype}"
        return "auto", "auto"

    @model_validator(mode="after")
    def _ollama_is_not_ourselves(self) -> Settings:
        """This server answers Ollama's API too: an OLLAMA_BASE_URL naming it would send every Ollama-backend
        generation back to itself, each waiting on the next, until the deadline."""
        url = urlsplit(self.ollama_base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        if port == self.api_port and _same_host(url.hostname or "", self.api_host):
            raise ValueError(
                f"OLLAMA_BASE_URL={self.ollama_base_url} is this server itself (API_HOST={self.api_host}, "
                f"API_PORT={self.api_port}): point it at a real Ollama server, or change API_PORT"
            )
        return self

    @property
    def ollama_embedding_model(self) -> str | None:
        """The Ollama model name when EMBEDDING_MODEL is `ollama:<name>`, else None."""
        if self.embedding_model.startswith(OLLAMA_EMBEDDING_PREFIX):
            return self.embedding_model[len(OLLAMA_EMBEDDING_PREFIX) :]
        return None


_THIS_MACHINE = frozenset({"localhost", "0.0.0.0", "::"})  # with every loopback address


def _same_host(url_host: str, api_host: str) -> bool:
    """Whether a URL's host reaches a server bound to `api_host` on this machine: the same name, or a local
    name for a server listening on loopback or on every interface."""
    url_host, api_host = url_host.lower().strip("[]"), api_host.lower().strip("[]")
    local = url_host in _THIS_MACHINE or _is_loopback(url_host)
    return url_host == api_host or (local and (api_host in _THIS_MACHINE or _is_loopback(api_host)))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingsError(Exception):
    """Settings that cannot be used; the message is one line per bad variable."""


def describe_validation_error(error: ValidationError) -> str:
    """One line per invalid variable, naming it in upper case with what is allowed."""
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check across variables: its message names them
            lines.append(str(item["msg"]).removeprefix("Value error, "))
            continue
        variable = str(item["loc"][0]).upper()
        allowed = item.get("ctx", {}).get("expected")
        detail = f"allowed: {allowed}" if allowed else item["msg"]
        lines.append(f"{variable}={item.get('input')!r} is invalid: {detail}")
    return "\n".join(lines)


def unknown_setting_names() -> list[str]:
    """A line for each name lora-rag does not know where it looks for settings: every entry of `.env` that is no
    setting of ours (a typo there is otherwise silently ignored), and each name of the process environment that
    looks like a typo of one (the environment holds much else, so only near misses are named)."""
    from dotenv import dotenv_values

    known = {name.upper() for name in Settings.model_fields}
    lines = []
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    if env_file.is_file():
        for name in dotenv_values(env_file):
            if name.upper() not in known:
                lines.append(f"{env_file}: {name} is not a lora-rag setting{_did_you_mean(name, known)}")
    for name in os.environ:
        near = difflib.get_close_matches(name.upper(), known, n=1, cutoff=_TYPO_SIMILARITY)
        if near and name.upper() not in known:
            lines.append(f"environment: {name} is not a lora-rag setting; did you mean {near[0]}?")
    return lines


#: How alike a name of the environment must be to one of ours to be named as a likely typo.
_TYPO_SIMILARITY = 0.88


def _did_you_mean(name: str, known: set[str]) -> str:
    near = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment and `.env`; raise SettingsError with readable lines."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


def export_to_environment(settings: Settings) -> None:
    """Put every setting that was given (by the environment, `.env` or the command line) into this process's
    environment, so the worker processes uvicorn starts from it (WORKERS > 1) read the same settings."""
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        os.environ[name.upper()] = ("true" if value else "false") if isinstance(value, bool) else str(value)
