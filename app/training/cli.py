"""Fine-tune a LoRA adapter on question/answer data, for the service to serve (LORA_MODEL_PATH), or, with
--task classification, train a text classifier (LoRA adapter + Linear head) for /api/v1/inference.

--task generation (the default): the data file is JSONL, one example per line, in any of these shapes:
  {"question": "...", "context": "... (optional)", "answer": "..."}
  {"instruction": "...", "input": "... (optional)", "output": "..."}
  {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
The whole file is checked before any model is loaded. Examples are formatted with the model's chat template
(question/answer pairs under the service's own system prompt) and the loss covers the answers only.

Everything is written to a temporary folder beside --output_dir and moved into place at the end: the folder
gets adapter_config.json, adapter_model.safetensors, the tokenizer files and training_report.json (losses,
held-out eval loss of the base model vs the adapter, wall time, tokens/s, and these arguments). A run that
fails leaves --output_dir as it was.

Example (the demo data: 3 epochs, 120 steps, about 8 minutes on 2 idle CPU cores):
  python scripts/finetune_lora.py --data data/demo_qa.jsonl --output_dir ./lora_adapters

--task classification: the data file is JSONL, {"text": "...", "label": "..."} per line, at least 2 labels,
checked as a whole before any model is loaded. A stratified, seeded part of each label is held out. The head
reads the final hidden state of the last text token. --output_dir (the classifier's model_dir) gets, for a
stem that is --stem or the folder's name:
  <stem>.lora/              the LoRA adapter (adapter_config.json, adapter_model.safetensors)
  <stem>.head.safetensors   the head (score.weight [labels, hidden], score.bias [labels])
  <stem>.labels.json        the labels, a JSON list in index order
  training_report.json      held-out accuracy vs the majority class, per-label counts, losses, times, args
With --legacy-layout the head is <stem>.head.pt (torch.save) and the labels <stem>.head.pt.pkl instead.

Example (the demo intents, 5 labels in Chinese and English):
  python scripts/finetune_lora.py --task classification --data data/demo_intent.jsonl \\
      --output_dir ./classifiers/demo-intent
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path
from typing import Any

from app.cli import fail, settings_or_exit
from app.config import EMBEDDED_BASE_MODEL
from app.errors import AppError
from app.logging_config import configure_logging
from app.training import (
    ClassifierConfig,
    ClassifierReport,
    FinetuneConfig,
    FinetuneReport,
    run_classifier_training,
    run_finetune,
)
from app.training.lora import DEFAULT_TARGET_MODULES, parse_target_modules

_DEFAULTS = {field.name: field.default for field in dataclasses.fields(FinetuneConfig)}
_CLASSIFIER_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ClassifierConfig)}
# Options both tasks take; one left out on the command line gets the default of the task's config.
_SHARED = (
    "model_name", "output_dir", "num_train_epochs", "max_steps", "learning_rate", "batch_size",
    "gradient_accumulation_steps", "max_length", "lora_r", "lora_alpha", "lora_dropout", "eval_split", "seed",
    "device", "weights_dtype",
)  # fmt: skip


#: What the design's `python finetune_lora.py --output_dir ./lora_adapters` trains on when no --data is given.
DEMO_DATA = Path(__file__).resolve().parents[2] / "data" / "demo_qa.jsonl"


def build_parser(*, data_required: bool = True, cache_dir_required: bool = False) -> argparse.ArgumentParser:
    """The options; `data_required=False`: no --data trains on the shipped demo data (the design's root
    finetune_lora.py); `cache_dir_required`: --cache_dir must be given (scripts/finetune_with_custom_cache.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def option(name: str, help_text: str, **kwargs: Any) -> None:
        default, classifier_default = _DEFAULTS.get(name), _CLASSIFIER_DEFAULTS.get(name)
        suffix = f" (default: {default})" if default is not None else ""
        if name in _SHARED and classifier_default != default:
            suffix += f" (--task classification: {classifier_default})"
        parser.add_argument(f"--{name}", default=None, help=help_text + suffix, **kwargs)

    parser.add_argument(
        "--task",
        choices=["generation", "classification"],
        default="generation",
        help="generation: an adapter that answers questions; classification: an adapter + head that labels "
        "texts (default: generation)",
    )
    data_help = "the training data, a JSONL file (see above)"
    if not data_required:
        data_help += f"; not given: the shipped demo data {DEMO_DATA.relative_to(DEMO_DATA.parents[1])}"
    parser.add_argument("--data", type=Path, required=data_required, help=data_help)
    option(
        "model_name",
        f"base model: an HF hub id, a local model folder, or {EMBEDDED_BASE_MODEL} (SmolLM2-135M-Instruct "
        "shipped with the project, converted once, offline); serve the adapter with BASE_MODEL_NAME set to "
        "the same value",
        metavar="NAME",
    )
    option(
        "cache_dir",
        "where the base model is downloaded or converted to" + (
            " (required here)" if cache_dir_required else
            " (default: CACHE_DIR, as the service uses, else the HF cache)"
        ),
        type=Path,
        required=cache_dir_required,
    )
    option(
        "output_dir",
        "folder the adapter is written to; an existing adapter folder there is replaced only when the run succeeds",
        type=Path,
    )
    option("num_train_epochs", "passes over the training examples", type=float, metavar="N")
    option(
        "max_steps",
        "stop after this many optimizer steps, overriding --num_train_epochs (quick runs)",
        type=int,
        metavar="N",
    )
    option(
        "learning_rate",
        "peak learning rate (linear warm-up over 5%% of the steps, then linear decay)",
        type=float,
        metavar="LR",
    )
    option("batch_size", "examples per forward/backward pass", type=int, metavar="N")
    option(
        "gradient_accumulation_steps",
        "passes whose gradients are summed before each optimizer step (effective batch = batch_size x this)",
        type=int,
        metavar="N",
    )
    option(
        "max_length",
        "longest example in tokens; longer ones are cut, and left out if no answer token remains",
        type=int,
        metavar="TOKENS",
    )
    option("lora_r", "rank of the LoRA matrices: more capacity and a larger adapter as it grows", type=int, metavar="R")
    option("lora_alpha", "LoRA scaling: the update is multiplied by alpha / r", type=int, metavar="ALPHA")
    option("lora_dropout", "dropout on the LoRA path during training", type=float, metavar="P")
    architectures = "; ".join(f"{arch}: {','.join(names)}" for arch, names in DEFAULT_TARGET_MODULES.items())
    option(
        "target_modules",
        "comma-separated names of the layers that get LoRA matrices, or all-linear (every Linear layer but "
        f"the output head); by default chosen from the architecture ({architectures}; others: all-linear)",
        metavar="NAMES",
    )
    option(
        "eval_split",
        "fraction of the examples held out to compare the base model's loss with the adapter's; 0 for none",
        type=float,
        metavar="FRACTION",
    )
    option("seed", "random seed of the split, the LoRA initialisation and the batch order", type=int)
    parser.add_argument(
        "--stem",
        metavar="NAME",
        help="classification: the name of the files in --output_dir (<stem>.lora/, <stem>.head.safetensors, ...) "
        "(default: the --output_dir folder's name)",
    )
    parser.add_argument(
        "--legacy-layout",
        action="store_true",
        help="classification: write the head as <stem>.head.pt and the labels as <stem>.head.pt.pkl instead of "
        "<stem>.head.safetensors and <stem>.labels.json",
    )
    option(
        "device",
        "cpu; cuda (bf16 or fp16 autocast as the GPU supports, activation checkpointing where the model "
        "supports it); or auto (cuda when available, else cpu). On CPU the frozen weights are bfloat16 where "
        "the CPU computes it natively, else float32",
        choices=["cpu", "cuda", "auto"],
    )
    option(
        "weights_dtype",
        "the frozen weights' dtype on CPU: auto (bfloat16 where the CPU computes it natively, else float32), "
        "float32 (the same numbers on every CPU, slower where bfloat16 is native) or bfloat16",
        choices=["auto", "float32", "bfloat16"],
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, *, data_required: bool = True, cache_dir_required: bool = False) -> int:
    args = build_parser(data_required=data_required, cache_dir_required=cache_dir_required).parse_args(argv)
    if args.data is None:
        if args.task == "classification":
            fail("--task classification needs --data: a JSONL file of {\"text\", \"label\"} lines")
        args.data = DEMO_DATA
        print(f"no --data given: training on the shipped demo data {DEMO_DATA}")
    if args.task == "generation" and (args.stem is not None or args.legacy_layout):
        fail("--stem and --legacy-layout are options of --task classification")
    # A plain `kill` then unwinds like Ctrl-C, so the temporary output folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    settings = settings_or_exit(cache_dir=args.cache_dir)
    configure_logging(settings)
    given = {name: getattr(args, name) for name in _SHARED if getattr(args, name) is not None}
    defaults = _CLASSIFIER_DEFAULTS if args.task == "classification" else _DEFAULTS
    output_dir = given.get("output_dir", defaults["output_dir"])
    try:
        common: dict[str, Any] = {
            **given,
            "data": args.data,
            "cache_dir": settings.cache_dir,
            "target_modules": parse_target_modules(args.target_modules),
        }
        if args.task == "classification":
            config = ClassifierConfig(**common, stem=args.stem, legacy_layout=args.legacy_layout)
            print(classifier_summary(run_classifier_training(config, show_progress=not args.quiet)))
        else:
            print(summary(run_finetune(FinetuneConfig(**common), show_progress=not args.quiet)))
    except AppError as error:
        fail(error.message)
    except KeyboardInterrupt:
        fail(f"interrupted; {output_dir} was left as it was", status=130)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def summary(report: FinetuneReport) -> str:
    lines = [
        f"train loss: {report.train_loss_first:.3f} (first step) -> {report.train_loss_last:.3f} (last step), "
        f"{report.steps} steps, {report.epochs:g} epochs",
    ]
    if report.eval_loss_base is not None and report.eval_loss_adapter is not None:
        lines.append(
            f"held-out eval loss ({report.eval_examples} examples): base model {report.eval_loss_base:.3f}, "
            f"with the adapter {report.eval_loss_adapter:.3f}"
        )
    lines.append(
        f"time: {report.wall_seconds:.0f} s in all, {report.train_seconds:.0f} s training at "
        f"{report.tokens_per_second:.0f} tokens/s ({report.device}, {report.weights_dtype} weights)"
    )
    lines.append(f"adapter written to {report.output_dir}")
    return "\n".join(lines)


def classifier_summary(report: ClassifierReport) -> str:
    lines = [
        f"train loss: {report.train_loss_first:.3f} (first step) -> {report.train_loss_last:.3f} (last step), "
        f"{report.steps} steps, {report.epochs:g} epochs, {len(report.labels)} labels",
    ]
    if report.eval_accuracy is not None and report.majority_baseline_accuracy is not None:
        lines.append(
            f"held-out accuracy ({report.eval_examples} texts): {report.eval_accuracy:.1%}, against "
            f"{report.majority_baseline_accuracy:.1%} for always answering the majority label "
            f"'{report.majority_label}'"
        )
    lines.append(
        f"time: {report.wall_seconds:.0f} s in all, {report.train_seconds:.0f} s training "
        f"({report.device}, {report.weights_dtype} weights)"
    )
    lines.append(f"classifier written to {report.output_dir}: {', '.join(report.files.values())}")
    return "\n".join(lines)

