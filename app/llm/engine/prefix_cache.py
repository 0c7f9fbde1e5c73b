"""Prompt KV kept for reuse: a new prompt that begins like an earlier one on the same weights skips that part of
its prefill (every RAG prompt starts with the same template and instructions; a question asked again, or one that
retrieves the same passages, shares far more).

Entries are keyed by `KVKey`: the adapter choice and the load generation of each adapter in it, because a LoRA on
k/v changes the keys and values of every token. An adapter loaded again, even under the same name and from the
same folder, gets a new generation, so KV computed with its former weights is never reused (vLLM #42125 and
llama.cpp #26207 were this bug). Memory is bounded by PREFIX_CACHE_MB, least recently used entries leaving first.
The stored tensors are never written: a reusing row's cache starts from views of them, and every later step
concatenates into new tensors. Engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache

#: (adapter choice key, load generation of each adapter in it): what the prompt's KV was computed with.
KVKey = tuple[str, tuple[int, ...]]
#: Each layer's keys and values, (1, heads, tokens, head size).
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class _Entry:
    key: KVKey
    tokens: torch.Tensor  # the prompt's token ids, 1-D
    layers: LayerKV
    size_bytes: int


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id, least recently used first
        self._bytes = 0
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0

    def stats(self) -> dict[str, int]:
        """For /model_info (read from the event loop: plain counters, at worst one step old)."""
        return {"max_bytes": self._max_bytes, "bytes": self._bytes, "entries": len(self._entries),
                "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens}

    def longest(self, key: KVKey, prompt: list[int], block: int) -> tuple[int, LayerKV]:
        """The most prompt tokens, a multiple of `block`, whose KV an entry on `key` holds (never all of them: the
        last one's logits are needed), and views of that KV; (0, []) when none begins like the prompt.

        `block` is the engine's prefill chunk: a prompt prefilled without the cache is computed in chunks starting
        at multiples of it, so reusing whole chunks and prefilling the rest in the same chunks computes exactly
        the same numbers (a seeded answer stays the same answer; reusing a part chunk changes the last bits,
        which in bfloat16 can change a sampled token, or even a greedy one)."""
        self.lookups += 1
        if not self._entries or len(prompt) < 2:
            return 0, []
        matches = [(entry, shared // block * block) for entry, shared in self._shared_beginnings(
            key, torch.tensor(prompt[:-1]))]
        best, best_length = max(matches, key=lambda match: match[1], default=(None, 0))
        if best is None or best_length == 0:
            return 0, []
        self._entries.move_to_end(id(best))
        self.hits += 1
        self.reused_tokens += best_length
        return best_length, [(keys[:, :, :best_length], values[:, :, :best_length]) for keys, values in best.layers]

    def add(self, key: KVKey, prompt: list[int], cache: DynamicCache) -> None:
        """Keep the KV of a prompt just prefilled (`cache` holds exactly its tokens)."""
        if self._max_bytes <= 0:
            return
        tokens = torch.tensor(prompt)
        for entry, shared in self._shared_beginnings(key, tokens):
            if shared == len(tokens):
                self._entries.move_to_end(id(entry))
                return  # an entry holds this prompt already
        layers: LayerKV = []
        for layer in cache.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
                return  # a layer kind this cache cannot keep
            layers.append((keys, values))
        size = sum(keys.nbytes + values.nbytes for keys, values in layers)
        if size > self._max_bytes:
            return
        entry = _Entry(key, tokens, layers, size)
        self._entries[id(entry)] = entry
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size_bytes

    def _shared_beginnings(self, key: KVKey, tokens: torch.Tensor) -> list[tuple[_Entry, int]]:
        """Each entry on `key`, with how many of `tokens` it begins with."""
        return [(entry, _common_prefix(entry.tokens, tokens)) for entry in self._entries.values() if entry.key == key]


def _common_prefix(first: torch.Tensor, second: torch.Tensor) -> int:
    length = min(len(first), len(second))
    differ = (first[:length] != second[:length]).nonzero()
    return length if len(differ) == 0 else int(differ[0])
