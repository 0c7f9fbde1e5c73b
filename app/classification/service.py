"""The classification service behind /api/v1/inference: the catalogue of classifier folders and the loaded ones.

A classifier folder under CLASSIFIER_MODELS_PATH holds the training output `<stem>.lora/` (a PEFT LoRA adapter),
`<stem>.head.pt` or `<stem>.head.safetensors` (the head) and `<stem>.head.pt.pkl` or `<stem>.labels.json` (the
labels); `<stem>` is the one `*.lora` folder's name. Its model id is the folder's name.

Everything is checked before anything is attached: the folder and every file in it resolve inside the root; the
adapter passes the generation adapters' allow-list and shape checks (`app.llm.adapters.inspect`), plus the classifier's
own (task type CAUSAL_LM or SEQ_CLS; `modules_to_save` at most the head); the head and labels read safely
(`heads.py`) and fit the base model. The adapter then goes onto the served model under a reserved PEFT name
(`AdapterManager.attach_classifier`, on the engine thread); predictions run on the engine thread with exactly
that adapter active, and apply the head here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from app.classification.heads import (
    HEAD_PT_SUFFIX,
    HEAD_SAFETENSORS_SUFFIX,
    LABELS_JSON_SUFFIX,
    LABELS_PICKLE_SUFFIX,
    Head,
    check_fits,
    read_head,
    read_labels,
)
from app.errors import (
    AdapterError,
    AppError,
    BackendUnavailableError,
    ClassifierError,
    ClassifierNotFoundError,
    InvalidRequestError,
    ModelNotLoadedError,
    NumericalFailureError,
)
from app.llm.adapters.inspect import ADAPTER_CONFIG_FILE, AdapterInfo, inspect_adapter
from app.llm.adapters.paths import resolve_adapter_path
from app.llm.engine.jobs import CLASSIFIER_PREFIX
from app.llm.manager import LORA, ModelManager

if TYPE_CHECKING:
    from app.config import Settings
    from app.llm.backends.hf import HFLoraBackend

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".lora"
MODEL_DIR_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
#: Task types accepted in a classifier adapter's config (its LoRA matrices are the same either way).
CLASSIFIER_TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
#: Module names `modules_to_save` may name: the head, which this service reads from its own file.
HEAD_MODULE_NAMES = frozenset({"score", "classifier"})
ServiceStatus = Literal["running", "starting", "error"]


@dataclass(frozen=True)
class ClassifierFiles:
    model_id: str
    folder: Path
    lora: Path
    head: Path
    labels: Path


@dataclass
class LoadedClassifier:
    files: ClassifierFiles
    peft_name: str
    head: Head
    labels: list[str]
    max_length: int
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    unloading: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


def peft_name_for(model_id: str) -> str:
    """The reserved PEFT adapter name of a classifier (a digest: a folder name may hold '.', a PEFT name not)."""
    return CLASSIFIER_PREFIX + hashlib.sha1(model_id.encode()).hexdigest()[:12]


def find_classifier_files(root: Path, model_dir: str) -> ClassifierFiles:
    """The classifier folder `model_dir` (a folder name, nothing else) under `root` and its files, each resolved
    and inside the root; ClassifierError (400) or ClassifierNotFoundError (404) naming what is wrong."""
    if not MODEL_DIR_PATTERN.match(model_dir) or ".." in model_dir:
        raise ClassifierError(
            f"model_dir '{model_dir[:100]}' is not a folder name: use letters, digits, '.', '-' and '_' "
            "(no paths, no '..')"
        )
    try:
        real_root = root.resolve()
        folder = (root / model_dir).resolve()
        if not folder.is_relative_to(real_root) or folder == real_root:
            raise ClassifierError(f"the classifier folder '{model_dir}' is outside CLASSIFIER_MODELS_PATH")
        if not folder.is_dir():
            raise ClassifierNotFoundError(f"no classifier folder '{model_dir}' under CLASSIFIER_MODELS_PATH")
        loras = sorted(path.name for path in folder.iterdir() if path.name.endswith(LORA_SUFFIX) and path.is_dir())
        if len(loras) != 1:
            found = f"{len(loras)} ({', '.join(loras[:4])})" if loras else "none"
            raise ClassifierError(
                f"classifier '{model_dir}' must hold exactly one <stem>{LORA_SUFFIX} adapter folder; found {found}"
            )
        stem = loras[0][: -len(LORA_SUFFIX)]
        head = _one_of(folder, model_dir, stem, (HEAD_SAFETENSORS_SUFFIX, HEAD_PT_SUFFIX), "head", real_root)
        labels = _one_of(folder, model_dir, stem, (LABELS_JSON_SUFFIX, LABELS_PICKLE_SUFFIX), "labels", real_root)
        lora = resolve_adapter_path(f"{model_dir}/{loras[0]}", root, [])
    except AdapterError as error:  # the adapter folder's own containment check
        raise ClassifierError(f"classifier '{model_dir}', {loras[0]}: {error.message}") from None
    except OSError as error:
        reason = error.strerror or error
        raise ClassifierError(f"the classifier folder '{model_dir}' cannot be read: {reason}") from None
    except RuntimeError as error:  # a symlink loop (Python 3.11's resolve)
        raise ClassifierError(f"the classifier folder '{model_dir}' cannot be used: {error}") from None
    return ClassifierFiles(model_id=model_dir, folder=folder, lora=lora, head=head, labels=labels)


def _one_of(folder: Path, model_dir: str, stem: str, suffixes: tuple[str, ...], what: str, root: Path) -> Path:
    """The first of `<stem><suffix>` present, as a real path inside the root."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists() or candidate.is_symlink():
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):
                raise ClassifierError(
                    f"{candidate.name} in classifier '{model_dir}' links outside CLASSIFIER_MODELS_PATH"
                )
            if not resolved.is_file():
                raise ClassifierError(f"{candidate.name} in classifier '{model_dir}' is not a file")
            return resolved
    names = " or ".join(f"{stem}{suffix}" for suffix in suffixes)
    raise ClassifierError(f"classifier '{model_dir}' has no {what} file ({names})")


def check_classifier_config(info: AdapterInfo) -> None:
    """What a classifier adapter may carry beyond a generation adapter's allow-list: a SEQ_CLS or FEATURE_EXTRACTION
    task type (the training side writes the latter) and a
    `modules_to_save` naming only the head (whose weights this service reads from the head file; the adapter is
    attached as a causal-LM LoRA with neither, so nothing but LoRA matrices reaches the shared model)."""
    config: dict[str, Any] = json.loads((info.path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    name = f"{info.path.name}/{ADAPTER_CONFIG_FILE}"
    task_type = config.get("task_type")
    if task_type not in CLASSIFIER_TASK_TYPES:
        raise ClassifierError(
            f"{name}: task_type {task_type!r} is refused; allowed: CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION or unset"
        )
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if not isinstance(saved, list) or not set(map(str, saved)) <= HEAD_MODULE_NAMES:
        raise ClassifierError(
            f"{name}: modules_to_save {saved!r} is refused; only the head ({', '.join(sorted(HEAD_MODULE_NAMES))}) "
            "may be named, and its weights belong in the head file"
        )


def read_classifier(files: ClassifierFiles, hidden_size: int | None) -> tuple[AdapterInfo, Head, list[str]]:
    """Inspect the adapter and read the head and labels, checking they fit; nothing is attached (blocking)."""
    try:
        info = inspect_adapter(files.lora)
    except AdapterError as error:
        raise ClassifierError(f"classifier '{files.model_id}': {error.message}") from None
    check_classifier_config(info)
    head = read_head(files.head)
    labels = read_labels(files.labels)
    check_fits(head, labels, hidden_size, files.labels.name)
    return info, head, labels


def is_loadable(root: Path, model_dir: str) -> bool:
    try:
        find_classifier_files(root, model_dir)
    except AppError:
        return False
    return True


def _probabilities(hidden: list[object], head: Head) -> list[list[float]]:
    import torch

    with torch.inference_mode():
        features = torch.stack(hidden)  # type: ignore[arg-type]
        probabilities = (features @ head.weight.T + head.bias).softmax(dim=-1)
        if not bool(torch.isfinite(probabilities).all()):
            raise NumericalFailureError(
                f"{head.file} gave no finite probabilities for these texts (its logits overflowed)"
            )
        return probabilities.tolist()  # type: ignore[no-any-return]


def _gpu_id(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


class ClassificationService:
    """Loads, lists and unloads classifiers and answers predictions, on the local backend's model."""

    def __init__(self, models: ModelManager) -> None:
        self._models = models
        self._loaded: dict[str, LoadedClassifier] = {}
        self._lock = asyncio.Lock()  # loads and unloads, one at a time

    def _backend(self) -> HFLoraBackend:
        backend = _local_backend(self._models)
        if backend is None:
            raise BackendUnavailableError(
                f"classification runs on the local model (the lora backend), which is not loaded here (the active "
                f"backend is {self._models.active}): switch to it with POST /switch_model {{\"use_lora\": true}} "
                "(admin) or start the server with USE_LORA_DEFAULT=true"
            )
        return backend

    @staticmethod
    def _settings(backend: HFLoraBackend) -> Settings:
        if backend.settings is None:
            raise BackendUnavailableError("the local backend was built without settings; it cannot classify")
        return backend.settings

    async def load(self, model_dir: str, max_length: int) -> tuple[str, str]:
        """Check and attach a classifier; (model_id, message). Loaded already: answered as loaded again."""
        backend = self._backend()
        limit = backend.facts.max_position_embeddings
        if limit and max_length > limit:
            raise InvalidRequestError(f"max_length {max_length} is over the base model's limit of {limit} tokens")
        root = self._settings(backend).classifier_models_path
        async with self._lock:
            existing = self._loaded.get(model_dir)
            if existing is not None:
                existing.max_length = max_length
                return model_dir, f"already loaded ({len(existing.labels)} labels); max_length {max_length}"
            files = await anyio.to_thread.run_sync(find_classifier_files, root, model_dir)
            info, head, labels = await anyio.to_thread.run_sync(read_classifier, files, backend.facts.hidden_size)
            peft_name = peft_name_for(model_dir)
            try:
                await backend.attach_classifier(peft_name, info)
            except AdapterError as error:
                raise ClassifierError(f"classifier '{model_dir}': {error.message}") from None
            self._loaded[model_dir] = LoadedClassifier(files, peft_name, head, labels, max_length)
        logger.info("classifier %s loaded: %d labels, adapter %s", model_dir, len(labels), files.lora.name)
        return model_dir, f"loaded: {len(labels)} labels, adapter {files.lora.name}, head {head.file}"

    async def unload(self, model_id: str) -> tuple[str, str]:
        """Detach a classifier's adapter and drop its head; the base model stays. Predictions already running on it
        finish first; later ones get model_not_loaded."""
        backend = self._backend()
        async with self._lock:
            record = self._loaded.get(model_id)
            if record is None:
                raise ModelNotLoadedError(f"model '{model_id}' is not loaded")
            record.unloading = True
            try:
                await record.idle.wait()
                await backend.detach_classifier(record.peft_name)
            except BaseException:
                record.unloading = False  # still attached: it serves again, and a later unload can retry
                raise
            del self._loaded[model_id]
        logger.info("classifier %s unloaded", model_id)
        return model_id, "unloaded; the base model stays loaded"

    async def predict(self, model_id: str, texts: list[str], top_n: int, batch_size: int) -> dict[str, Any]:
        backend = self._backend()
        limit = self._settings(backend).max_predict_texts
        if not texts:
            raise InvalidRequestError("texts is empty: give at least one text")
        if len(texts) > limit:
            raise InvalidRequestError(f"texts has {len(texts)} entries, over MAX_PREDICT_TEXTS={limit}")
        if top_n < 1 or batch_size < 1:
            raise InvalidRequestError("top_n and batch_size must be at least 1")
        record = self._loaded.get(model_id)
        if record is None or record.unloading:
            raise ModelNotLoadedError(
                f"model '{model_id}' is not loaded: POST /api/v1/inference/models/load {{\"model_dir\": ...}} first"
            )
        record.in_flight += 1
        record.idle.clear()
        try:
            rows = await anyio.to_thread.run_sync(backend.encode_texts, texts, record.max_length)
            empty = next((index for index, row in enumerate(rows) if not row), None)
            if empty is not None:
                raise InvalidRequestError(f"texts[{empty}] is empty (no tokens)")
            hidden = await backend.classify(record.peft_name, rows, batch_size)
        finally:
            record.in_flight -= 1
            if record.in_flight == 0:
                record.idle.set()
        probabilities = _probabilities(hidden, record.head)
        labels = record.labels
        shown = min(top_n, len(labels))
        ranked = [sorted(range(len(labels)), key=lambda index: (-row[index], index))[:shown] for row in probabilities]
        return {
            "model_id": model_id,
            "labels": [labels[order[0]] for order in ranked],
            "top_n": [
                [(labels[index], row[index]) for index in order]
                for order, row in zip(ranked, probabilities, strict=True)
            ],
            "label_probabilities": [dict(zip(labels, row, strict=True)) for row in probabilities],
        }

    async def list_models(self) -> dict[str, Any]:
        """Every loadable folder under the root, loaded or not, and any loaded one whose folder has gone."""
        backend = self._backend()
        root = self._settings(backend).classifier_models_path
        found = await anyio.to_thread.run_sync(self._loadable, root)
        return self._entries(backend, sorted(set(found) | set(self._loaded)))

    async def query(self, model_ids: list[str]) -> dict[str, Any]:
        """The listing's entries for those of `model_ids` that exist (loaded, or loadable under the root)."""
        if not model_ids:
            raise InvalidRequestError("model_ids is empty: name at least one model")
        backend = self._backend()
        root = self._settings(backend).classifier_models_path

        def existing() -> list[str]:
            unique = list(dict.fromkeys(model_ids))
            return [name for name in unique if name in self._loaded or is_loadable(root, name)]

        return self._entries(backend, await anyio.to_thread.run_sync(existing))

    def _entries(self, backend: HFLoraBackend, model_ids: list[str]) -> dict[str, Any]:
        now = time.time()
        gpu = _gpu_id(backend.facts.device)
        models = []
        for model_id in model_ids:
            record = self._loaded.get(model_id)
            models.append({
                "model_id": model_id,
                "status": "loaded" if record is not None else "unloaded",
                "gpu_id": gpu if record is not None else None,
                "uptime_seconds": round(now - record.loaded_at, 1) if record is not None else None,
            })
        return {"models": models, "total": len(models), "loaded_count": sum(m["status"] == "loaded" for m in models)}

    @staticmethod
    def _loadable(root: Path) -> list[str]:
        if not root.is_dir():
            return []
        return [entry.name for entry in root.iterdir()
                if entry.is_dir() and MODEL_DIR_PATTERN.match(entry.name) and is_loadable(root, entry.name)]

    def status(self) -> dict[str, Any]:
        """Whether the service can run, the engine's device with its real memory figures, and queued predictions."""
        backend = _local_backend(self._models)
        if backend is None:
            state: ServiceStatus = "starting" if self._models.active == LORA else "error"
            return {"service_status": state, "workers": [], "total_workers": 0, "loaded_models_count": 0,
                    "pending_requests": 0}
        workers = [_worker(backend.facts.device)]
        return {"service_status": "running", "workers": workers, "total_workers": len(workers),
                "loaded_models_count": len(self._loaded), "pending_requests": backend.pending_predictions}


def _worker(device: str) -> dict[str, Any]:
    """The engine as seed 004 lists a worker (`worker_id` "cpu-0", "cuda0-0": the device, then the worker on
    it; one engine per process here) with its device's memory: CUDA's own figures on a GPU; on the CPU the
    machine's (total, available) with the server process's resident size beside them."""
    mib = 2**20
    extra: dict[str, Any] = {}
    worker_id = "cpu-0"
    if device.startswith("cuda"):
        import torch

        index = _gpu_id(device) or 0
        worker_id = f"cuda{index}-0"
        free, total = torch.cuda.mem_get_info(index)
        used = total - free
        extra["process_allocated_mb"] = round(torch.cuda.memory_allocated(index) / mib, 1)
    else:
        meminfo = _proc_kib("/proc/meminfo", ("MemTotal", "MemAvailable"))
        total = meminfo.get("MemTotal", 0) * 1024 or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = meminfo.get("MemAvailable", 0) * 1024
        used = total - free
        extra["process_rss_mb"] = round(_proc_kib("/proc/self/status", ("VmRSS",)).get("VmRSS", 0) / 1024, 1)
    return {
        "worker_id": worker_id,
        "device": device,
        "total_memory_mb": round(total / mib, 1),
        "used_memory_mb": round(used / mib, 1),
        "free_memory_mb": round(free / mib, 1),
        "memory_usage_percent": round(100 * used / total, 1) if total else 0.0,
        **extra,
    }


def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """`key: N kB` lines of a /proc file (empty where there is no /proc)."""
    values: dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in keys and rest.split():
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return values


def _local_backend(models: ModelManager) -> HFLoraBackend | None:
    """The loaded local backend, None when it is not loaded (hf_backend imports torch: only once it is)."""
    backend = models.loaded(LORA)
    if backend is None:
        return None
    from app.llm.backends.hf import HFLoraBackend

    return backend if isinstance(backend, HFLoraBackend) else None
