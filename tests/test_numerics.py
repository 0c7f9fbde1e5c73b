"""The numeric path: chosen by name, or by `auto` from the measured cost of a typical answer on this CPU; every path
`auto` may choose keeps the model's quality; each choice says why."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import EMBEDDED_BASE_MODEL, Settings
from app.llm.model_source import resolve_base_model
from app.llm.numerics.calibration import PathCost, TypicalAnswer, linear_shapes, measure_path_costs
from app.llm.numerics.choice import CpuCapability, auto_candidates, choose_numeric_path
from tests.conftest import REPO_ROOT

AVX2_ONLY = CpuCapability(kernel_level="AVX2", avx512_bf16=False, amx=False, vnni=False)
SAPPHIRE_RAPIDS = CpuCapability(kernel_level="AVX512", avx512_bf16=True, amx=True, vnni=True)
TYPICAL = TypicalAnswer(prompt_tokens=700, answer_tokens=100)

pytestmark = pytest.mark.numerics


def _costs_table(seconds: dict[str, tuple[float, float]]):  # type: ignore[no-untyped-def]
    """A `measure` that reports these (prefill seconds, decode seconds per token) and records what it was asked."""
    asked: list[tuple[str, ...]] = []

    def measure(paths: tuple[str, ...], typical: TypicalAnswer) -> tuple[PathCost, ...]:
        asked.append(paths)
        return tuple(PathCost(path, *seconds[path]) for path in paths)

    return measure, asked


def test_auto_takes_the_path_with_the_cheapest_whole_answer_not_the_fastest_prefill() -> None:
    # bfloat16 prefills fastest, but int8 decodes 100 tokens in far less time: the answer is cheaper in int8.
    measure, asked = _costs_table({"float32": (9.0, 0.30), "bfloat16": (2.0, 0.25), "int8": (3.0, 0.08)})
    path = choose_numeric_path(("auto", "auto"), "cpu", measure, TYPICAL, capability=SAPPHIRE_RAPIDS)
    assert (path.name, path.dtype, path.quantization) == ("int8", "bfloat16", "int8-weight-only")
    assert asked == [("float32", "bfloat16", "int8")]
    assert "700-token prompt" in path.reason and "int8 11.00 s" in path.reason and "bfloat16 27.00 s" in path.reason
    described = path.describe()
    assert described["typical_answer"] == {"prompt_tokens": 700, "answer_tokens": 100}
    assert {row["path"]: row["decode_tokens_per_second"] for row in described["measured"]} == {  # type: ignore[union-attr]
        "float32": 3.3, "bfloat16": 4.0, "int8": 12.5}
    # With a short answer the prefill dominates, and bfloat16 wins.
    short = choose_numeric_path(("auto", "auto"), "cpu", measure, TypicalAnswer(700, 2), capability=SAPPHIRE_RAPIDS)
    assert short.name == "bfloat16"


def test_a_near_tie_keeps_the_more_precise_path_and_emulated_bfloat16_is_never_tried() -> None:
    measure, asked = _costs_table({"float32": (1.0, 0.0205), "int8": (1.0, 0.020)})
    path = choose_numeric_path(("auto", "auto"), "cpu", measure, TYPICAL, capability=AVX2_ONLY)
    assert path.name == "float32"  # 3.05 s against 3.0 s: within 5%
    assert asked == [("float32", "int8")] and "bfloat16 not tried" in path.reason
    assert auto_candidates(SAPPHIRE_RAPIDS) == ("float32", "bfloat16", "int8")


def test_a_named_path_is_kept_without_measuring_and_a_slow_choice_is_named() -> None:
    def never(paths: tuple[str, ...], typical: TypicalAnswer) -> tuple[PathCost, ...]:
        raise AssertionError("a named path measures nothing")

    slow = choose_numeric_path(("bfloat16", "TORCH_DTYPE=bfloat16"), "cpu", never, TYPICAL, capability=AVX2_ONLY)
    assert slow.dtype == "bfloat16" and slow.reason.startswith("TORCH_DTYPE=bfloat16") and "slower" in slow.reason
    fast = choose_numeric_path(("bfloat16", "NUMERIC_PATH=bfloat16"), "cpu", never, TYPICAL,
                               capability=SAPPHIRE_RAPIDS)
    assert "slower" not in fast.reason and fast.describe() == {
        "name": "bfloat16", "reason": "NUMERIC_PATH=bfloat16", "cpu": SAPPHIRE_RAPIDS.summary()}
    int8 = choose_numeric_path(("int8", "NUMERIC_PATH=int8"), "cpu", never, TYPICAL, capability=AVX2_ONLY)
    assert (int8.dtype, int8.quantization) == ("bfloat16", "int8-weight-only") and "emulates" in int8.reason


def test_the_design_cards_names_map_onto_numeric_paths_and_contradictions_are_refused() -> None:
    def settings(**values: object) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    assert settings().numeric_path_request == ("auto", "auto")
    assert settings(enable_quantization=True).numeric_path_request[0] == "int8"
    assert settings(torch_dtype="float32").numeric_path_request == ("float32", "TORCH_DTYPE=float32")
    assert settings(numeric_path="INT8").numeric_path_request == ("int8", "NUMERIC_PATH=int8")
    assert settings(numeric_path="float32", torch_dtype="float32").numeric_path_request[0] == "float32"
    for values, words in (({"numeric_path": "float32", "enable_quantization": True}, "ENABLE_QUANTIZATION=true"),
                          ({"numeric_path": "int8", "torch_dtype": "float32"}, "disagree")):
        with pytest.raises(ValueError, match=words):
            settings(**values)


def test_the_measurement_reads_the_models_own_layers_and_orders_paths_as_the_cpu_runs_them() -> None:
    shapes = linear_shapes(resolve_base_model(EMBEDDED_BASE_MODEL, None), None)
    # SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down; the head is the tied 49,152-token embedding.
    assert dict(shapes.body) == {(576, 576): 60, (576, 192): 60, (576, 1536): 60, (1536, 576): 30}
    assert shapes.head == (576, 49152)
    costs = {cost.path: cost for cost in measure_path_costs(shapes, ("float32", "int8"), TYPICAL, 512)}
    assert all(0 < cost.prefill_seconds < 60 and 0 < cost.decode_seconds_per_token < 1 for cost in costs.values())
    # A decoded token reads every weight once: int8's quarter of float32's bytes is faster on every CPU kind.
    assert costs["int8"].decode_seconds_per_token < costs["float32"].decode_seconds_per_token


@pytest.mark.slow
def test_every_path_auto_may_choose_keeps_perplexity_within_two_percent_of_bfloat16() -> None:
    """The quality gate: the embedded model's perplexity over the bench corpus (English and Chinese), per path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.llm.numerics.choice import CPU_PATHS
    from app.llm.numerics.int8 import quantize_linears_int8

    source = resolve_base_model(EMBEDDED_BASE_MODEL, None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    corpus = sorted(glob.glob(str(REPO_ROOT / "bench/data/corpus/*/*.md")))
    texts = [Path(name).read_text(encoding="utf-8") for name in corpus]
    ids = [tokenizer(text, return_tensors="pt").input_ids[:, :512] for text in texts]

    def perplexity(path: str) -> float:
        spec = CPU_PATHS[path]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec.dtype)).eval()
        if spec.quantization == "int8-weight-only":
            quantize_linears_int8(model)
        loss = tokens = 0.0
        with torch.inference_mode():
            for row in ids:
                logits = model(row).logits[0, :-1].float()
                loss -= torch.log_softmax(logits, -1).gather(1, row[0, 1:, None]).sum().item()
                tokens += row.shape[1] - 1
        return math.exp(loss / tokens)

    reference = perplexity("bfloat16")
    for path in auto_candidates(SAPPHIRE_RAPIDS):
        assert perplexity(path) <= reference * 1.02, path


def test_detection_follows_torchs_own_kernel_level() -> None:
    """A process whose torch is held to AVX2 kernels (ATEN_CPU_CAPABILITY) chooses as an AVX2 machine would."""
    script = ("import json; from app.llm.numerics.choice import CpuCapability, auto_candidates; "
              "c = CpuCapability.detect(); print(json.dumps([c.kernel_level, c.native_bf16, auto_candidates(c)]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["AVX2", False, ["float32", "int8"]]


def test_config_check_says_which_path_and_why() -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("NUMERIC_PATH", None)
    out = subprocess.run([sys.executable, "start_lora_rag.py", "--config-check"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=180, env=env).stdout
    line = next(line for line in out.splitlines() if "numeric path" in line)
    assert "auto:" in line and "answers fastest here" in line and "bfloat16 not tried" in line and "avx2" in line
    assert "float32 " in line and "int8 " in line  # both candidates' measured seconds
