"""One fine-tuning run: check the data, train a LoRA adapter with the HF Trainer, measure it, save it.

The adapter's `base_model_name_or_path` is the model name as the user gave it (`--model_name`, by default
`embedded:SmolLM2-135M-Instruct`), the same string the service's BASE_MODEL_NAME takes, not the local
folder the embedded model was converted to.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from app.config import EMBEDDED_BASE_MODEL
from app.errors import ModelLoadError
from app.llm.model_source import resolve_base_model
from app.training.data import TrainingExample, load_training_file, split_examples
from app.training.device import DeviceChoice, TrainingDevice, WeightsDtypeChoice, resolve_training_device
from app.training.errors import FinetuneError
from app.training.formatting import (
    IGNORE_INDEX,
    EncodedExample,
    PaddingCollator,
    encode_conversation,
    ensure_chat_template,
)
from app.training.lora import attach_lora, default_target_modules
from app.training.output import REPORT_FILE, StagedOutput, check_output_dir

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

logger = logging.getLogger(__name__)

# The Trainer needs a folder of its own; with saving off it writes little there, and inside the staging
# folder even that is cleaned up on every outcome.
_TRAINER_SCRATCH = "trainer-scratch"
# A float below 1 is a fraction of the total steps for the Trainer.
_WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class FinetuneConfig:
    """Every argument of a run; the defaults train ~350 short QA pairs for 3 epochs in ~8 min on 2 CPU cores."""

    data: Path
    model_name: str = EMBEDDED_BASE_MODEL
    cache_dir: Path | None = None
    output_dir: Path = Path("./lora_adapters")
    num_train_epochs: float = 3.0
    max_steps: int | None = None
    learning_rate: float = 5e-4
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None
    eval_split: float = 0.1
    seed: int = 42
    device: DeviceChoice = "cpu"
    weights_dtype: WeightsDtypeChoice = "auto"

    def check(self) -> None:
        """Refuse values no run can use, naming the option."""
        check_hyperparameters(self)

    def as_json(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


class Hyperparameters(Protocol):
    """The options both tasks share (`FinetuneConfig`, `ClassifierConfig`); read-only, as both are frozen."""

    @property
    def num_train_epochs(self) -> float: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def gradient_accumulation_steps(self) -> int: ...
    @property
    def max_length(self) -> int: ...
    @property
    def lora_r(self) -> int: ...
    @property
    def lora_alpha(self) -> int: ...
    @property
    def lora_dropout(self) -> float: ...
    @property
    def eval_split(self) -> float: ...


def check_hyperparameters(config: Hyperparameters) -> None:
    """Refuse values no run can use, naming the option."""
    rules: list[tuple[bool, str]] = [
        (config.num_train_epochs > 0, "--num_train_epochs must be above 0"),
        (config.max_steps is None or config.max_steps >= 1, "--max_steps must be at least 1"),
        (0 < config.learning_rate < 1, "--learning_rate must be between 0 and 1"),
        (config.batch_size >= 1, "--batch_size must be at least 1"),
        (config.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (config.max_length >= 16, "--max_length must be at least 16 tokens"),
        (config.lora_r >= 1, "--lora_r must be at least 1"),
        (config.lora_alpha > 0, "--lora_alpha must be above 0"),
        (0 <= config.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
        (0 <= config.eval_split <= 0.5, "--eval_split must be in [0, 0.5]"),
    ]
    for ok, message in rules:
        if not ok:
            raise FinetuneError(message)


@dataclass(frozen=True)
class FinetuneReport:
    """What `training_report.json` holds: the figures of the run and its exact arguments."""

    output_dir: str
    base_model: str
    device: str
    weights_dtype: str
    autocast: str | None
    activation_checkpointing: bool
    target_modules: list[str] | str
    trainable_parameters: int
    train_examples: int
    eval_examples: int
    truncated_examples: int
    skipped_examples: int
    steps: int
    epochs: float
    train_loss_first: float
    train_loss_last: float
    train_losses: list[float]
    eval_loss_base: float | None
    eval_loss_adapter: float | None
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    wall_seconds: float
    arguments: dict[str, Any]
    versions: dict[str, str]


def run_finetune(config: FinetuneConfig, *, show_progress: bool = True) -> FinetuneReport:
    """Train, evaluate and save an adapter into `config.output_dir`, which changes only on success."""
    started = time.perf_counter()
    config.check()
    check_output_dir(config.output_dir)
    examples = load_training_file(config.data)
    train_examples, eval_examples = split_examples(examples, config.eval_split, config.seed)
    logger.info(
        "%d examples in %s: %d to train on, %d held out",
        len(examples),
        config.data,
        len(train_examples),
        len(eval_examples),
    )
    staged = StagedOutput(config.output_dir)
    try:
        report = _train_into(staged.staging, config, train_examples, eval_examples, started, show_progress)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    logger.info("adapter saved to %s", config.output_dir)
    return report


def _train_into(
    folder: Path,
    config: FinetuneConfig,
    train_examples: list[TrainingExample],
    eval_examples: list[TrainingExample],
    started: float,
    show_progress: bool,
) -> FinetuneReport:
    import torch
    from transformers import set_seed

    device = resolve_training_device(config.device, config.weights_dtype)
    set_seed(config.seed)
    tokenizer, model = load_base_model(config.model_name, config.cache_dir, device)
    if ensure_chat_template(tokenizer):
        logger.warning("%s has no chat template: using the service's plain 'Role: text' format", config.model_name)
    train_set, truncated, skipped = _encode_all(tokenizer, train_examples, config.max_length)
    eval_set, eval_truncated, eval_skipped = _encode_all(tokenizer, eval_examples, config.max_length)
    if not train_set:
        raise FinetuneError(
            f"no training example has answer tokens within --max_length {config.max_length}: raise --max_length"
        )
    if truncated + eval_truncated:
        logger.warning(
            "%d examples are longer than --max_length %d and were cut; %d of them lost their whole answer "
            "and are left out",
            truncated + eval_truncated,
            config.max_length,
            skipped + eval_skipped,
        )

    target_modules = config.target_modules or default_target_modules(model.config.model_type)
    peft_model = attach_lora(model, target_modules, config.lora_r, config.lora_alpha, config.lora_dropout)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %d trainable parameters of %d", target_modules, trainable, total)
    trainer = _make_trainer(
        folder / _TRAINER_SCRATCH, config, device, peft_model, tokenizer, train_set, eval_set, show_progress
    )

    eval_loss_base = None
    if eval_set:
        logger.info("evaluating the base model on %d held-out examples", len(eval_set))
        with peft_model.disable_adapter():
            eval_loss_base = trainer.evaluate()["eval_loss"]
    logger.info("training on %s (%s weights)", device.name, device.weights_dtype)
    try:
        train_output = trainer.train()
    except torch.OutOfMemoryError:
        raise FinetuneError("out of memory while training: lower --batch_size or --max_length") from None
    eval_loss_adapter = trainer.evaluate()["eval_loss"] if eval_set else None
    shutil.rmtree(folder / _TRAINER_SCRATCH, ignore_errors=True)

    # The name the user gave, not the local folder it resolved to: the service matches it to BASE_MODEL_NAME.
    peft_model.peft_config["default"].base_model_name_or_path = config.model_name
    # The vocabulary is never resized here, and "auto" would ask the HF hub about the base model to find out.
    peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    # PEFT's model card is an empty template; the report is the record of this run.
    (folder / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)

    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    train_seconds = float(train_output.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    report = FinetuneReport(
        output_dir=str(config.output_dir),
        base_model=config.model_name,
        device=device.name,
        weights_dtype=device.weights_dtype,
        autocast=device.autocast,
        activation_checkpointing=bool(trainer.args.activation_checkpointing),
        target_modules=target_modules,
        trainable_parameters=trainable,
        train_examples=len(train_set),
        eval_examples=len(eval_set),
        truncated_examples=truncated + eval_truncated,
        skipped_examples=skipped + eval_skipped,
        steps=trainer.state.global_step,
        epochs=round(float(trainer.state.epoch or 0), 3),
        train_loss_first=round(losses[0], 4),
        train_loss_last=round(losses[-1], 4),
        train_losses=[round(loss, 4) for loss in losses],
        eval_loss_base=None if eval_loss_base is None else round(eval_loss_base, 4),
        eval_loss_adapter=None if eval_loss_adapter is None else round(eval_loss_adapter, 4),
        train_tokens=tokens,
        train_seconds=round(train_seconds, 1),
        tokens_per_second=round(tokens / train_seconds, 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        arguments=config.as_json(),
        versions=library_versions(),
    )
    (folder / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report


def load_base_model(
    model_name: str, cache_dir: Path | None, device: TrainingDevice
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(model_name, cache_dir)
    logger.info("loading the base model %s", model_name)
    cache = str(cache_dir) if cache_dir else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=device.torch_dtype, cache_dir=cache, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the base model '{model_name}': {first_line}") from None
    if not tokenizer.is_fast:
        # The answer tokens are found through character offsets, which only fast tokenizers give.
        raise ModelLoadError(f"the tokenizer of '{model_name}' has no fast (Rust) version, which training needs")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return tokenizer, model


def model_source(model_name: str, cache_dir: Path | None) -> str:
    """What `from_pretrained` loads; a path that is missing or not a model folder is refused here, clearly."""
    source = resolve_base_model(model_name, cache_dir)
    folder = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if not (folder.exists() or looks_like_path):
        return source  # an HF hub id
    if not folder.is_dir():
        state = "is a file" if folder.exists() else "does not exist"
        raise ModelLoadError(f"--model_name {model_name}: {state}; give a model folder or an HF hub id")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"--model_name {model_name} is a folder but not a model: it has no config.json")
    return str(folder)


def _encode_all(
    tokenizer: PreTrainedTokenizerBase, examples: list[TrainingExample], max_length: int
) -> tuple[list[EncodedExample], int, int]:
    """(encoded examples, how many were cut, how many were left out for having no answer token left)."""
    encoded, truncated, skipped = [], 0, 0
    for example in examples:
        item, was_cut = encode_conversation(tokenizer, example.messages, max_length)
        truncated += was_cut
        if all(label == IGNORE_INDEX for label in item["labels"]):
            skipped += 1
            continue
        encoded.append(item)
    return encoded, truncated, skipped


def _make_trainer(
    scratch: Path,
    config: FinetuneConfig,
    device: TrainingDevice,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: list[EncodedExample],
    eval_set: list[EncodedExample],
    show_progress: bool,
) -> Trainer:
    from transformers import ProgressCallback, Trainer, TrainingArguments

    from app.training.progress import LossProgressCallback

    checkpointing = device.use_activation_checkpointing(model)
    args = TrainingArguments(
        output_dir=str(scratch),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=_WARMUP_FRACTION,
        weight_decay=0.0,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        use_cpu=device.name == "cpu",
        bf16=device.autocast == "bf16",
        fp16=device.autocast == "fp16",
        activation_checkpointing=checkpointing,
        # Non-reentrant checkpointing needs no gradient on the (frozen) inputs, which LoRA does not give.
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        # Similar lengths in a batch: less padding computed for nothing.
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        dataloader_pin_memory=device.name == "cuda",
        remove_unused_columns=False,
        seed=config.seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=PaddingCollator(pad_token_id=int(tokenizer.pad_token_id)),
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    if show_progress:
        trainer.add_callback(LossProgressCallback())
    return trainer


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
