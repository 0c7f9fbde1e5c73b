"""Classifier training (`--task classification`): data checks, bad inputs through the real CLI, real training
runs of a few steps on the embedded SmolLM2 model in both layouts, the written adapter + head reloaded onto a
fresh causal LM with PEFT giving the trainer's own probabilities, and the shipped demo classifier."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.config import EMBEDDED_BASE_MODEL
from app.llm.adapters.inspect import check_adapter_fits, inspect_adapter
from app.llm.model_source import resolve_base_model
from app.training import ClassifierConfig, ClassifierReport, FinetuneError, TrainingDataError, run_classifier_training
from app.training.classification import load_labelled_file, parse_labelled_record, stratified_split

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "finetune_lora.py"
DEMO_DATA = REPO_ROOT / "data" / "demo_intent.jsonl"
DEMO_CLASSIFIER = REPO_ROOT / "classifiers" / "demo-intent"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def demo_rows(labels: tuple[str, ...], per_label: int) -> list[dict[str, str]]:
    """The first `per_label` demo texts of each of `labels`, in file order."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    return [row for label in labels for row in [r for r in rows if r["label"] == label][:per_label]]


# --- data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('{"text": "hi", "label": ', "not valid JSON"),
        ('["hi", "other"]', "expected a JSON object"),
        ('{"text": "hi"}', "no 'label'"),
        ('{"label": "other"}', "no 'text'"),
        ('{"question": "hi", "answer": "yo"}', "no 'text' and no 'label'"),
        ('{"text": 3, "label": "other"}', '"text" must be a string, got int'),
        ('{"text": "hi", "label": ["a"]}', '"label" must be a string, got list'),
        ('{"text": "   ", "label": "other"}', '"text" is blank'),
        ('{"text": "hi", "label": ""}', '"label" is blank'),
    ],
)
def test_bad_lines_say_what_is_wrong(line: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_labelled_record(line)


def test_text_and_label_are_stripped_and_other_fields_ignored() -> None:
    assert parse_labelled_record('{"text": " 退款 ", "label": "billing ", "id": 7}') == ("退款", "billing")


def test_a_single_label_is_refused(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "billing"} for i in range(5)])
    with pytest.raises(TrainingDataError, match="only one label \\('billing'\\) in 5 lines"):
        load_labelled_file(data)


def test_the_split_is_stratified_seeded_and_keeps_every_label_on_both_sides(tmp_path: Path) -> None:
    rows = [{"text": f"b{i}", "label": "billing"} for i in range(20)] + [
        {"text": f"s{i}", "label": "shipping"} for i in range(5)
    ]
    examples = load_labelled_file(write_jsonl(tmp_path / "data.jsonl", rows))
    train, held_out = stratified_split(examples, 0.2, seed=3)
    assert sorted(e.label for e in held_out) == ["billing"] * 4 + ["shipping"]
    assert len(train) == 20 and {e.text for e in train} | {e.text for e in held_out} == {r["text"] for r in rows}
    assert stratified_split(examples, 0.2, seed=3) == (train, held_out)
    assert stratified_split(examples, 0.2, seed=4) != (train, held_out)
    assert stratified_split(examples, 0.0, seed=3) == (examples, [])
    with pytest.raises(TrainingDataError, match="single example: 'shipping'"):
        stratified_split(examples[:21], 0.2, seed=3)


@pytest.mark.parametrize(("stem", "ok"), [("demo-intent", True), ("v1.2_x", True), ("../x", False), (".x", False)])
def test_the_stem_must_be_a_plain_file_name(stem: str, ok: bool) -> None:
    config = ClassifierConfig(data=DEMO_DATA, stem=stem)
    if ok:
        config.check()
    else:
        with pytest.raises(FinetuneError, match="--stem"):
            config.check()


# --- the command line: bad inputs -------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Offline, and run from a scratch folder so no developer `.env` is read.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


BAD_FILES: dict[str, tuple[str, str]] = {
    "one label only": (
        '{"text": "refund me", "label": "billing"}\n{"text": "退款", "label": "billing"}\n',
        "only one label",
    ),
    "missing field": ('{"text": "refund me", "label": "billing"}\n{"text": "where is it"}\n', "line 2: no 'label'"),
    "non-string text": (
        '{"text": "refund me", "label": "billing"}\n{"text": 42, "label": "x"}\n',
        'line 2: "text" must',
    ),
    "empty file": ("\n   \n", 'is empty: expected one JSON object per line, like {"text": "...", "label": "..."}'),
    "bad JSON line": (
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "lab\n',
        "line 3: not valid",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_ends_with_one_clear_message_before_any_model_loads(tmp_path: Path, case: str) -> None:
    content, expected = BAD_FILES[case]
    data = tmp_path / "labelled.jsonl"
    data.write_text(content, encoding="utf-8")
    output_dir = tmp_path / "classifier"
    output_dir.mkdir()
    (output_dir / "training_report.json").write_text('{"an": "earlier classifier"}', encoding="utf-8")
    before = snapshot(tmp_path)

    # A base model that does not exist: had it been looked at, the error would be about it, not the data.
    result = run_cli(
        "--task", "classification", "--data", str(data), "--output_dir", str(output_dir),
        "--model_name", str(tmp_path / "no-such-model"), cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert "no-such-model" not in result.stderr and "loading the base model" not in result.stderr
    assert snapshot(tmp_path) == before, "nothing may be written, not even a temporary folder"


def test_classification_options_are_refused_for_generation(tmp_path: Path) -> None:
    result = run_cli("--data", str(DEMO_DATA), "--legacy-layout", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --stem and --legacy-layout are options of --task classification"
    assert list(tmp_path.iterdir()) == []


# --- real training runs -----------------------------------------------------------------------------

LABELS = ("billing", "shipping", "technical_support")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "labelled.jsonl", demo_rows(LABELS, 8))


@pytest.fixture(scope="module")
def trained(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassifierReport, Path]:
    """A few real steps on the embedded model, in the default layout, over an earlier classifier's folder."""
    output_dir = tmp_path_factory.mktemp("train") / "intent"
    output_dir.mkdir()
    (output_dir / "training_report.json").write_text("{}", encoding="utf-8")
    (output_dir / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    # float32: the trainer's probabilities are compared with a float32 reload, on every CPU kind.
    config = ClassifierConfig(data=small_data, output_dir=output_dir, max_steps=6, batch_size=6, eval_split=0.25,
                              weights_dtype="float32")
    return run_classifier_training(config, show_progress=False), output_dir


@pytest.mark.slow
def test_training_writes_the_default_layout(trained: tuple[ClassifierReport, Path]) -> None:
    from safetensors import safe_open

    report, output_dir = trained
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "intent.head.safetensors", "intent.labels.json", "intent.lora", "training_report.json",
    ]  # fmt: skip
    assert sorted(p.name for p in (output_dir / "intent.lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in output_dir.parent.iterdir()] == ["intent"], "no temporary folder is left behind"
    with safe_open(str(output_dir / "intent.head.safetensors"), framework="pt") as head:
        shapes = {key: tuple(head.get_slice(key).get_shape()) for key in head.keys()}
    assert shapes == {"score.weight": (3, 576), "score.bias": (3,)}
    assert json.loads((output_dir / "intent.labels.json").read_text(encoding="utf-8")) == sorted(LABELS)

    saved = json.loads((output_dir / "training_report.json").read_text(encoding="utf-8"))
    assert saved["task"] == "classification" and saved["labels"] == sorted(LABELS)
    assert saved["files"] == {
        "adapter": "intent.lora",
        "head": "intent.head.safetensors",
        "labels": "intent.labels.json",
    }
    assert saved["class_counts"] == {label: {"train": 6, "held_out": 2, "total": 8} for label in LABELS}
    assert 0 <= saved["eval_accuracy"] <= 1 and saved["majority_baseline_accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert saved["eval_accuracy"] == report.eval_accuracy and len(saved["eval_predictions"]) == 6
    assert saved["steps"] == 6 and len(saved["train_losses"]) == 6 and saved["wall_seconds"] > 0
    assert saved["arguments"]["max_steps"] == 6 and saved["arguments"]["data"].endswith("labelled.jsonl")


@pytest.mark.slow
def test_the_adapter_passes_the_services_checks(trained: tuple[ClassifierReport, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    _, output_dir = trained
    config = json.loads((output_dir / "intent.lora" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == EMBEDDED_BASE_MODEL
    assert config["bias"] == "none" and not config["modules_to_save"] and config["task_type"] == "FEATURE_EXTRACTION"
    info = inspect_adapter(output_dir / "intent.lora")
    assert info.rank == 8 and info.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = AutoModelForCausalLM.from_pretrained(resolve_base_model(EMBEDDED_BASE_MODEL, None), dtype=torch.float32)
    check_adapter_fits(model, info)


def classify(model: Any, tokenizer: Any, head: dict[str, Any], texts: list[str], padding_side: str) -> Any:
    """Probabilities computed as a serving side would: the causal LM's last hidden state (after the final norm)
    at the last non-padding token, through the head; written here independently of the trainer's code."""
    import torch

    tokenizer.padding_side = padding_side
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                    output_hidden_states=True)  # fmt: skip
    states = out.hidden_states[-1]
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last position whose mask is 1
    pooled = states[torch.arange(len(texts)), last].float()
    return torch.softmax(pooled @ head["score.weight"].T + head["score.bias"], dim=-1)


def load_classifier(folder: Path, stem: str, dtype: str, *, use_load_adapter: bool = False) -> tuple[Any, Any, Any]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_base_model(EMBEDDED_BASE_MODEL, None)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    if use_load_adapter:
        model.load_adapter(str(folder / f"{stem}.lora"), adapter_name="clf")
    else:
        model = PeftModel.from_pretrained(model, str(folder / f"{stem}.lora"))
    return model.eval(), tokenizer, load_file(str(folder / f"{stem}.head.safetensors"))


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft 0.21
def test_the_written_classifier_reloads_onto_a_fresh_causal_lm_with_the_trainers_probabilities(
    trained: tuple[ClassifierReport, Path],
) -> None:
    import torch

    report, output_dir = trained
    texts = [row["text"] for row in report.eval_predictions]
    expected = torch.tensor([row["probabilities"] for row in report.eval_predictions])
    batch_size = report.arguments["batch_size"]

    # In the dtype it was trained in, batched as the trainer batched: the same numbers.
    model, tokenizer, head = load_classifier(output_dir, "intent", report.weights_dtype)
    for start in range(0, len(texts), batch_size):
        got = classify(model, tokenizer, head, texts[start : start + batch_size], "right")
        assert torch.allclose(got, expected[start : start + batch_size], atol=1e-4), (got, expected)

    # Through transformers' own load_adapter, padded left or right, in one batch: the same within rounding.
    model, tokenizer, head = load_classifier(output_dir, "intent", "float32", use_load_adapter=True)
    right, left = classify(model, tokenizer, head, texts, "right"), classify(model, tokenizer, head, texts, "left")
    assert torch.allclose(right, left, atol=1e-4)
    assert torch.allclose(right, expected, atol=1e-3)


@pytest.mark.slow
def test_the_legacy_layout_through_the_cli(small_data: Path, tmp_path: Path) -> None:
    import torch

    result = run_cli(
        "--task", "classification", "--data", str(small_data), "--output_dir", "out", "--stem", "intent-v1",
        "--legacy-layout", "--max_steps", "2", "--batch_size", "6", "--weights_dtype", "float32", "--quiet",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "held-out accuracy (6 texts)" in result.stdout and "majority label" in result.stdout
    output_dir = tmp_path / "out"
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "intent-v1.head.pt", "intent-v1.head.pt.pkl", "intent-v1.lora", "training_report.json",
    ]  # fmt: skip
    state = torch.load(output_dir / "intent-v1.head.pt", weights_only=True)
    assert {key: tuple(value.shape) for key, value in state.items()} == {"score.weight": (3, 576), "score.bias": (3,)}
    raw = (output_dir / "intent-v1.head.pt.pkl").read_bytes()
    opcodes = {opcode.name for opcode, _, _ in pickletools.genops(raw)}
    assert not opcodes & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
    assert pickle.loads(raw) == {label: index for index, label in enumerate(sorted(LABELS))}
    report = json.loads((output_dir / "training_report.json").read_text(encoding="utf-8"))
    assert report["files"]["head"] == "intent-v1.head.pt" and report["eval_accuracy"] is not None
    assert report["weights_dtype"] == "float32"


# --- the shipped demo classifier --------------------------------------------------------------------


def test_the_demo_data_is_mixed_chinese_and_english_in_every_label() -> None:
    examples = load_labelled_file(DEMO_DATA)
    labels = sorted({e.label for e in examples})
    assert len(labels) == 5
    for label in labels:
        texts = [e.text for e in examples if e.label == label]
        chinese = [t for t in texts if any("\u4e00" <= c <= "\u9fff" for c in t)]
        assert len(texts) >= 40 and 0.3 < len(chinese) / len(texts) < 0.7, label
    assert len({e.text.lower() for e in examples}) == len(examples), "no duplicate texts"


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft 0.21
def test_the_shipped_demo_classifier_loads_and_beats_the_majority_class() -> None:
    import torch

    report = json.loads((DEMO_CLASSIFIER / "training_report.json").read_text(encoding="utf-8"))
    assert report["eval_accuracy"] >= report["majority_baseline_accuracy"] + 0.3, report["eval_accuracy"]
    assert report["arguments"]["data"] == "data/demo_intent.jsonl" and report["eval_examples"] >= 40
    labels = json.loads((DEMO_CLASSIFIER / "demo-intent.labels.json").read_text(encoding="utf-8"))
    assert labels == report["labels"] and len(labels) == 5
    info = inspect_adapter(DEMO_CLASSIFIER / "demo-intent.lora")
    assert info.rank <= 8
    shipped = sum(path.stat().st_size for path in DEMO_CLASSIFIER.rglob("*") if path.is_file())
    assert shipped < 5_000_000, f"{shipped} bytes shipped"

    # Its held-out texts, classified again from the shipped files in float32, which gives the same numbers on every
    # CPU kind (the report's bfloat16 ones move with the CPU's bfloat16 kernels: float32 here is 0.031 from them at
    # most, bfloat16 on an AVX-512-BF16 machine 0.07): the accuracy the report states, its predictions wherever its
    # top two are not close, and probabilities near its own.
    model, tokenizer, head = load_classifier(DEMO_CLASSIFIER, "demo-intent", "float32")
    predictions = report["eval_predictions"]
    texts, size = [row["text"] for row in predictions], report["arguments"]["batch_size"]
    got = torch.cat(
        [classify(model, tokenizer, head, texts[i : i + size], "right") for i in range(0, len(texts), size)]
    )
    accuracy = sum(labels[int(torch.argmax(p))] == row["label"] for p, row in zip(got, predictions, strict=True))
    assert abs(accuracy / len(predictions) - report["eval_accuracy"]) <= 0.05, accuracy
    assert torch.allclose(got, torch.tensor([row["probabilities"] for row in predictions]), atol=0.1)
    for row, probabilities in zip(predictions, got, strict=True):
        top_two = sorted(row["probabilities"])[-2:]
        if top_two[1] - top_two[0] > 0.1:
            assert labels[int(torch.argmax(probabilities))] == row["predicted"], row
