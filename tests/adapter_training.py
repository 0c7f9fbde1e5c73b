"""Tiny real LoRA trainings for tests: adapters that answer with one recognisable word."""

from __future__ import annotations

from pathlib import Path

QUESTIONS = ["What is the capital of France?", "How many legs does a cat have?", "Name a colour.",
             "When does the ferry leave?", "What do apples grow on?", "Who wrote this?"]


def train_word_adapter(base_model: str, word: str, folder: Path, steps: int = 24, answer: str | None = None,
                       system: str | None = None) -> Path:
    """Fine-tune q/v/o LoRA on the real base model until it answers every question with `word` (or with the
    exact `answer`, e.g. "<|im_end|>" for an adapter that prefers to stop at once), after `system` when given."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    examples = []
    for question in QUESTIONS:
        turns = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)
        target = tokenizer(answer or f"{word} {word} {word}.<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        input_ids, labels = examples[step % len(examples)]
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    return folder
