"""Fine-tuning: data checks, answer-only labels, bad inputs through the real CLI, and a real training run
of a few steps on the embedded SmolLM2 model whose adapter is then loaded with PEFT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.config import EMBEDDED_BASE_MODEL
from app.llm.model_source import default_cache_dir, resolve_base_model
from app.rag.prompts import SYSTEM_PROMPT
from app.training import FinetuneConfig, FinetuneError, FinetuneReport, TrainingDataError, run_finetune
from app.training.data import load_training_file, parse_record, split_examples
from app.training.formatting import IGNORE_INDEX, encode_conversation, ensure_chat_template, question_messages
from app.training.lora import ALL_LINEAR, default_target_modules, parse_target_modules
from app.training.output import check_output_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "finetune_lora.py"
QA_SMALL = Path(__file__).parent / "fixtures" / "finetune" / "qa_small.jsonl"
CLI_OPTIONS = (
    "--model_name", "--cache_dir", "--output_dir", "--num_train_epochs", "--data", "--learning_rate",
    "--batch_size", "--gradient_accumulation_steps", "--max_length", "--lora_r", "--lora_alpha",
    "--lora_dropout", "--target_modules", "--eval_split", "--seed", "--device", "--weights_dtype", "--max_steps",
)  # fmt: skip


# --- data -------------------------------------------------------------------------------------------


def test_question_answer_lines_get_the_services_system_prompt() -> None:
    messages = parse_record('{"question": " Q? ", "answer": "A."}')
    assert messages == question_messages("Q?", None, "A.")
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_instruction_input_output_lines_put_the_input_in_the_context() -> None:
    messages = parse_record('{"instruction": "Translate", "input": "good morning", "output": "bonjour"}')
    assert messages[0]["content"] == f"{SYSTEM_PROMPT}\n\nContext:\ngood morning"
    assert messages[1:] == [{"role": "user", "content": "Translate"}, {"role": "assistant", "content": "bonjour"}]


def test_chat_lines_are_kept_as_given() -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_record(json.dumps({"messages": chat})) == chat


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('{"question": "Q?", "answer": ', "not valid JSON"),
        ('["question", "answer"]', "expected a JSON object"),
        ('{"question": "Q?"}', "no answer"),
        ('{"answer": "A."}', "no question"),
        ('{"question": "Q?", "answer": "   "}', "no answer"),
        ('{"question": 3, "answer": "A."}', '"question" must be a string'),
        ('{"text": "Q? A."}', "found text"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role must be one of"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "before any user turn"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_record(line)


def test_a_file_with_bad_lines_is_refused_naming_every_line(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        '\ufeff{"question": "Q1", "answer": "A1"}\n\n{"question": "Q2"}\n{broken\n{"question": "Q4", "answer": "A4"}\n',
        encoding="utf-8",
    )
    with pytest.raises(TrainingDataError) as caught:
        load_training_file(data)
    message = caught.value.message
    assert "2 unusable lines" in message
    assert "line 3: no answer" in message and "line 4: not valid JSON" in message
    assert "line 1" not in message and "line 5" not in message


def test_blank_lines_and_a_byte_order_mark_are_fine(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('\ufeff{"question": "Q1", "answer": "A1"}\n\n  \n{"question": "Q2", "answer": "A2"}\n', "utf-8")
    assert [example.line_number for example in load_training_file(data)] == [1, 4]


def test_the_split_is_seeded_and_holds_out_at_least_one_example() -> None:
    examples = load_training_file(QA_SMALL)
    train, held_out = split_examples(examples, 0.1, seed=7)
    assert (len(train), len(held_out)) == (18, 2)
    assert split_examples(examples, 0.1, seed=7) == (train, held_out)
    assert len(split_examples(examples[:3], 0.01, seed=7)[1]) == 1
    assert split_examples(examples, 0.0, seed=7) == (examples, [])
    with pytest.raises(TrainingDataError, match="at least 2"):
        split_examples(examples[:1], 0.1, seed=7)


# --- formatting -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model_path() -> str:
    return resolve_base_model(EMBEDDED_BASE_MODEL, None)


@pytest.fixture()
def tokenizer(base_model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path)


def _learned_text(tokenizer: Any, labels: list[int]) -> str:
    return str(tokenizer.decode([token for token in labels if token != IGNORE_INDEX]))


def test_the_loss_covers_the_answer_and_its_end_of_turn_only(tokenizer: Any) -> None:
    messages = question_messages("Where do ferries leave from?", None, "According to docs/ferries.md, the harbour.")
    encoded, truncated = encode_conversation(tokenizer, messages, max_length=512)
    assert not truncated
    assert _learned_text(tokenizer, encoded["labels"]) == "According to docs/ferries.md, the harbour.<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)["input_ids"]
    assert encoded["input_ids"][: len(prompt)] == prompt, "training sees the prompt exactly as the service sends it"
    assert set(encoded["labels"][: len(prompt)]) == {IGNORE_INDEX}
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])


def test_every_assistant_turn_of_a_chat_is_learned(tokenizer: Any) -> None:
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    encoded, _ = encode_conversation(tokenizer, chat, max_length=512)  # type: ignore[arg-type]
    assert _learned_text(tokenizer, encoded["labels"]) == "hello<|im_end|>bye<|im_end|>"


def test_long_examples_are_cut_to_max_length(tokenizer: Any) -> None:
    messages = question_messages("Q?", None, "word " * 200)
    encoded, truncated = encode_conversation(tokenizer, messages, max_length=64)
    assert truncated and len(encoded["input_ids"]) == len(encoded["labels"]) == 64


def test_a_model_without_chat_template_gets_the_services_plain_format(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    assert ensure_chat_template(tokenizer)
    messages = question_messages("Q?", None, "A.")
    # The same text as HFLoraBackend._encode builds for a template-less model.
    service_prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:2]) + "Assistant:"
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == service_prompt
    encoded, _ = encode_conversation(tokenizer, messages, max_length=512)
    assert _learned_text(tokenizer, encoded["labels"]) == f" A.{tokenizer.eos_token}"


# --- configuration ----------------------------------------------------------------------------------


def test_target_modules_default_per_architecture() -> None:
    assert default_target_modules("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_target_modules("qwen2") == default_target_modules("mistral") == default_target_modules("llama")
    assert default_target_modules("gpt2") == ["c_attn"]
    assert default_target_modules("some_new_arch") == ALL_LINEAR
    assert parse_target_modules(None) is None
    assert parse_target_modules(" q_proj, v_proj ,") == ["q_proj", "v_proj"]
    assert parse_target_modules("all-linear") == ALL_LINEAR


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"learning_rate": 0.0}, "--learning_rate"),
        ({"batch_size": 0}, "--batch_size"),
        ({"eval_split": 0.9}, "--eval_split"),
        ({"lora_dropout": 1.0}, "--lora_dropout"),
        ({"max_steps": 0}, "--max_steps"),
    ],
)
def test_unusable_arguments_are_refused_by_name(change: dict[str, Any], option: str) -> None:
    with pytest.raises(FinetuneError, match=option):
        FinetuneConfig(data=QA_SMALL, **change).check()


def test_a_folder_with_other_content_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FinetuneError, match="other content"):
        check_output_dir(tmp_path)
    check_output_dir(tmp_path / "new")


# PEFT notices the Conv1D layout itself and says so.
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
def test_another_architecture_gets_its_own_targets_and_the_plain_format(tmp_path: Path, base_model_path: str) -> None:
    """A tiny random GPT-2 (Conv1D attention, no chat template) built here, so nothing is downloaded."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    tokenizer.chat_template = None
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    tokenizer.save_pretrained(tmp_path / "tiny-gpt2")

    report = run_finetune(
        FinetuneConfig(
            data=QA_SMALL, model_name=str(tmp_path / "tiny-gpt2"), output_dir=tmp_path / "adapter", max_steps=2
        ),
        show_progress=False,
    )

    assert report.target_modules == ["c_attn"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(FinetuneError, match="Linear layers are named: c_attn, c_fc, c_proj"):
        run_finetune(
            FinetuneConfig(
                data=QA_SMALL,
                model_name=str(tmp_path / "tiny-gpt2"),
                output_dir=tmp_path / "other",
                max_steps=1,
                target_modules=["q_proj"],
            ),
            show_progress=False,
        )
    assert not (tmp_path / "other").exists()


# --- the command line: bad inputs -------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Offline, and run from a scratch folder so no developer `.env` is read.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under the folder with its bytes (None for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def test_help_explains_every_option(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in CLI_OPTIONS:
        assert option in result.stdout
    assert "(default: 3.0)" in result.stdout and EMBEDDED_BASE_MODEL in result.stdout


@pytest.mark.parametrize("case", ["missing file", "empty file", "broken JSON line", "folder that is not a model"])
def test_bad_input_ends_with_one_clear_message_and_leaves_output_dir_alone(tmp_path: Path, case: str) -> None:
    output_dir = tmp_path / "adapter"
    output_dir.mkdir()
    (output_dir / "adapter_config.json").write_text('{"an": "earlier adapter"}', encoding="utf-8")
    data, model = tmp_path / "data.jsonl", EMBEDDED_BASE_MODEL
    if case == "missing file":
        expected = f"data file {data} does not exist"
    elif case == "empty file":
        data.write_text("\n  \n", encoding="utf-8")
        expected = "is empty"
    elif case == "broken JSON line":
        lines = QA_SMALL.read_text(encoding="utf-8").splitlines()
        lines[2] = lines[2][:-10]
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected = "line 3: not valid JSON"
    else:
        shutil.copy(QA_SMALL, data)
        (tmp_path / "not_a_model").mkdir()
        (tmp_path / "not_a_model" / "notes.txt").write_text("hello", encoding="utf-8")
        model = str(tmp_path / "not_a_model")
        expected = "is a folder but not a model"
    before = snapshot(tmp_path)

    result = run_cli("--data", str(data), "--model_name", model, "--output_dir", str(output_dir), cwd=tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert snapshot(tmp_path) == before, "nothing may be written, not even a temporary folder"


def test_an_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    shutil.copy(QA_SMALL, tmp_path / "data.jsonl")
    (tmp_path / "adapter").write_text("a file, not a folder", encoding="utf-8")
    before = snapshot(tmp_path)

    result = run_cli("--data", "data.jsonl", "--output_dir", "adapter", cwd=tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == "error: --output_dir adapter is an existing file, not a folder: choose a folder path"
    )
    assert snapshot(tmp_path) == before


# --- a real training run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneReport, Path]:
    """A few real steps on the embedded model, into an output_dir that holds an earlier adapter."""
    output_dir = tmp_path_factory.mktemp("finetune") / "adapter"
    output_dir.mkdir()
    (output_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    (output_dir / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    # float32: the losses compared below are the same on every CPU kind.
    config = FinetuneConfig(
        data=QA_SMALL, output_dir=output_dir, max_steps=8, batch_size=4, learning_rate=1e-3, eval_split=0.2,
        weights_dtype="float32",
    )
    return run_finetune(config, show_progress=False), output_dir


@pytest.mark.slow
def test_training_writes_a_safetensors_adapter_in_place(trained: tuple[FinetuneReport, Path]) -> None:
    report, output_dir = trained
    names = {path.name for path in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_report.json"} <= names
    assert not [name for name in names if name.endswith(".bin")]
    assert "stale.txt" not in names, "the earlier adapter was replaced as a whole"
    assert [p.name for p in output_dir.parent.iterdir()] == ["adapter"], "no temporary folder is left behind"

    config = json.loads((output_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == EMBEDDED_BASE_MODEL
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    saved = json.loads((output_dir / "training_report.json").read_text(encoding="utf-8"))
    assert saved["arguments"]["max_steps"] == 8 and saved["arguments"]["data"] == str(QA_SMALL)
    assert saved["steps"] == report.steps == 8
    assert saved["train_tokens"] > 0 and saved["tokens_per_second"] > 0 and saved["wall_seconds"] > 0


@pytest.mark.slow
def test_the_loss_went_down(trained: tuple[FinetuneReport, Path]) -> None:
    report, _ = trained
    assert len(report.train_losses) == 8
    assert report.train_loss_last < report.train_loss_first
    assert report.eval_loss_base is not None and report.eval_loss_adapter is not None
    assert report.eval_loss_adapter < report.eval_loss_base - 0.3, report


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft 0.21
def test_the_adapter_loads_with_peft_and_changes_the_model(
    trained: tuple[FinetuneReport, Path], base_model_path: str
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, output_dir = trained
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32).eval()
    examples = load_training_file(QA_SMALL)
    batch = [encode_conversation(tokenizer, example.messages, 512)[0] for example in examples]

    def logits_and_loss(net: Any) -> tuple[list[torch.Tensor], float]:
        logits, losses = [], []
        with torch.no_grad():
            for item in batch:
                out = net(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]]))
                logits.append(out.logits)
                losses.append(float(out.loss))
        return logits, sum(losses) / len(losses)

    base_logits, base_loss = logits_and_loss(model)
    adapted = PeftModel.from_pretrained(model, str(output_dir)).eval()
    adapted_logits, adapted_loss = logits_and_loss(adapted)

    assert all(not torch.allclose(b, a, atol=1e-3) for b, a in zip(base_logits, adapted_logits, strict=True))
    assert adapted_loss < base_loss - 0.3, (base_loss, adapted_loss)
    with adapted.disable_adapter():
        assert torch.allclose(logits_and_loss(adapted)[0][0], base_logits[0], atol=1e-5)


@pytest.mark.slow
def test_the_design_documents_commands_run_as_written(tmp_path: Path) -> None:
    """`python finetune_lora.py --model_name ... --cache_dir ... --output_dir ./lora_adapters --num_train_epochs 3`
    from the design card (held to one small step here): no --data, so the shipped demo data, said so; and
    scripts/finetune_with_custom_cache.py, its troubleshooting fix, insists on --cache_dir."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The cache the embedded model was converted into once (a fresh one would convert it again, for a minute).
    cache_dir = default_cache_dir()
    design = [
        sys.executable, str(REPO_ROOT / "finetune_lora.py"), "--model_name", EMBEDDED_BASE_MODEL,
        "--cache_dir", str(cache_dir), "--output_dir", "./lora_adapters", "--num_train_epochs", "3",
        "--max_steps", "1", "--batch_size", "2", "--eval_split", "0", "--quiet",  # bounds for a test
    ]  # fmt: skip
    trained = subprocess.run(design, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "no --data given: training on the shipped demo data" in trained.stdout
    report = json.loads((tmp_path / "lora_adapters" / "training_report.json").read_text(encoding="utf-8"))
    assert report["arguments"]["data"].endswith("data/demo_qa.jsonl") and report["arguments"]["num_train_epochs"] == 3
    assert (tmp_path / "lora_adapters" / "adapter_model.safetensors").is_file()

    custom = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "finetune_with_custom_cache.py")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert custom.returncode == 2 and "--cache_dir" in custom.stderr and "Traceback" not in custom.stderr
