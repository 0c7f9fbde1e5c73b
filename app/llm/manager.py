"""The one owner of generation backends and of which one is active.

Backends are chosen by name from BACKENDS (`lora`, `ollama`, `remote`; a new one is one entry). Routers never
load models: they ask this object for a backend. A request keeps the backend object it was handed, so
/switch_model changes only what later requests get; a request already generating finishes on the backend it
started with. A backend that is not configured (`remote` without REMOTE_BASE_URL) is never loaded and not
reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from app.config import Settings, SettingsError
from app.errors import AppError, BackendUnavailableError, BadRequestError, ModelLoadError, NotFoundError
from app.llm.adapters.paths import resolve_adapter_path
from app.llm.base import AdapterHost, ComponentHealth, GenerationBackend

if TYPE_CHECKING:
    from app.llm.backends.remote import RemoteBackend

logger = logging.getLogger(__name__)

BackendLoader = Callable[[Settings], GenerationBackend]
LORA, OLLAMA, REMOTE = "lora", "ollama", "remote"


def _load_hf_backend(settings: Settings) -> GenerationBackend:
    from app.llm.backends.hf import HFLoraBackend

    return HFLoraBackend.load(settings)


def _load_ollama_backend(settings: Settings) -> GenerationBackend:
    from app.llm.backends.ollama import OllamaBackend

    return OllamaBackend(settings)


def _load_remote_backend(settings: Settings) -> GenerationBackend:
    from app.llm.backends.remote import RemoteBackend

    return RemoteBackend(settings)


@dataclass(frozen=True)
class BackendEntry:
    load: BackendLoader
    component: str  # its name in /health
    configured: Callable[[Settings], bool] = lambda settings: True
    serves_adapters: bool = False  # requests naming adapters go to it when it is active


BACKENDS: Mapping[str, BackendEntry] = {
    LORA: BackendEntry(_load_hf_backend, "lora_model", serves_adapters=True),
    OLLAMA: BackendEntry(_load_ollama_backend, "ollama_service"),
    REMOTE: BackendEntry(_load_remote_backend, "remote_service", lambda settings: bool(settings.remote_base_url),
                         serves_adapters=True),
}


class ModelManager:
    """Loads backends on first use (off the event loop) and switches the active one under a lock."""

    def __init__(self, settings: Settings, backends: Mapping[str, BackendEntry] = BACKENDS) -> None:
        self._settings = settings
        self._entries = {name: entry for name, entry in backends.items() if entry.configured(settings)}
        self._backends: dict[str, GenerationBackend] = {}
        self._load_errors: dict[str, str] = {}
        self._active = settings.start_backend
        if self._active not in self._entries:
            raise SettingsError(self._unknown(self._active, "DEFAULT_BACKEND"))
        self._lock = asyncio.Lock()

    @property
    def active(self) -> str:
        return self._active

    async def start(self) -> None:
        """Load the active backend now, so the first /ask does not pay for it."""
        await self.backend(self._active)

    @property
    def configured(self) -> list[str]:
        """The backends this server can use, by name."""
        return list(self._entries)

    def component(self, name: str) -> str:
        return self._entries[name].component

    def choose(self, requested: str | None, serves_adapters: bool = False) -> str:
        """The backend a request runs on: the one it names, else the active one; a request that needs adapters
        (`serves_adapters`) goes to the active backend when that serves them, else to the local model."""
        if requested is not None:
            if requested not in self._entries:
                raise NotFoundError(self._unknown(requested, "backend"))
            return requested
        if serves_adapters and not self._entries[self._active].serves_adapters:
            return LORA
        return self._active

    async def backend_for(self, requested: str | None, serves_adapters: bool = False) -> GenerationBackend:
        return await self.backend(self.choose(requested, serves_adapters))

    def _unknown(self, name: str, what: str) -> str:
        known = ", ".join(self._entries)
        hint = "; remote needs REMOTE_BASE_URL" if name == REMOTE and REMOTE not in self._entries else ""
        return f"{what} {name!r} is not one of this server's backends: {known}{hint}"

    async def backend(self, name: str) -> GenerationBackend:
        if name not in self._entries:
            raise BadRequestError(self._unknown(name, "backend"))
        loaded = self._backends.get(name)
        if loaded is not None:
            return loaded
        async with self._lock:
            return await self._load_locked(name)

    async def switch(self, name: str) -> str:
        """Make backend `name` the default for later requests; loads it first if needed. A backend that
        cannot serve (it fails to load, or its health check fails) is refused and the active one stays."""
        if name not in self._entries:
            raise NotFoundError(self._unknown(name, "backend"))
        async with self._lock:
            health = await (await self._load_locked(name)).health()
            if not health.ok:
                # Loading Ollama's client always works, so only asking the server tells whether it can serve.
                raise BackendUnavailableError(
                    f"not switched: the {name} backend cannot serve ({health.detail}); "
                    f"later requests stay on the {self._active} backend"
                )
            if self._active != name:
                logger.info("active backend switched: %s -> %s", self._active, name)
            self._active = name
        return name

    async def _load_locked(self, name: str) -> GenerationBackend:
        loaded = self._backends.get(name)
        if loaded is not None:
            return loaded
        try:
            backend = await anyio.to_thread.run_sync(self._entries[name].load, self._settings)
        except AppError as error:
            self._load_errors[name] = error.message
            raise
        except Exception as error:  # anything else from torch/transformers: logged, reported as 503
            self._load_errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            logger.exception("loading the %s backend failed", name)
            raise ModelLoadError(f"the {name} backend could not be loaded: {type(error).__name__}") from None
        self._load_errors.pop(name, None)
        self._backends[name] = backend
        return backend

    def loaded(self, name: str) -> GenerationBackend | None:
        return self._backends.get(name)

    async def switch_adapter(self, adapter: str | None, lora_model_path: str | None) -> str:
        """Make `adapter`, or the adapter folder at `lora_model_path` (loaded first, named after its folder), the
        default of the local model, and the lora backend the active one. A step that fails leaves the default
        and the active backend as they were (a folder loaded before the failure stays loaded, by its name)."""
        host = await self.adapter_host()
        if lora_model_path is not None:
            path = self._adapter_path(lora_model_path)
            adapter = path.name
            await host.load_adapter(adapter, path)
        assert adapter is not None  # the request gives one or the other
        host.check_adapter(adapter)
        await self.switch(LORA)
        host.set_default_adapter(adapter)
        return adapter

    def default_adapter(self) -> str | None:
        """The local model's default adapter, when it is loaded (None: not loaded, or the base model)."""
        backend = self._backends.get(LORA)
        return backend.default_adapter() if isinstance(backend, AdapterHost) else None

    async def adapter_host(self) -> AdapterHost:
        backend = await self.backend(LORA)
        if not isinstance(backend, AdapterHost):
            raise BadRequestError("the local backend does not support adapters")
        return backend

    async def _remote_adapters(self) -> RemoteBackend | None:
        """The remote backend when it serves the adapters (it is the active backend), else None."""
        if self.choose(None, serves_adapters=True) != REMOTE:
            return None
        from app.llm.backends.remote import RemoteBackend

        remote = await self.backend(REMOTE)
        assert isinstance(remote, RemoteBackend)
        return remote

    async def load_adapter(self, name: str, requested_path: str) -> dict[str, Any]:
        """Load an adapter addressed by a request; the path is checked before anything is read. With the remote
        backend active, the engine loads it (vLLM's /v1/load_lora_adapter) from a path on its own machine."""
        remote = await self._remote_adapters()
        if remote is not None:
            await remote.load_adapter(name, requested_path)
            return {"name": name, "path": requested_path, "status": "loaded", "backend": REMOTE}
        path = self._adapter_path(requested_path)
        host = await self.adapter_host()
        await host.load_adapter(name, path)
        return next(entry for entry in host.adapter_catalogue() if entry["name"] == name)

    def _adapter_path(self, requested_path: str) -> Path:
        """A request's adapter folder, checked (containment, allow-list) before anything is read."""
        settings = self._settings
        return resolve_adapter_path(requested_path, settings.lora_adapters_dir, settings.adapter_allowed_root_paths)

    async def unload_adapter(self, name: str) -> None:
        remote = await self._remote_adapters()
        if remote is not None:
            await remote.unload_adapter(name)
            return
        await (await self.adapter_host()).unload_adapter(name)

    async def adapter_catalogue(self) -> dict[str, Any]:
        remote = await self._remote_adapters()
        if remote is not None:
            names = await remote.adapter_names()
            return {"adapters": [{"name": n, "status": "loaded", "backend": REMOTE} for n in names], "mixes": []}
        host = await self.adapter_host()
        return {"adapters": host.adapter_catalogue(), "mixes": host.mix_catalogue()}

    def served_adapter_names(self) -> set[str]:
        """The adapters served now, as far as known without asking anyone: the local model's, and the remote
        engine's from its model list as last read."""
        names: set[str] = set()
        local, remote = self._backends.get(LORA), self._backends.get(REMOTE)
        if isinstance(local, AdapterHost):
            names |= {str(entry["name"]) for entry in local.adapter_catalogue()}
        if remote is not None:
            from app.llm.backends.remote import RemoteBackend

            assert isinstance(remote, RemoteBackend)
            names |= set(remote.cached_adapter_names)
        return names

    async def served_model_names(self) -> tuple[str, list[str]]:
        """The base model's public name and the adapters served now (for /v1/models and /api/tags): the remote
        engine's when it is the active backend (its model list, cached), else the local model's."""
        remote = await self._remote_adapters()
        if remote is not None:
            names = await remote.model_names()
            return names[0], names[1:]
        backend = self._backends.get(LORA)
        adapters: list[str] = (
            [entry["name"] for entry in backend.adapter_catalogue()] if isinstance(backend, AdapterHost) else []
        )
        return self._settings.served_model_name, adapters

    async def component_health(self, name: str) -> ComponentHealth:
        """Health of one backend without loading it (an unloaded one loads on first use)."""
        backend = self._backends.get(name)
        if backend is not None:
            return await backend.health()
        if name in self._load_errors:
            return ComponentHealth(ok=False, detail=f"failed to load: {self._load_errors[name]}")
        if name != LORA:
            # A client is cheap to make (Ollama's, the remote's); asking the server is the only meaningful check.
            return await (await self.backend(name)).health()
        from app.checks import check_base_model, check_default_adapter

        for check in (check_base_model(self._settings), check_default_adapter(self._settings)):
            if not check.ok:
                return ComponentHealth(ok=False, detail=f"{check.detail}: {check.hint}")
        return ComponentHealth(ok=True, detail="not loaded yet (loads on first use)")

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        for backend in self._backends.values():
            facts.update(backend.describe())
        return facts

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
