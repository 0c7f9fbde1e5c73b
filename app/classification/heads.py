"""A classifier's head and labels, read safely.

- Head: the state_dict of one Linear (`weight` [labels, hidden], optional `bias` [labels]); its keys may share one
  prefix (`score.`, `classifier.`, ...). `<stem>.head.pt` is read with `torch.load(weights_only=True)` only, which
  builds tensors and plain containers and refuses any other object; `<stem>.head.safetensors` is also accepted.
- Labels: a list (index order), `{label: index}` or `{index: label}` (a `{"id2label": ...}` or `{"labels": [...]}`
  wrapper too). `<stem>.head.pt.pkl` is a pickle read by an unpickler that resolves no global at all, so only
  plain containers, strings and numbers can come out of it: a file that would import or call anything is refused
  before any of it runs. `<stem>.labels.json` is also accepted.

torch is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ClassifierError, ClassifierMismatchError

if TYPE_CHECKING:
    import torch

HEAD_PT_SUFFIX = ".head.pt"
HEAD_SAFETENSORS_SUFFIX = ".head.safetensors"
LABELS_PICKLE_SUFFIX = ".head.pt.pkl"
LABELS_JSON_SUFFIX = ".labels.json"
_MAX_LABEL_FILE_BYTES = 10_000_000
_MAX_HEAD_FILE_BYTES = 2_000_000_000
_MAX_LABELS = 100_000
#: A generous bound on the size of a final hidden state's entries (after the model's last norm they are tens at
#: most), for the overflow check of a head's weights.
_HIDDEN_VALUE_BOUND = 1e4
_LABEL_WRAPPERS = ("id2label", "label2id", "labels", "classes")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Resolves no global: every class or function a pickle names (for REDUCE, BUILD, NEWOBJ, INST, OBJ or an
    extension code) goes through `find_class`, refused here, so nothing in the file can import or call code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it references {module}.{name}; only plain lists, dicts, strings and numbers "
                                     "are accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference; only plain data is accepted")


def safe_unpickle(data: bytes) -> Any:
    """Plain data (containers, strings, numbers) from a pickle; anything else raises pickle.UnpicklingError."""
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # [labels, hidden], float32
    bias: torch.Tensor  # [labels], float32 (zeros when the file has none)
    file: str

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])


def read_head(path: Path) -> Head:
    """The head's Linear from `<stem>.head.pt` (weights_only) or `<stem>.head.safetensors`; ClassifierError
    naming the file when it is unreadable or not one Linear's state_dict."""
    import torch

    name = path.name
    if path.stat().st_size > _MAX_HEAD_FILE_BYTES:
        raise ClassifierError(f"{name} is implausibly large for a classification head")
    try:
        if name.endswith(HEAD_SAFETENSORS_SUFFIX):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch's UnpicklingError for a non-weights pickle, safetensors' own errors
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ClassifierError(f"{name} cannot be read as a head's weights (refused or damaged): {reason}") from None
    return _linear_from_state(state, name)


def _linear_from_state(state: Any, name: str) -> Head:
    import torch

    if not isinstance(state, dict) or not state or not all(isinstance(key, str) for key in state):
        raise ClassifierError(f"{name} must hold a state_dict (tensor names to tensors) of one Linear layer")
    weight_keys = [key for key in state if key == "weight" or key.endswith(".weight")]
    if len(weight_keys) != 1:
        raise ClassifierError(f"{name} must hold exactly one 'weight' (found keys: {sorted(state)[:8]})")
    prefix = weight_keys[0][: -len("weight")]
    expected = {f"{prefix}weight", f"{prefix}bias"}
    if not set(state) <= expected:
        raise ClassifierError(
            f"{name} has keys {sorted(set(state) - expected)[:8]}; a head is one Linear: "
            f"'{prefix}weight' and optionally '{prefix}bias'"
        )
    weight, bias = state[f"{prefix}weight"], state.get(f"{prefix}bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ClassifierError(f"{name}: '{prefix}weight' must be a 2-D floating-point tensor [labels, hidden]")
    if bias is None:
        bias = torch.zeros(weight.shape[0])
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or not bias.is_floating_point():
        raise ClassifierError(f"{name}: '{prefix}bias' must be a 1-D floating-point tensor [labels]")
    if bias.shape[0] != weight.shape[0]:
        raise ClassifierMismatchError(
            f"{name}: the bias has {bias.shape[0]} entries but the weight has {weight.shape[0]} rows"
        )
    weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise ClassifierError(f"{name} holds NaN or infinite values")
    # The largest logit a final hidden state of modest size could give must stay a float32 number, else the
    # probabilities of real inputs come out NaN.
    worst = weight.double().abs().sum(dim=1) * _HIDDEN_VALUE_BOUND + bias.double().abs()
    if not bool((worst < torch.finfo(torch.float32).max).all()):
        raise ClassifierError(f"{name}: its weights are so large that the logits would overflow float32")
    return Head(weight=weight, bias=bias, file=name)


def read_labels(path: Path) -> list[str]:
    """Labels in index order from `<stem>.head.pt.pkl` (plain-data pickle only) or `<stem>.labels.json`;
    ClassifierError naming the file otherwise."""
    name = path.name
    if path.stat().st_size > _MAX_LABEL_FILE_BYTES:
        raise ClassifierError(f"{name} is implausibly large for a label mapping")
    data = path.read_bytes()
    if name.endswith(LABELS_JSON_SUFFIX):
        try:
            value: Any = json.loads(data.decode("utf-8"))
        # ValueError: also an integer past Python's digit limit; RecursionError: arrays nested past the stack
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise ClassifierError(f"{name} is not valid JSON: {reason}") from None
    else:
        try:
            value = safe_unpickle(data)
        except Exception as error:  # UnpicklingError, EOFError, ValueError, ... from a damaged or crafted file
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise ClassifierError(f"{name} is refused: {reason}") from None
    return labels_from(value, name)


def labels_from(value: Any, name: str) -> list[str]:
    """A list, {label: index}, {index: label} (or one of those under id2label/label2id/labels/classes) as the
    labels in index order; indices must be exactly 0..N-1 and labels distinct."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _LABEL_WRAPPERS:
        value = next(iter(value.values()))
    elif isinstance(value, dict) and set(value) <= set(_LABEL_WRAPPERS) and "id2label" in value:
        value = value["id2label"]
    if isinstance(value, (list, tuple)):
        labels = [_label(item, name) for item in value]
    elif isinstance(value, dict) and value:
        if all(_is_index(item) for item in value.values()):
            by_index = {int(index): _label(label, name) for label, index in value.items()}
        elif all(_is_index(key) or _is_digits(key) for key in value):
            by_index = {int(index): _label(label, name) for index, label in value.items()}
        else:
            raise ClassifierError(f"{name}: a label mapping must be {{label: index}} or {{index: label}}")
        if sorted(by_index) != list(range(len(value))):
            raise ClassifierError(f"{name}: the label indices must be exactly 0..{len(value) - 1}")
        labels = [by_index[index] for index in range(len(by_index))]
    else:
        raise ClassifierError(f"{name} must hold a list of labels, {{label: index}} or {{index: label}}")
    if not labels or len(labels) > _MAX_LABELS:
        raise ClassifierError(f"{name} holds {len(labels)} labels; a classifier needs 1 to {_MAX_LABELS}")
    if len(set(labels)) != len(labels):
        raise ClassifierError(f"{name}: the labels are not distinct")
    return labels


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_LABELS


def _is_digits(value: Any) -> bool:
    return isinstance(value, str) and value.isdigit() and value.isascii() and len(value) <= 6


def _label(value: Any, name: str) -> str:
    if isinstance(value, str) and value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ClassifierError(f"{name}: a label is not valid Unicode text (a lone surrogate)") from None
        return value
    if _is_index(value):
        return str(value)
    raise ClassifierError(f"{name}: a label must be a non-empty string (found {type(value).__name__})")


def check_fits(head: Head, labels: list[str], hidden_size: int | None, labels_file: str) -> None:
    """The head against the base model's hidden size and the label count (ClassifierMismatchError)."""
    if hidden_size is not None and head.width != hidden_size:
        raise ClassifierMismatchError(
            f"{head.file}: the head takes {head.width} features but the base model's hidden size is {hidden_size}"
        )
    if head.rows != len(labels):
        raise ClassifierMismatchError(
            f"{labels_file} has {len(labels)} labels but the head in {head.file} has {head.rows} rows"
        )
