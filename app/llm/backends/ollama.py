"""The Ollama backend, through langchain-ollama, with errors that say what to run."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import httpx

from app.config import Settings
from app.errors import AppError, BackendTimeoutError, BackendUnavailableError, BadRequestError
from app.llm.base import (
    AdapterSpec,
    ChatMessage,
    ComponentHealth,
    GenerationBackend,
    GenerationParams,
    GenerationResult,
    TextCallback,
    ollama_format,
)

logger = logging.getLogger(__name__)

# A closed <think> block, or an unclosed one cut off by the token budget.
_THINK_BLOCK = re.compile(r"<think>.*?(</think>\s*|$)", re.DOTALL)
_HEALTH_TIMEOUT_SECONDS = 3.0


def pulled_model_names(tags: Any) -> set[str]:
    """Model names in an `/api/tags` answer; a name without a tag also answers for `:latest`."""
    names = {str(model.get("name")) for model in tags.get("models", [])}
    return names | {name.removesuffix(":latest") for name in names}


class OllamaBackend(GenerationBackend):
    """Chat with OLLAMA_MODEL on the server at OLLAMA_BASE_URL."""

    name = "ollama"

    def __init__(self, settings: Settings) -> None:
        from langchain_ollama import ChatOllama

        self.base_url = settings.ollama_base_url
        self.model = settings.ollama_model
        self._timeout = httpx.Timeout(settings.ollama_read_timeout, connect=settings.ollama_connect_timeout)
        # reasoning=False: a thinking model (qwen3) answers directly instead of spending the token budget
        # on a <think> block that would otherwise end up in the answer.
        self._chat = ChatOllama(
            model=self.model, base_url=self.base_url, reasoning=False, client_kwargs={"timeout": self._timeout}
        )

    async def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        from langchain_core.messages import AIMessage

        if adapters:
            raise BadRequestError("LoRA adapters apply to the local model only; this request runs on Ollama")

        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_new_tokens,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        if params.top_k:
            options["top_k"] = params.top_k
        if params.min_p:
            options["min_p"] = params.min_p
        penalties = params.penalties
        if penalties.active:  # Ollama's names; its own defaults (repeat_penalty 1.1) apply when none is asked for
            options.update(presence_penalty=penalties.presence, frequency_penalty=penalties.frequency,
                           repeat_penalty=penalties.repetition, repeat_last_n=penalties.last_n)
        prompt: list[tuple[str, str]] = [(m["role"], m["content"]) for m in messages]
        request: dict[str, Any] = {"options": options}
        if params.constraint is not None:
            request["format"] = ollama_format(params.constraint)
        try:
            if on_text is None:
                reply = await self._chat.ainvoke(prompt, **request)
            else:
                reply = await self._stream(prompt, request, on_text)
        except Exception as error:  # foreign errors become ours here, at the boundary
            raise self._translate(error) from None
        if not isinstance(reply, AIMessage) or not isinstance(reply.content, str):
            raise BackendUnavailableError(f"Ollama at {self.base_url} answered something that is not a chat reply")
        usage: Mapping[str, Any] = reply.usage_metadata or {}
        done_reason = reply.response_metadata.get("done_reason")
        return GenerationResult(
            text=_THINK_BLOCK.sub("", reply.content).strip(),
            model_used="ollama",
            prompt_tokens=int(usage.get("input_tokens", 0)),
            completion_tokens=int(usage.get("output_tokens", 0)),
            finish_reason="length" if done_reason == "length" else "stop",
        )

    async def _stream(self, prompt: list[tuple[str, str]], request: dict[str, Any], on_text: TextCallback) -> Any:
        """Send each new piece to `on_text` (a reasoning model's <think> block is held back);
        return the whole reply as one message. `request`: the chat request's `options` and `format`."""
        reply, sent = None, 0
        async for chunk in self._chat.astream(prompt, **request):
            reply = chunk if reply is None else reply + chunk
            visible = _THINK_BLOCK.sub("", str(reply.content)).lstrip()
            if "<think>" not in visible and len(visible) > sent:
                on_text(visible[sent:])
                sent = len(visible)
        return reply

    def _translate(self, error: Exception) -> AppError:
        import ollama

        if isinstance(error, ollama.ResponseError):
            if error.status_code == 404:
                return BackendUnavailableError(
                    f"the Ollama model '{self.model}' is not available: run `ollama pull {self.model}`"
                )
            return BackendUnavailableError(f"Ollama answered an error ({error.status_code}): {error.error}")
        if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
            return BackendTimeoutError(f"Ollama at {self.base_url} did not answer in time")
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            return BackendUnavailableError(
                f"Ollama is not reachable at {self.base_url}: start it with `ollama serve`"
                f" and make sure the model is pulled (`ollama pull {self.model}`)"
            )
        logger.warning("Ollama call failed: %s: %s", type(error).__name__, error)
        return BackendUnavailableError(f"Ollama at {self.base_url} gave an unusable answer ({type(error).__name__})")

    async def health(self) -> ComponentHealth:
        """Reachable, and OLLAMA_MODEL is among the pulled models (`/api/tags`)."""
        try:
            async with httpx.AsyncClient(timeout=_HEALTH_TIMEOUT_SECONDS) as client:
                response = await client.get(f"{self.base_url}/api/tags")
                response.raise_for_status()
                names = pulled_model_names(response.json())
        except (httpx.HTTPError, ValueError, AttributeError):
            return ComponentHealth(
                ok=False, detail=f"not reachable at {self.base_url}: start it with `ollama serve`"
            )
        if self.model not in names:
            return ComponentHealth(ok=False, detail=f"model '{self.model}' not pulled: run `ollama pull {self.model}`")
        return ComponentHealth(ok=True, detail="reachable, model available")

    def describe(self) -> dict[str, Any]:
        return {"ollama_model": self.model, "ollama_base_url": self.base_url}
