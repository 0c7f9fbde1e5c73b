"""What a typical answer costs on this CPU in each numeric path, measured on the served model's own layer shapes.

Nearly all of a decoder's arithmetic and all of its weight bytes are in its Linear layers, and which path is
fastest depends on their shapes, the phase and the CPU: a prefill is compute-bound (bfloat16 with AMX or
AVX512-BF16 wins), a decoded token is memory-bound (it reads every weight once: int8 reads half the bytes of
bfloat16), and torch's one-row bfloat16 kernels may reach only a third of the memory bandwidth. So the cost of a
typical answer (its prompt's prefill plus its decoded tokens) is measured, not guessed: each distinct Linear
shape of the model (read from its config on the meta device, so no weight is loaded twice) runs in each
candidate path, a prefill chunk at once and one row at a time over a few copies, never faster than reading its
weights at the memory bandwidth measured here (a decode step reads them from memory, not from a cache). Attention,
norms and the sampler are the same in every path and left out. It takes about a second for SmolLM2-135M and a
few for a 1.5B model, once per process and model shape.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# A decoded token reads every weight from memory. Copies of one shape that together exceed a cache keep the
# measurement from timing one cached copy; the bandwidth floor covers small shapes, whose copies would fit anyway.
_DECODE_WORKING_SET_BYTES = 64 * 2**20
_MAX_COPIES = 16
_BANDWIDTH_PROBE_BYTES = 256 * 2**20  # larger than any CPU's last-level cache
_TEMPLATE_AND_QUESTION_TOKENS = 150
_TYPICAL_ANSWER_TOKENS = 128
_MIN_TIMED_SECONDS = 0.03  # each shape and phase is timed for at least this long (timer resolution, noise)


@dataclass(frozen=True)
class TypicalAnswer:
    """The answer `auto` optimises: a RAG prompt's tokens and the tokens answered."""

    prompt_tokens: int
    answer_tokens: int


@dataclass(frozen=True)
class PathCost:
    """One numeric path's measured cost of the typical answer's phases."""

    path: str
    prefill_seconds: float  # the whole prompt
    decode_seconds_per_token: float

    def answer_seconds(self, typical: TypicalAnswer) -> float:
        return self.prefill_seconds + self.decode_seconds_per_token * typical.answer_tokens


@dataclass(frozen=True)
class LinearShapes:
    """The model's Linear layers by (in, out) shape, and its output head, which a prefill runs on one row only."""

    body: tuple[tuple[tuple[int, int], int], ...]  # ((in_features, out_features), count), sorted
    head: tuple[int, int] | None


@functools.lru_cache(maxsize=16)
def linear_shapes(source: str, cache_dir: str | None) -> LinearShapes:
    """Every nn.Linear of the model at `source` (a folder or hub id, as from_pretrained takes it), counted by shape.
    Built on the meta device from the config: nothing is allocated."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    head_module = model.get_output_embeddings()
    head = (head_module.in_features, head_module.out_features) if isinstance(head_module, nn.Linear) else None
    counts: Counter[tuple[int, int]] = Counter(
        (module.in_features, module.out_features) for module in model.modules()
        if type(module) is nn.Linear and module is not head_module
    )
    return LinearShapes(tuple(sorted(counts.items())), head)


def measure_path_costs(shapes: LinearShapes, paths: tuple[str, ...], typical: TypicalAnswer,
                       prefill_chunk_tokens: int) -> tuple[PathCost, ...]:
    """The typical answer's prefill and decode cost in each of `paths` (names from numerics.choice.CPU_PATHS), on
    the torch threads this process uses. Cached per process: every load of one model shape measures once."""
    import torch

    return _measured(shapes, paths, typical, prefill_chunk_tokens, torch.get_num_threads())


@functools.lru_cache(maxsize=16)
def _measured(shapes: LinearShapes, paths: tuple[str, ...], typical: TypicalAnswer, prefill_chunk_tokens: int,
              threads: int) -> tuple[PathCost, ...]:
    chunks = math.ceil(typical.prompt_tokens / prefill_chunk_tokens)
    bandwidth = _memory_bytes_per_second()
    costs = []
    for path in paths:
        kind = _LAYER_KINDS[path]
        decode = prefill_per_token = 0.0
        for shape, count in shapes.body:
            decode += count * _one_row_seconds(kind, shape, bandwidth)
            prefill_per_token += count * _prefill_seconds_per_row(kind, shape, min(prefill_chunk_tokens,
                                                                                   typical.prompt_tokens))
        head = _one_row_seconds(kind, shapes.head, bandwidth) if shapes.head else 0.0
        # The engine computes logits for a prefill chunk's last position only (logits_to_keep=1).
        prefill = prefill_per_token * typical.prompt_tokens + head * chunks
        costs.append(PathCost(path, prefill, decode + head))
    return tuple(costs)


@dataclass(frozen=True)
class _LayerKind:
    """How one path builds a Linear layer, and the bytes a weight takes in it."""

    make: Callable[[tuple[int, int]], nn.Module]
    bytes_per_weight: int


def _float_layer(dtype_name: str) -> Callable[[tuple[int, int]], nn.Module]:
    def make(shape: tuple[int, int]) -> nn.Module:
        import torch
        from torch import nn

        layer = nn.Linear(*shape, bias=False, dtype=getattr(torch, dtype_name), device="meta").to_empty(device="cpu")
        # Weights of any value run at the same speed (no kernel skips zeros); a constant is the cheapest to make.
        nn.init.constant_(layer.weight, 0.01)
        return layer.requires_grad_(False)

    return make


def _int8_layer(shape: tuple[int, int]) -> nn.Module:
    from torch import nn

    from app.llm.numerics.int8 import WeightOnlyInt8Linear

    float_layer = _float_layer("float32")(shape)
    assert isinstance(float_layer, nn.Linear)
    return WeightOnlyInt8Linear(float_layer)


_LAYER_KINDS: dict[str, _LayerKind] = {
    "float32": _LayerKind(_float_layer("float32"), 4),
    "bfloat16": _LayerKind(_float_layer("bfloat16"), 2),
    "int8": _LayerKind(_int8_layer, 1),
}


def _activation(rows: int, features: int, layer: nn.Module) -> torch.Tensor:
    import torch

    weight = next(iter(layer.parameters()), None)
    dtype = torch.float32 if weight is None or weight.numel() == 0 else weight.dtype
    return torch.randn(rows, features).to(dtype)


def _memory_bytes_per_second() -> float:
    """How fast this process reads memory: the best of a few sums over a tensor larger than any cache."""
    import torch

    probe = torch.ones(_BANDWIDTH_PROBE_BYTES // 4)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        probe.sum()
        best = min(best, time.perf_counter() - start)
    return _BANDWIDTH_PROBE_BYTES / best


def _one_row_seconds(kind: _LayerKind, shape: tuple[int, int], bandwidth: float) -> float:
    """One row through a layer of `shape` whose weights come from memory, as in a decode step."""
    weight_bytes = shape[0] * shape[1] * kind.bytes_per_weight
    copies = [kind.make(shape) for _ in range(max(2, min(_MAX_COPIES, _DECODE_WORKING_SET_BYTES // weight_bytes)))]
    return max(_seconds_per_call(copies, _activation(1, shape[0], copies[0])), weight_bytes / bandwidth)


def _prefill_seconds_per_row(kind: _LayerKind, shape: tuple[int, int], rows: int) -> float:
    """One prompt token through a layer of `shape`, in a chunk of `rows` tokens as the engine prefills (kernels'
    efficiency depends on it: weight-only int8 falls behind bfloat16 as chunks grow)."""
    layer = kind.make(shape)
    return _seconds_per_call([layer], _activation(rows, shape[0], layer)) / rows


def _seconds_per_call(layers: list[nn.Module], x: torch.Tensor) -> float:
    """The mean time of `x` through one of `layers`, taken in turn after a warm-up call of each (first calls pick
    and pack kernels), over at least _MIN_TIMED_SECONDS and two calls."""
    import torch

    with torch.inference_mode():
        for layer in layers:
            layer(x)
        calls, start = 0, time.perf_counter()
        while True:
            for layer in layers:
                layer(x)
            calls += len(layers)
            elapsed = time.perf_counter() - start
            if elapsed >= _MIN_TIMED_SECONDS and calls >= 2:
                return elapsed / calls


def typical_answer(retrieval_top_k: int, chunk_size: int, max_new_tokens: int) -> TypicalAnswer:
    """The answer `auto` optimises for these settings: a prompt of RETRIEVAL_TOP_K chunks of CHUNK_SIZE characters
    (about 3.5 characters a token across English and Chinese) plus the template and question, and an answer of
    128 tokens (or MAX_NEW_TOKENS, if smaller). With the defaults: 721 + 128, the engine issue's 715 + 128."""
    return TypicalAnswer(retrieval_top_k * chunk_size * 2 // 7 + _TEMPLATE_AND_QUESTION_TOKENS,
                         min(max_new_tokens, _TYPICAL_ANSWER_TOKENS))


def measure_for_model(source: str, cache_dir: str | None, prefill_chunk_tokens: int
                      ) -> Callable[[tuple[str, ...], TypicalAnswer], tuple[PathCost, ...]]:
    """What numerics.choice asks of `auto`: the candidates' costs for the model at `source` (its shapes read only
    when asked, so an explicit path costs nothing)."""

    def measure(paths: tuple[str, ...], typical: TypicalAnswer) -> tuple[PathCost, ...]:
        return measure_path_costs(linear_shapes(source, cache_dir), paths, typical, prefill_chunk_tokens)

    return measure
