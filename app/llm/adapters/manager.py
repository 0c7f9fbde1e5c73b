"""Named LoRA adapters on one base model: discovery, loading, LRU unloading, weighted mixes.

Only the generation engine's thread calls the methods that touch the model (`admit`, `arrange`, `load`,
`unload`, the classifier methods); the catalogue (`known`, `describe`) is read from the event loop under `_lock`.

This is the one owner of PEFT adapters on the model, classifiers' included: a classifier's LoRA is attached under
a reserved PEFT name (CLASSIFIER_PREFIX, which no generation adapter or mix name can have), is never listed,
selectable or evicted as a generation adapter, and is active only in its own forward passes (`classifier_hidden`).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import AdapterError, BackendUnavailableError, NotFoundError
from app.llm.adapters.inspect import AdapterInfo, check_adapter_fits, has_adapter_files, inspect_adapter
from app.llm.adapters.merging import WeightMerger
from app.llm.base import AdapterSpec
from app.llm.engine.jobs import BASE_KEY, BASE_MODEL, CLASSIFIER_PREFIX, AdapterChoice

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from typing_extensions import TypeIs

    from app.llm.engine.loop import Admission, Arrangement, CausalLM, ServedModel

logger = logging.getLogger(__name__)

DEFAULT_NAME = "default"
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_MAX_REASON_CHARS = 2000


class AdapterNotFoundError(NotFoundError):
    code = "adapter_not_found"


@dataclass
class AdapterRecord:
    name: str
    path: Path
    info: AdapterInfo
    loaded: bool = False
    loaded_at: float | None = None
    last_used: float = 0.0
    requests_served: int = 0
    evictions: int = 0  # times detached as least recently used (attached again on its next request)
    generation: int = 0  # which attach this is, counted over every adapter: KV computed with it is keyed by it


class AdapterManager:
    def __init__(
        self, model: CausalLM, *, max_loaded: int, default_adapter: str | None, merge_cache_bytes: int
    ) -> None:
        self.model: ServedModel = model  # becomes a PeftModel when the first adapter is attached
        self._max_loaded = max_loaded
        self._default_setting = default_adapter
        self._records: dict[str, AdapterRecord] = {}
        self._mixes: dict[str, AdapterChoice] = {}  # by key
        self._lru: OrderedDict[str, None] = OrderedDict()  # attached PEFT adapter names, least recent first
        self._lock = threading.Lock()
        self._merger = WeightMerger(merge_cache_bytes)
        self._classifiers: set[str] = set()  # PEFT names of attached classifier adapters
        self._in_flight: Counter[AdapterChoice] = Counter()  # the choices of the engine's admitted rows
        self._attaches = itertools.count(1)

    # -- catalogue (any thread) ---------------------------------------------------------------

    @property
    def default_name(self) -> str | None:
        with self._lock:
            if self._default_setting:
                return self._default_setting if self._default_setting in self._records else None
            if DEFAULT_NAME in self._records:
                return DEFAULT_NAME
            return next(iter(self._records)) if len(self._records) == 1 else None

    @property
    def missing_default(self) -> str | None:
        """The default adapter set (DEFAULT_ADAPTER, /switch_model) when it is not loaded: default questions
        cannot be answered until it is."""
        with self._lock:
            setting = self._default_setting
            return setting if setting and setting not in self._records else None

    def set_default(self, name: str) -> None:
        """Make loaded adapter `name` the default of later requests naming none (AdapterNotFoundError otherwise)."""
        with self._lock:
            if name not in self._records:
                raise AdapterNotFoundError(f"adapter '{name}' is not loaded: load it first, or give lora_model_path")
            self._default_setting = name

    def resolve(self, spec: AdapterSpec | None) -> AdapterChoice:
        """The request's choice made concrete (None: the server default), every name checked."""
        if spec is None:
            default = self.default_name
            if default is None and self._default_setting:
                raise BackendUnavailableError(
                    f"the server's default adapter '{self._default_setting}' (DEFAULT_ADAPTER) is not loaded: "
                    'load it again, or name an adapter (or "__base__") in the request'
                )
            return AdapterChoice.single(default) if default else BASE_MODEL
        with self._lock:
            missing = [name for name, _ in spec if name not in self._records]
            known = sorted(self._records)
        if missing:
            raise AdapterNotFoundError(
                f"adapter '{missing[0]}' is not loaded; available: {', '.join(known) or '(none)'}"
            )
        return AdapterChoice(spec)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def describe(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            return [
                {
                    "name": r.name,
                    "path": str(r.path),
                    "status": "loaded" if r.loaded else "unloaded",
                    "rank": r.info.rank,
                    "alpha": r.info.alpha,
                    "target_modules": r.info.target_modules,
                    "size_bytes": r.info.size_bytes,
                    "base_model": r.info.base_model_name_or_path,
                    "loaded_at": r.loaded_at,
                    "uptime_seconds": round(now - r.loaded_at, 1) if r.loaded_at else None,
                    "requests_served": r.requests_served,
                    "evictions": r.evictions,
                }
                for r in sorted(self._records.values(), key=lambda r: r.name)
            ]

    def mix_keys(self) -> list[str]:
        """The weighted combinations built and cached so far."""
        with self._lock:
            return sorted(self._mixes)

    @property
    def merged_adapter(self) -> str | None:
        """The adapter (or mix key) folded into the base weights right now, if any."""
        merged = self._merger.merged
        with self._lock:
            return next((key for key, mix in self._mixes.items() if mix.peft_name == merged), merged)

    def record(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    # -- model changes (engine thread only) ----------------------------------------------------

    def load(self, name: str, path: Path) -> AdapterRecord:
        """Register and attach an adapter. Same name and path again: no-op; same name, other path: refused."""
        if not ADAPTER_NAME_PATTERN.match(name) or name == BASE_KEY:
            raise AdapterError(f"adapter name '{name}' is invalid: use letters, digits, '-' and '_' (max 64)")
        existing = self.record(name)
        if existing is not None:
            if existing.path.resolve() != path.resolve():
                raise AdapterError(f"an adapter named '{name}' is already loaded from another path")
            if not existing.loaded:
                self._attach(existing)
            return existing
        info = inspect_adapter(path)
        record = AdapterRecord(name=name, path=path, info=info)
        self._attach(record)
        with self._lock:
            self._records[name] = record
        return record

    def unload(self, name: str) -> None:
        """Forget an adapter (and the mixes built from it); later requests naming it get 404."""
        with self._lock:
            record = self._records.pop(name, None)
            dependent = [self._mixes.pop(key) for key, mix in list(self._mixes.items()) if name in mix.names]
        if record is None:
            raise AdapterNotFoundError(f"adapter '{name}' is not loaded")
        for peft_name in [name, *(mix.peft_name for mix in dependent)]:
            self._detach(peft_name)

    def admit(self, choice: AdapterChoice) -> Admission:
        """Attach what a new row needs (`RowModel.admit`) and keep it attached while the row runs: eviction
        passes over every adapter an admitted row uses until `release`."""
        from app.llm.engine.loop import Admission

        peft_name = self._activate(choice, pinned=set(self._in_flight) | {choice})
        self._in_flight[choice] += 1
        now = time.time()
        generations = []
        with self._lock:
            for name in choice.names:
                record = self._records[name]  # _activate found every one
                record.requests_served += 1
                record.last_used = now
                generations.append(record.generation)
        return Admission(peft_name, (choice.key, tuple(generations)))

    def release(self, choice: AdapterChoice) -> None:
        self._in_flight[choice] -= 1
        if self._in_flight[choice] <= 0:
            del self._in_flight[choice]

    def arrange(self, peft_names: list[str]) -> Arrangement:
        """How a forward pass over rows with these adapters runs. One adapter (or none) for every row: the plain
        model without PEFT layers, the adapter folded into its weights; where it cannot be folded in exactly
        (int8), PEFT with it active. Different adapters: each LoRA layer adds every row's own delta in batched
        matmuls; for adapters other than plain LoRA, PEFT's mixed batch with one adapter name per row."""
        from app.llm.engine.loop import Arrangement

        if not _is_peft(self.model):
            return Arrangement(self.model)
        distinct = set(peft_names)
        if len(distinct) > 1:
            if self._merger.run_rows(self.model, [None if name == BASE_KEY else name for name in peft_names]):
                return Arrangement(self.model)
            return Arrangement(self.model, peft_names)
        only = distinct.pop() if distinct else BASE_KEY
        if not self._merger.run_plain(self.model, None if only == BASE_KEY else only):
            self.model.set_adapter(only, inference_mode=True)
        return Arrangement(self.model)

    def _activate(self, choice: AdapterChoice, pinned: set[AdapterChoice]) -> str:
        """Attach what `choice` needs and return its PEFT adapter name (BASE_KEY for the base model)."""
        if choice.is_base:
            return BASE_KEY
        if choice.is_mix:
            return self._activate_mix(choice, pinned)
        name = choice.names[0]
        record = self.record(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter '{name}' is not loaded")
        if not record.loaded:
            self._attach(record, pinned)
        self._touch(name)
        return name

    def _activate_mix(self, mix: AdapterChoice, pinned: set[AdapterChoice]) -> str:
        """A weighted combination ΔW = Σ wᵢ·BᵢAᵢ·scalingᵢ, built once (PEFT `cat`: exact) and cached."""
        peft_name = mix.peft_name
        if peft_name in self._lru:
            self._touch(peft_name)
            return peft_name
        components = [self._activate(AdapterChoice.single(name), pinned | {mix}) for name in mix.names]
        self._make_room(pinned | {AdapterChoice.single(name) for name in components})
        self._merger.model_changing()
        self.model.add_weighted_adapter(  # type: ignore[operator]
            adapters=components, weights=list(mix.weights), adapter_name=peft_name, combination_type="cat"
        )
        with self._lock:
            self._mixes[mix.key] = mix
        self._touch(peft_name)
        logger.info("built adapter mix %s", mix.key)
        return peft_name

    def _attach(self, record: AdapterRecord, pinned: set[AdapterChoice] | None = None) -> None:
        self._merger.model_changing()  # the PEFT layers back in the tree: what check_adapter_fits compares with
        check_adapter_fits(self.model, record.info)
        try:
            self._peft_load(record.path, record.name)
        except Exception as error:  # PEFT fails half-way: whatever it injected must go, so the name stays free
            self._remove_peft_adapter(record.name)
            reason = " ".join(str(error).split())[:_MAX_REASON_CHARS] or type(error).__name__
            raise AdapterError(f"adapter '{record.name}' could not be loaded: {reason}") from None
        self.model.eval()
        record.loaded, record.loaded_at, record.generation = True, time.time(), next(self._attaches)
        self._touch(record.name)
        # Evict after attaching, the new adapter counted among the MAX_LOADED_ADAPTERS it may keep.
        self._make_room((pinned or set()) | {AdapterChoice.single(record.name)}, limit=self._max_loaded + 1)
        logger.info("adapter %s attached from %s", record.name, record.path)

    def _peft_load(self, path: Path, peft_name: str, config: LoraConfig | None = None) -> None:
        """PEFT's `from_pretrained` in its two steps (wrap, then load weights), so that a failure while loading
        the weights leaves a PeftModel here whose half-made adapter can be removed. With `config`, the adapter is
        created from it (not from the folder's file) before its weights are loaded."""
        if _is_peft(self.model):
            if config is not None:
                self.model.add_adapter(peft_name, config)  # load_adapter then only loads the weights
            self.model.load_adapter(str(path), adapter_name=peft_name, is_trainable=False)
            return
        from peft import LoraConfig, PeftModel
        from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        if config is None:
            config = LoraConfig.from_pretrained(str(path))
        config.inference_mode = True
        wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # type: ignore[arg-type]
        self.model = wrapper(self.model, config, peft_name)
        self.model.load_adapter(str(path), adapter_name=peft_name, is_trainable=False)

    # -- classifier adapters (engine thread only) ------------------------------------------------

    def attach_classifier(self, peft_name: str, info: AdapterInfo) -> None:
        """Attach a classifier's LoRA (inspected by `inspect_adapter`) under its reserved PEFT name; attached
        already: nothing happens. Its shapes are checked against the model before PEFT touches it. It is made a
        causal-LM LoRA (task type CAUSAL_LM, no modules_to_save): the classifier's head is applied outside PEFT,
        so nothing but LoRA matrices is added to the shared model."""
        if not peft_name.startswith(CLASSIFIER_PREFIX):
            raise ValueError(f"a classifier adapter's PEFT name must start with {CLASSIFIER_PREFIX!r}")
        if peft_name in self._classifiers:
            return
        from peft import LoraConfig

        self._merger.model_changing()  # as in _attach
        check_adapter_fits(self.model, info)
        config = LoraConfig.from_pretrained(str(info.path))
        config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
        try:
            self._peft_load(info.path, peft_name, config)
        except Exception as error:  # as in _attach: nothing half-made may stay
            self._remove_peft_adapter(peft_name)
            reason = " ".join(str(error).split())[:_MAX_REASON_CHARS] or type(error).__name__
            raise AdapterError(f"the classifier adapter '{info.path.name}' could not be loaded: {reason}") from None
        self.model.eval()
        self._classifiers.add(peft_name)
        logger.info("classifier adapter %s attached from %s", peft_name, info.path)

    def detach_classifier(self, peft_name: str) -> None:
        """Remove a classifier's LoRA; the base model and the generation adapters stay."""
        if peft_name not in self._classifiers:
            return
        self._merger.model_changing(detached=peft_name)
        self._remove_peft_adapter(peft_name)
        self._classifiers.discard(peft_name)
        logger.info("classifier adapter %s detached", peft_name)

    def classifier_hidden(self, peft_name: str, rows: list[list[int]]) -> list[torch.Tensor]:
        """One forward pass of `rows` (token ids) with exactly the classifier's adapter active: per row, the final
        hidden state (after the model's final norm, what AutoModelForSequenceClassification's `score` sees) at its
        last token, float32 on the CPU. Rows are right-padded, so each token keeps its unpadded position."""
        import torch

        if peft_name not in self._classifiers or not _is_peft(self.model):
            raise NotFoundError("the classifier was unloaded before its prediction ran")
        # The adapter folded into the weights (cached like a generation adapter's); where it cannot be folded in
        # exactly (int8, non-plain LoRA) PEFT runs with it as the only active adapter.
        if not self._merger.run_plain(self.model, peft_name):
            self.model.set_adapter(peft_name, inference_mode=True)
        root = self.model.get_base_model()
        # The decoder without the LM head (no vocabulary-wide logits); PreTrainedModel types it as a bare Module.
        body: Any = getattr(root, "base_model", root)
        lengths = [len(row) for row in rows]
        width = max(lengths)
        device = next(root.parameters()).device
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        with torch.inference_mode():
            hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(rows), device=device), torch.tensor(lengths, device=device) - 1]
            return list(last.float().cpu())

    def _make_room(self, pinned: set[AdapterChoice], limit: int | None = None) -> None:
        """Unload least recently used adapters until fewer than `limit` (default MAX_LOADED_ADAPTERS) remain."""
        pinned = pinned | set(self._in_flight)
        keep = {choice.peft_name for choice in pinned} | {name for choice in pinned for name in choice.names}
        while len(self._lru) >= (limit or self._max_loaded):
            victim = next((name for name in self._lru if name not in keep), None)
            if victim is None:
                return  # everything attached is needed by this batch: go over the limit for now
            self._detach(victim)
            with self._lock:
                record = self._records.get(victim)  # None for a mix: only adapters are counted
                if record is not None:
                    record.evictions += 1
            logger.info("adapter %s unloaded (least recently used)", victim)

    def _detach(self, peft_name: str) -> None:
        self._merger.model_changing(detached=peft_name)
        self._lru.pop(peft_name, None)
        self._remove_peft_adapter(peft_name)
        with self._lock:
            record = self._records.get(peft_name)
            if record is not None:
                record.loaded, record.loaded_at = False, None
            for key in [key for key, mix in self._mixes.items() if mix.peft_name == peft_name]:
                del self._mixes[key]

    def _remove_peft_adapter(self, peft_name: str) -> None:
        """Delete an adapter from PEFT. PEFT keeps answering for its active adapter, so another one is made
        active first; with no adapter left the LoRA layers are taken out and the plain base model is kept."""
        if not _is_peft(self.model) or peft_name not in self.model.peft_config:
            return
        remaining = [name for name in self.model.peft_config if name != peft_name]
        if not remaining:
            self.model = self.model.unload()
            return
        if self.model.active_adapter == peft_name:
            self.model.set_adapter(remaining[0])
        self.model.delete_adapter(peft_name)

    def _touch(self, peft_name: str) -> None:
        self._lru[peft_name] = None
        self._lru.move_to_end(peft_name)


def _is_peft(model: ServedModel) -> TypeIs[PeftModel]:
    """Whether PEFT's wrapper is on the model (an adapter attached), told without importing peft: only the
    wrapper has `peft_config` at run time (transformers declares it on every model for its own integration)."""
    return hasattr(model, "peft_config")


def discover_adapters(lora_model_path: Path, adapters_dir: Path, listed: dict[str, Path]) -> dict[str, Path]:
    """Adapters known at start: LORA_MODEL_PATH itself as `default`, each adapter sub-folder of the
    adapters folder by its name, and LORA_ADAPTERS entries (these win on a name clash)."""
    found: dict[str, Path] = {}
    if has_adapter_files(lora_model_path):
        found[DEFAULT_NAME] = lora_model_path
    if adapters_dir.is_dir():
        for folder in sorted(p for p in adapters_dir.iterdir() if p.is_dir() and has_adapter_files(p)):
            if ADAPTER_NAME_PATTERN.match(folder.name):
                found.setdefault(folder.name, folder)
    found.update(listed)
    return found
