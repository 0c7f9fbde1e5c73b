"""Training a text classifier: a LoRA adapter on the base causal LM's backbone plus one Linear head.

The data file is JSONL, one `{"text": str, "label": str}` per line, checked as a whole before any model loads.
A text is encoded with the base model's tokenizer as it is (`tokenizer(text)`: its default special tokens, no
chat template); the head sees the final hidden state (after the final norm, what the LM head and
AutoModelForSequenceClassification's `score` see) of the last non-padding token. The adapter is trained with
PEFT's FEATURE_EXTRACTION task type, which saves only the LoRA matrices, so it loads onto the plain
AutoModelForCausalLM (`PeftModel.from_pretrained`, `load_adapter`) and passes the service's adapter checks.

`<output_dir>/` gets, for a stem (by default the folder's name):
    <stem>.lora/                PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors
    <stem>.head.safetensors     the head: `score.weight` [labels, hidden], `score.bias` [labels], float32
    <stem>.labels.json          the labels, a JSON list in index order
    training_report.json        held-out accuracy vs the majority class, per-class counts, losses, times, args
or with `legacy_layout`, in place of the last two but one:
    <stem>.head.pt              torch.save of the same state_dict
    <stem>.head.pt.pkl          pickle of {label: index}, plain str/int only (no globals needed to load it)
Everything is written to a staging folder beside output_dir and moved into place only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import EMBEDDED_BASE_MODEL
from app.training.data import json_object, read_jsonl, text_field
from app.training.device import DeviceChoice, TrainingDevice, WeightsDtypeChoice, resolve_training_device
from app.training.errors import FinetuneError, TrainingDataError
from app.training.finetune import check_hyperparameters, library_versions, load_base_model
from app.training.lora import attach_lora, default_target_modules
from app.training.output import REPORT_FILE, StagedOutput, check_output_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".lora"
HEAD_SUFFIX = ".head.safetensors"
LABELS_SUFFIX = ".labels.json"
LEGACY_HEAD_SUFFIX = ".head.pt"
LEGACY_LABELS_SUFFIX = ".head.pt.pkl"
HEAD_PREFIX = "score."
POOLING = (
    "tokenizer(text) with its default special tokens, no chat template; the final hidden state (after the "
    "final norm) of the last non-padding token; logits = score.weight @ state + score.bias, softmax"
)
_EXAMPLE_LINE = '{"text": "...", "label": "..."}'
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
_WARMUP_FRACTION = 0.05
# The head starts from scratch and needs larger steps than the LoRA matrices next to it.
_HEAD_LR_FACTOR = 5.0
_LENGTH_GROUP_BATCHES = 4


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    line_number: int


@dataclass(frozen=True)
class ClassifierConfig:
    """Every argument of a classification run; the defaults train ~250 short texts in ~3 min on 2 CPU cores."""

    data: Path
    model_name: str = EMBEDDED_BASE_MODEL
    cache_dir: Path | None = None
    output_dir: Path = Path("./classifiers/classifier")
    stem: str | None = None
    legacy_layout: bool = False
    num_train_epochs: float = 6.0
    max_steps: int | None = None
    learning_rate: float = 1e-3
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None
    eval_split: float = 0.2
    seed: int = 42
    device: DeviceChoice = "cpu"
    weights_dtype: WeightsDtypeChoice = "auto"

    @property
    def file_stem(self) -> str:
        return self.stem if self.stem is not None else self.output_dir.resolve().name

    def check(self) -> None:
        """Refuse values no run can use, naming the option."""
        check_hyperparameters(self)
        if not _STEM.match(self.file_stem):
            what = f"--stem {self.stem!r}" if self.stem is not None else f"the --output_dir name {self.file_stem!r}"
            raise FinetuneError(
                f"{what} cannot name the classifier's files: use letters, digits, '-', '_' and inner dots "
                "(or pass --stem)"
            )

    def as_json(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class ClassifierReport:
    """What `training_report.json` holds."""

    task: str
    output_dir: str
    files: dict[str, str]
    pooling: str
    labels: list[str]
    class_counts: dict[str, dict[str, int]]
    base_model: str
    device: str
    weights_dtype: str
    autocast: str | None
    target_modules: list[str] | str
    trainable_parameters: int
    train_examples: int
    eval_examples: int
    truncated_examples: int
    steps: int
    epochs: float
    train_loss_first: float
    train_loss_last: float
    train_losses: list[float]
    eval_accuracy: float | None
    majority_label: str
    majority_baseline_accuracy: float | None
    eval_per_class_accuracy: dict[str, float]
    eval_loss: float | None
    eval_predictions: list[dict[str, Any]]
    train_seconds: float
    wall_seconds: float
    arguments: dict[str, Any]
    versions: dict[str, str]


# --- data -------------------------------------------------------------------------------------------


def load_labelled_file(path: Path) -> list[LabelledText]:
    """Every labelled text of the file, or TrainingDataError naming the file's problem, its bad lines, or a
    label set no classifier can be trained on."""
    records = read_jsonl(path, parse_labelled_record, _EXAMPLE_LINE)
    examples = [LabelledText(text, label, number) for number, (text, label) in records]
    labels = sorted({example.label for example in examples})
    if len(labels) < 2:
        raise TrainingDataError(
            f"data file {path} has only one label ({labels[0]!r}) in {len(examples)} lines: "
            "a classifier needs at least 2 different labels"
        )
    return examples


def parse_labelled_record(line: str) -> tuple[str, str]:
    """(text, label) of one JSONL line; ValueError says, in a few words, what is wrong with it."""
    record = json_object(line)
    missing = [name for name in ("text", "label") if name not in record or record[name] is None]
    if missing:
        raise ValueError(
            f"no {' and no '.join(repr(name) for name in missing)}: expected {_EXAMPLE_LINE}; "
            f"found {', '.join(sorted(record)) or 'no fields'}"
        )
    text, label = text_field(record, "text"), text_field(record, "label")
    if text is None:
        raise ValueError('"text" is blank')
    if label is None:
        raise ValueError('"label" is blank')
    return text, label


def stratified_split(
    examples: list[LabelledText], eval_split: float, seed: int
) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, held out): per label a seeded shuffle with `eval_split` of it held out (at least one, never all),
    so every label is in both; the training part is then shuffled as a whole."""
    if eval_split == 0:
        return list(examples), []
    by_label: dict[str, list[LabelledText]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    too_few = sorted(label for label, items in by_label.items() if len(items) < 2)
    if too_few:
        raise TrainingDataError(
            f"labels with a single example: {', '.join(repr(label) for label in too_few)}; each label needs at "
            "least 2 (one to train on, one held out): add examples or pass --eval_split 0"
        )
    rng = random.Random(seed)
    train: list[LabelledText] = []
    held_out: list[LabelledText] = []
    for label in sorted(by_label):
        items = list(by_label[label])
        rng.shuffle(items)
        count = min(max(1, round(len(items) * eval_split)), len(items) - 1)
        held_out.extend(items[:count])
        train.extend(items[count:])
    rng.shuffle(train)
    return train, held_out


# --- the model --------------------------------------------------------------------------------------


def last_token_states(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, hidden]: the backbone's final hidden state at each row's last non-padding token.

    Works for right and left padding: positions count real tokens only, so a left-padded row is computed as
    if unpadded, and the last position whose mask is 1 is taken (not `mask.sum() - 1`)."""
    import torch

    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _batches(encoded: list[list[int]], labels: list[int], batch_size: int, pad_id: int, device: str) -> list[_Batch]:
    """Batches in the given order, padded on the right to their longest text."""
    import torch

    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
        targets = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        batches.append(_Batch(ids.to(device), mask.to(device), targets.to(device)))
    return batches


def _group_by_length(order: list[int], encoded: list[list[int]], batch_size: int, rng: random.Random) -> None:
    """Shuffle `order` in place so that each run of `batch_size` holds texts of similar length (less padding
    computed for nothing): a seeded shuffle, sorted by length within chunks of a few batches, batches shuffled."""
    rng.shuffle(order)
    chunk = batch_size * _LENGTH_GROUP_BATCHES
    grouped = [
        sorted(order[start : start + chunk], key=lambda i: len(encoded[i])) for start in range(0, len(order), chunk)
    ]
    batches = [group[i : i + batch_size] for group in grouped for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    order[:] = [i for batch in batches for i in batch]


# --- the run ----------------------------------------------------------------------------------------


def run_classifier_training(config: ClassifierConfig, *, show_progress: bool = True) -> ClassifierReport:
    """Train, evaluate and save a classifier into `config.output_dir`, which changes only on success."""
    started = time.perf_counter()
    config.check()
    check_output_dir(config.output_dir)
    examples = load_labelled_file(config.data)
    train, held_out = stratified_split(examples, config.eval_split, config.seed)
    labels = sorted({example.label for example in examples})
    logger.info(
        "%d labelled texts in %s, %d labels: %d to train on, %d held out",
        len(examples),
        config.data,
        len(labels),
        len(train),
        len(held_out),
    )
    staged = StagedOutput(config.output_dir)
    try:
        report = _train_into(staged.staging, config, labels, train, held_out, started, show_progress)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    logger.info("classifier saved to %s", config.output_dir)
    return report


def _train_into(
    folder: Path,
    config: ClassifierConfig,
    labels: list[str],
    train: list[LabelledText],
    held_out: list[LabelledText],
    started: float,
    show_progress: bool,
) -> ClassifierReport:
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    device = resolve_training_device(config.device, config.weights_dtype)
    set_seed(config.seed)
    tokenizer, model = load_base_model(config.model_name, config.cache_dir, device)
    index = {label: number for number, label in enumerate(labels)}
    train_ids, train_cut = _encode(tokenizer, train, config.max_length)
    eval_ids, eval_cut = _encode(tokenizer, held_out, config.max_length)
    if train_cut + eval_cut:
        logger.warning("%d texts are longer than --max_length %d and were cut", train_cut + eval_cut, config.max_length)

    target_modules = config.target_modules or default_target_modules(model.config.model_type)
    peft_model = attach_lora(
        model, target_modules, config.lora_r, config.lora_alpha, config.lora_dropout, task_type="FEATURE_EXTRACTION"
    )
    # The causal LM's transformer without its LM head (LlamaModel, GPT2Model, ...), LoRA layers in place.
    backbone = peft_model.get_base_model().base_model
    assert isinstance(backbone, torch.nn.Module)
    model_device = device.name
    peft_model.to(model_device)
    head = torch.nn.Linear(int(model.config.hidden_size), len(labels)).to(model_device)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    trainable, total = peft_model.get_nb_trainable_parameters()
    trainable += sum(parameter.numel() for parameter in head.parameters())
    logger.info(
        "LoRA on %s plus a %d-label head: %d trainable parameters of %d",
        target_modules,
        len(labels),
        trainable,
        total,
    )

    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(train) / (config.batch_size * accumulation)))
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.num_train_epochs))
    lora_parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_parameters, "lr": config.learning_rate},
            {"params": list(head.parameters()), "lr": config.learning_rate * _HEAD_LR_FACTOR},
        ],
        weight_decay=0.0,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * _WARMUP_FRACTION), total_steps)
    scaler = torch.amp.GradScaler("cuda") if device.autocast == "fp16" else None

    def logits_of(batch: _Batch) -> torch.Tensor:
        with _autocast(device):
            states = last_token_states(backbone, batch.input_ids, batch.attention_mask)
        return head(states.float())

    logger.info("training on %s (%s weights), %d steps", device.name, device.weights_dtype, total_steps)
    rng = random.Random(config.seed)
    order = list(range(len(train)))
    losses: list[float] = []
    train_started = time.perf_counter()
    progress = _progress_bar(total_steps, show_progress)
    peft_model.train()
    head.train()
    try:
        while len(losses) < total_steps:
            _group_by_length(order, train_ids, config.batch_size, rng)
            batches = _batches(
                [train_ids[i] for i in order],
                [index[train[i].label] for i in order],
                config.batch_size,
                int(tokenizer.pad_token_id),
                model_device,
            )
            for first in range(0, len(batches), accumulation):
                group = batches[first : first + accumulation]
                step_loss = 0.0
                for batch in group:
                    loss = torch.nn.functional.cross_entropy(logits_of(batch), batch.labels) / len(group)
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += float(loss.detach())
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
                if len(losses) >= total_steps:
                    break
    except torch.OutOfMemoryError:
        raise FinetuneError("out of memory while training: lower --batch_size or --max_length") from None
    finally:
        progress.close()
    train_seconds = time.perf_counter() - train_started

    peft_model.eval()
    head.eval()
    probabilities: list[list[float]] = []
    with torch.no_grad():
        for batch in _batches(
            eval_ids,
            [index[example.label] for example in held_out],
            config.batch_size,
            int(tokenizer.pad_token_id),
            model_device,
        ):
            probabilities.extend(torch.softmax(logits_of(batch), dim=-1).tolist())
    evaluation = _evaluate(labels, train, held_out, probabilities)

    stem = config.file_stem
    # The name the user gave, not the local folder it resolved to: the service matches it to BASE_MODEL_NAME.
    peft_model.peft_config["default"].base_model_name_or_path = config.model_name
    adapter_dir = folder / f"{stem}{ADAPTER_SUFFIX}"
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    files = {"adapter": adapter_dir.name, **_save_head(folder, stem, head, labels, config.legacy_layout)}

    counts_train, counts_held = Counter(e.label for e in train), Counter(e.label for e in held_out)
    report = ClassifierReport(
        task="classification",
        output_dir=str(config.output_dir),
        files=files,
        pooling=POOLING,
        labels=labels,
        class_counts={
            label: {
                "train": counts_train[label],
                "held_out": counts_held[label],
                "total": counts_train[label] + counts_held[label],
            }
            for label in labels
        },
        base_model=config.model_name,
        device=device.name,
        weights_dtype=device.weights_dtype,
        autocast=device.autocast,
        target_modules=target_modules,
        trainable_parameters=trainable,
        train_examples=len(train),
        eval_examples=len(held_out),
        truncated_examples=train_cut + eval_cut,
        steps=len(losses),
        epochs=round(len(losses) / steps_per_epoch, 3),
        train_loss_first=round(losses[0], 4),
        train_loss_last=round(losses[-1], 4),
        train_losses=[round(loss, 4) for loss in losses],
        train_seconds=round(train_seconds, 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        arguments=config.as_json(),
        versions=library_versions(),
        **evaluation,
    )
    (folder / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _encode(
    tokenizer: PreTrainedTokenizerBase, examples: list[LabelledText], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids of each text as the classifier reads it, and how many texts were cut to max_length."""
    encoded: list[list[int]] = []
    cut = 0
    for example in examples:
        ids: list[int] = tokenizer(example.text)["input_ids"]
        if len(ids) > max_length:
            cut += 1
            ids = ids[:max_length]
        if not ids:
            raise FinetuneError(f"line {example.line_number}: the text encodes to no token at all")
        encoded.append(ids)
    return encoded, cut


def _evaluate(
    labels: list[str], train: list[LabelledText], held_out: list[LabelledText], probabilities: list[list[float]]
) -> dict[str, Any]:
    """Held-out accuracy (overall and per label) and loss, against always answering the training majority."""
    majority = Counter(example.label for example in train).most_common(1)[0][0]
    predictions = [labels[max(range(len(row)), key=row.__getitem__)] for row in probabilities]
    right = [predicted == example.label for predicted, example in zip(predictions, held_out, strict=True)]
    per_class = {
        label: round(
            sum(ok for ok, e in zip(right, held_out, strict=True) if e.label == label)
            / sum(e.label == label for e in held_out),
            4,
        )
        for label in labels
        if any(e.label == label for e in held_out)
    }
    index = {label: number for number, label in enumerate(labels)}
    loss = [-math.log(max(row[index[e.label]], 1e-12)) for row, e in zip(probabilities, held_out, strict=True)]
    return {
        "eval_accuracy": round(sum(right) / len(right), 4) if held_out else None,
        "majority_label": majority,
        "majority_baseline_accuracy": (
            round(sum(e.label == majority for e in held_out) / len(held_out), 4) if held_out else None
        ),
        "eval_per_class_accuracy": per_class,
        "eval_loss": round(sum(loss) / len(loss), 4) if held_out else None,
        "eval_predictions": [
            {
                "line": e.line_number,
                "text": e.text,
                "label": e.label,
                "predicted": predicted,
                "probabilities": [round(p, 6) for p in row],
            }
            for e, predicted, row in zip(held_out, predictions, probabilities, strict=True)
        ],
    }


def _save_head(folder: Path, stem: str, head: torch.nn.Linear, labels: list[str], legacy: bool) -> dict[str, str]:
    """Write the head and the labels; the file names, by role."""
    import torch

    state = {
        f"{HEAD_PREFIX}weight": head.weight.detach().to("cpu", torch.float32).contiguous().clone(),
        f"{HEAD_PREFIX}bias": head.bias.detach().to("cpu", torch.float32).contiguous().clone(),
    }
    if legacy:
        head_file, labels_file = folder / f"{stem}{LEGACY_HEAD_SUFFIX}", folder / f"{stem}{LEGACY_LABELS_SUFFIX}"
        torch.save(state, head_file)
        # A dict of str -> int pickles with no GLOBAL opcode: loading it imports nothing.
        labels_file.write_bytes(pickle.dumps({label: number for number, label in enumerate(labels)}, protocol=4))
    else:
        from safetensors.torch import save_file

        head_file, labels_file = folder / f"{stem}{HEAD_SUFFIX}", folder / f"{stem}{LABELS_SUFFIX}"
        save_file(state, str(head_file), metadata={"format": "pt", "labels": str(len(labels))})
        labels_file.write_text(json.dumps(labels, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {"head": head_file.name, "labels": labels_file.name}


def _autocast(device: TrainingDevice) -> Any:
    import contextlib

    import torch

    if device.name == "cuda" and device.autocast is not None:
        return torch.autocast("cuda", dtype=torch.bfloat16 if device.autocast == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _progress_bar(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", disable=not show)
